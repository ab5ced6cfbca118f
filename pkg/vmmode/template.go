package vmmode

import (
	"context"
	"fmt"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/initramfs"
	"github.com/kiwi-shim/kiwi-shim/pkg/settings"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
)

// templateArch is the one guest architecture whose boxes start from
// templates so far; others boot cold.
const templateArch = "x86_64"

// boxTemplate returns the template a box of v on machine mc is restored
// from, making it on first use; nil when templates are off (vm.template),
// for another architecture, or when the template cannot be made (logged:
// the box boots cold).
func (m *Manager) boxTemplate(ctx context.Context, id string, v settings.VM, mc *machine) *vm.TemplateRef {
	if m.Config.VM.Template != config.TemplateAuto {
		return nil
	}
	if v.Arch != templateArch {
		m.Log.Info("vm template: none for this architecture, booting cold", "id", id, "arch", v.Arch)
		return nil
	}
	base := vm.Machine{QEMU: mc.qemu, Arch: v.Arch, Accel: mc.accel, MemoryMiB: v.MemoryMiB, CPUs: v.CPUs, Kernel: mc.kernel, Initrd: mc.initrd}
	t, made, err := vm.EnsureTemplate(ctx, base, m.Config.TemplateDirPath(), m.Log)
	if err != nil {
		m.Log.Warn("vm template not available: booting the box cold", "id", id, "err", err)
		return nil
	}
	m.Log.Debug("vm template", "id", id, "path", t.Path, "made", made)
	return &t
}

// MakeTemplate makes the template of a box of the host's defaults
// (vm.memory, vm.cpus) for arch, unless it is there, and returns it;
// made reports whether it was made now. `kiwi-shim setup --template`
// runs it, so that the first box does not wait for the template.
func (m *Manager) MakeTemplate(ctx context.Context, arch string) (t vm.TemplateRef, made bool, err error) {
	if arch != templateArch {
		return vm.TemplateRef{}, false, fmt.Errorf("VM templates are made for %s guests only so far, not %s", templateArch, arch)
	}
	c := m.Config.VM
	memBytes, err := config.ParseSize(c.Memory)
	if err != nil {
		return vm.TemplateRef{}, false, err
	}
	qemu, err := FindQEMU(c, arch)
	if err != nil {
		return vm.TemplateRef{}, false, err
	}
	kern, err := FindKernel(c, arch, m.CacheDirs...)
	if err != nil {
		return vm.TemplateRef{}, false, err
	}
	accel, err := vm.ChooseAccel(c.Accel, arch, qemu)
	if err != nil {
		return vm.TemplateRef{}, false, err
	}
	init, err := m.InitBinary(arch)
	if err != nil {
		return vm.TemplateRef{}, false, err
	}
	initrd, err := initramfs.Build(initramfs.Spec{Init: init, ModulesDir: kern.ModulesDir}, m.Config.CacheDir)
	if err != nil {
		return vm.TemplateRef{}, false, fmt.Errorf("initramfs: %w", err)
	}
	kernel, err := vm.BootImage(kern.Image, arch, m.Config.CacheDir)
	if err != nil {
		m.Log.Info("kernel boots as its compressed image (slower under TCG)", "image", kern.Image, "why", err)
	}
	base := vm.Machine{QEMU: qemu, Arch: arch, Accel: accel.Name, MemoryMiB: memBytes >> 20, CPUs: max(c.CPUs, 1), Kernel: kernel, Initrd: initrd}
	return vm.EnsureTemplate(ctx, base, m.Config.TemplateDirPath(), m.Log)
}
