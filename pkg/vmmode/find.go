package vmmode

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/hooks"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
	"github.com/kiwi-shim/kiwi-shim/pkg/sysbin"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
)

// KernelChoice is the configured guest kernel series and flavour.
func KernelChoice(c config.VM) vm.KernelChoice {
	return vm.KernelChoice{Version: c.KernelVersion, Flavour: c.KernelFlavour}
}

// FindKernel returns the guest kernel for arch: configured (vm.kernel),
// else the configured series in one of the cache directories, else the
// host's own.
func FindKernel(c config.VM, arch string, cacheDirs ...string) (vm.Kernel, error) {
	return vm.FindKernel(c.Kernel[arch], KernelChoice(c), arch, cacheDirs...)
}

// FindQEMU returns the qemu-system binary for arch: vm.qemu, else
// qemu-system-ARCH in the system's directories.
func FindQEMU(c config.VM, arch string) (string, error) {
	name := c.QEMU[arch]
	if name == "" {
		name = "qemu-system-" + arch
	}
	if strings.Contains(name, "/") {
		if _, err := os.Stat(name); err != nil {
			return "", fmt.Errorf("vm.qemu.%s: %w", arch, err)
		}
		return name, nil
	}
	if p, err := sysbin.Find(name); err == nil {
		return p, nil
	}
	pkg := "qemu-system-x86"
	if arch == "aarch64" {
		pkg = "qemu-system-arm"
	}
	return "", fmt.Errorf("%s not found: install it (apt-get install %s) or set vm.qemu.%s", name, pkg, arch)
}

// findShareFS finds kiwi-sharefs: vm.sharefs, next to kiwi-shim (as make
// builds and installs them), then PATH.
func findShareFS(c config.VM) (string, error) {
	if p := c.ShareFS; p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("vm.sharefs: %w", err)
		}
		return p, nil
	}
	self, _ := os.Executable()
	if p := filepath.Join(filepath.Dir(self), "kiwi-sharefs"); fileExists(p) {
		return p, nil
	}
	if p, err := sysbin.Find("kiwi-sharefs"); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("kiwi-sharefs not found next to kiwi-shim or in PATH (make install puts it there); or use %s=%s", oci.AnnotationShare, config.Share9P)
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// CheckHooks refuses createContainer and startContainer hooks in VM
// mode. They are to run in the container's namespaces (its mount
// namespace, before and after pivot_root), to change what the container
// sees: the container's namespaces are in the guest, and the hook is a
// host program. Running them on the host would do their work (mounts,
// ldconfig, device nodes) to the host instead, so they are refused.
func CheckHooks(h *specs.Hooks) error {
	for _, stage := range []string{hooks.CreateContainer, hooks.StartContainer} {
		if hs := hooks.Of(h, stage); len(hs) > 0 {
			return fmt.Errorf("%s hooks (%s) are not supported in VM mode: they run in the container's namespaces, which are inside the VM, where host programs cannot run; use container mode (annotation %s=container)", stage, hs[0].Path, oci.AnnotationMode)
		}
	}
	return nil
}

// CheckPreserveFds refuses --preserve-fds N > 0 in VM mode. The
// descriptors are the host's (pipes, sockets, files, terminals): a
// process in the guest cannot hold them, and relaying them would have to
// emulate each kind (a file's seeks and mappings, a socket's ancillary
// data) over the control port. Refusing at create names the option
// instead of a "Bad file descriptor" in the box.
func CheckPreserveFds(n int) error {
	if n > 0 {
		return fmt.Errorf("--preserve-fds %d is not supported in VM mode: the container's processes run in a VM and cannot use the host's descriptors; use container mode (annotation %s=container) to pass descriptors", n, oci.AnnotationMode)
	}
	return nil
}
