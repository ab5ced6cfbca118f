package vmmode

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/hooks"
	"github.com/kiwi-shim/kiwi-shim/pkg/hostcgroup"
	"github.com/kiwi-shim/kiwi-shim/pkg/initramfs"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
	"github.com/kiwi-shim/kiwi-shim/pkg/rootless"
	"github.com/kiwi-shim/kiwi-shim/pkg/settings"
	"github.com/kiwi-shim/kiwi-shim/pkg/sharefs"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmshare"
)

// MonitorCommand is the hidden kiwi-shim command Create starts as a box's
// monitor, with --state-dir DIR; it runs vm.Run with the ready pipe at
// fd 3 and the go-ahead pipe at fd vm.GoFD.
const MonitorCommand = "vm-monitor"

// bootTimeout bounds the guest's boot, as the monitor measures it.
const bootTimeout = 3 * time.Minute

// CreateOptions are the inputs of Create: runc's create flags plus what
// kiwi-shim resolved about the container.
type CreateOptions struct {
	// ID, Bundle and Spec identify the container.
	ID, Bundle string
	Spec       *specs.Spec
	// Settings are the container's resolved settings (VM and Scratch).
	Settings settings.Container
	// ConsoleSocket receives the pty master when the process has a
	// terminal; PidFile gets the monitor's pid.
	ConsoleSocket, PidFile string
}

// machine is what Create resolved before it makes anything: the
// binaries, the kernel and initramfs, the namespaces the monitor is born
// in and the network plan the spec alone gives.
type machine struct {
	qemu, accel string
	// shareFSBin is kiwi-sharefs, for config.ShareVirtioFS.
	shareFSBin string
	// kernel is the file QEMU boots (vm.BootImage), initrd the
	// initramfs.
	kernel, initrd string
	// newNS are the clone flags of the namespaces the monitor gets new;
	// joinNS the ones it joins (clone flag -> path).
	newNS  uintptr
	joinNS map[int]string
	net    vm.NetworkPlan
	// scratchPath is where the scratch disk is mounted, "" for none.
	scratchPath string
	// template is the template the guest is restored from, nil for a
	// cold boot.
	template *vm.TemplateRef
}

// Create prepares the box and starts its monitor, which boots the guest
// and sets up the container's root; Create returns once that is done. On
// any failure it leaves nothing behind: the rollback releases the box as
// delete does.
func (m *Manager) Create(ctx context.Context, o CreateOptions) error {
	if err := CheckHooks(o.Spec.Hooks); err != nil {
		return err
	}
	mc, err := m.resolve(o)
	if err != nil {
		return err
	}
	mc.template = m.boxTemplate(ctx, o.ID, o.Settings.VM, mc)
	return m.launch(ctx, o, mc)
}

// resolve finds everything the box needs before anything is made, and
// checks that the guest's configuration can be made.
func (m *Manager) resolve(o CreateOptions) (*machine, error) {
	v, c := o.Settings.VM, m.Config.VM
	mc := &machine{}
	var err error
	if mc.qemu, err = FindQEMU(c, v.Arch); err != nil {
		return nil, err
	}
	if v.Share == config.ShareVirtioFS {
		if mc.shareFSBin, err = findShareFS(c); err != nil {
			return nil, err
		}
	}
	kern, err := FindKernel(c, v.Arch, m.CacheDirs...)
	if err != nil {
		return nil, err
	}
	accel, err := vm.ChooseAccel(c.Accel, v.Arch, mc.qemu)
	if err != nil {
		return nil, err
	}
	m.Log.Debug("accelerator", "accel", accel.Name, "reason", accel.Reason)
	mc.accel = accel.Name
	init, err := m.InitBinary(v.Arch)
	if err != nil {
		return nil, err
	}
	if mc.initrd, err = initramfs.Build(initramfs.Spec{Init: init, ModulesDir: kern.ModulesDir}, m.Config.CacheDir); err != nil {
		return nil, fmt.Errorf("initramfs: %w", err)
	}
	if mc.kernel, err = vm.BootImage(kern.Image, v.Arch, m.Config.CacheDir); err != nil {
		m.Log.Info("kernel boots as its compressed image (slower under TCG)", "image", kern.Image, "why", err)
	}
	mc.net = vm.PlanNetwork(o.Spec)
	mc.newNS = vm.NewNamespaces(o.Spec)
	if mc.joinNS, err = vm.NamespacePaths(o.Spec); err != nil {
		return nil, err
	}
	if s := o.Settings.Scratch; s.Size > 0 {
		mc.scratchPath = s.Path
	}
	// Checked before anything is made. The guest's configuration is made
	// again after the hooks, which may write files that travel into the
	// guest by value (nerdctl's /etc/hosts, say).
	if _, _, err := vm.GuestConfig(o.Spec, oci.RootPath(o.Bundle, o.Spec), v.Share, mc.scratchPath, mc.net); err != nil {
		return nil, err
	}
	return mc, nil
}

// launch records the box, gives it its cgroup and scratch disk, starts
// its monitor, runs the prestart and createRuntime hooks, writes the
// monitor's configuration and waits until the guest is ready.
func (m *Manager) launch(ctx context.Context, o CreateOptions, mc *machine) (err error) {
	rec := &state.Container{ID: o.ID, Bundle: o.Bundle, Mode: config.ModeVM, Created: time.Now().UTC(), Annotations: o.Spec.Annotations, Hooks: o.Spec.Hooks}
	if err := m.Store.Create(rec); err != nil {
		return err
	}
	var b *boot
	hooksRan := false
	defer func() {
		if err != nil {
			m.rollback(ctx, rec, b, hooksRan)
		}
	}()
	if err := m.placeInCgroup(rec, o.Spec); err != nil {
		return err
	}
	var disks []vm.Disk
	if size := o.Settings.Scratch.Size; size > 0 {
		// Recorded before anything else can fail, so that delete finds it.
		if rec.Scratch, err = m.host().CreateScratch(ctx, m.Config.VM.ScratchDir, o.ID, size); err != nil {
			return err
		}
		if err := m.Store.Save(rec); err != nil {
			return err
		}
		disks = append(disks, vm.Disk{Path: rec.Scratch, Serial: vm.ScratchSerial})
	}
	if b, err = m.startMonitor(m.dir(o.ID), mc); err != nil {
		return err
	}
	// Closed without the go-ahead (create failed), it ends the monitor.
	defer b.close()
	rec.Pid = b.cmd.Process.Pid
	// Recorded now, so that state answers "creating" while the hooks run.
	if err := m.Store.Save(rec); err != nil {
		return err
	}
	// The host side of the box exists: prestart and createRuntime run
	// here, on the host, in kiwi-shim's namespaces, with the monitor as
	// the container's process. A failure fails create, and the rollback
	// takes the box. Their state says "creating", as runc's.
	hookState := HookState(rec, specs.StateCreating)
	hooksRan = true
	for _, stage := range []string{hooks.Prestart, hooks.CreateRuntime} {
		if err := hooks.Run(ctx, stage, hooks.Of(o.Spec.Hooks, stage), hookState); err != nil {
			return err
		}
	}
	cfg, err := m.monitorConfig(o, mc, rec, disks)
	if err != nil {
		return err
	}
	if err := writeMonitorConfig(m.dir(o.ID), cfg); err != nil {
		return err
	}
	if err := b.goAhead(); err != nil {
		return err
	}
	if err := m.Store.Save(rec); err != nil {
		return err
	}
	if p := o.PidFile; p != "" {
		if err := state.WritePidFile(p, rec.Pid); err != nil {
			return err
		}
	}
	// conmon (a subreaper) inherits the monitor when we exit.
	b.cmd.Process.Release()
	return nil
}

// placeInCgroup gives the box's host processes the container's cgroup,
// with the spec's CPU controls, and records it. A cgroup that cannot be
// made is logged, not worth failing the box for; CPU controls the kernel
// refuses fail create, as with runc.
func (m *Manager) placeInCgroup(rec *state.Container, spec *specs.Spec) error {
	cgroup, cgErr := hostcgroup.Path(spec.Linux.CgroupsPath)
	if m.Rootless && cgroup != "" {
		// Creating cgroups takes root (or a delegated cgroup v2
		// subtree, which the engine's own runtime would use).
		m.Log.Debug("rootless: vm processes stay in the caller's cgroup", "id", rec.ID)
		cgroup = ""
	}
	if cgErr != nil {
		// The VM's processes stay in the caller's cgroup.
		m.Log.Info("vm processes not placed in the container's cgroup", "id", rec.ID, "why", cgErr)
		return nil
	}
	if cgroup == "" {
		return nil
	}
	if err := m.host().CreateCgroup(cgroup); err != nil {
		// Accounting is not worth failing the box for (a read-only
		// cgroupfs in a container, say).
		m.Log.Warn("vm processes not placed in the container's cgroup", "id", rec.ID, "err", err)
		return nil
	}
	rec.Cgroup = cgroup
	if err := m.Store.Save(rec); err != nil {
		return err
	}
	// CPU controls bound the VM's host processes as runc's bound the
	// container's.
	if r := spec.Linux.Resources; r != nil {
		return m.host().SetCPU(cgroup, r.CPU)
	}
	return nil
}

// boot is a monitor started and waiting for its go-ahead.
type boot struct {
	cmd *exec.Cmd
	dir string
	// goW is the write end of the go-ahead pipe (fd vm.GoFD in the
	// monitor), readyR the read end of the ready pipe (fd 3).
	goW, readyR *os.File
}

// startMonitor starts the monitor of the state directory dir, born in
// the network, UTS and IPC namespaces the spec asks for (new, or joined
// by path): it is the container's process on the host, the pid that
// hooks and tools see. It waits for the go-ahead before it boots
// anything.
func (m *Manager) startMonitor(dir string, mc *machine) (*boot, error) {
	readyR, readyW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	goR, goW, err := os.Pipe()
	if err != nil {
		readyR.Close()
		readyW.Close()
		return nil, err
	}
	// The child holds its own copies of readyW and goR.
	defer readyW.Close()
	defer goR.Close()
	self, err := os.Executable()
	if err != nil {
		readyR.Close()
		goW.Close()
		return nil, err
	}
	args := append(append([]string{}, m.HelperArgs...), MonitorCommand, "--state-dir", dir)
	cmd := exec.Command(self, args...)
	// The monitor's stdio is the container's: conmon's pipes.
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	// fd 3: the ready pipe; fd vm.GoFD: the go-ahead pipe.
	cmd.ExtraFiles = []*os.File{readyW, goR}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Cloneflags: mc.newNS}
	if err := m.host().StartProcess(cmd, mc.joinNS); err != nil {
		readyR.Close()
		goW.Close()
		return nil, fmt.Errorf("start VM monitor: %w", err)
	}
	return &boot{cmd: cmd, dir: dir, goW: goW, readyR: readyR}, nil
}

// goAhead lets the monitor boot and waits until it says the guest is
// ready. A monitor that failed is reaped.
func (b *boot) goAhead() error {
	if _, err := fmt.Fprintln(b.goW, "go"); err != nil {
		return fmt.Errorf("VM monitor: go-ahead: %w", err)
	}
	b.goW.Close()
	line, _ := bufio.NewReader(b.readyR).ReadString('\n')
	line = strings.TrimSpace(line)
	if msg, ok := strings.CutPrefix(line, "error "); ok {
		b.cmd.Wait()
		return errors.New(msg)
	}
	if line != "ok" {
		b.cmd.Process.Kill()
		b.cmd.Wait()
		return fmt.Errorf("VM monitor died during boot (guest console: %s)", filepath.Join(b.dir, "console.log"))
	}
	return nil
}

// close closes create's ends of the monitor's pipes; closing the
// go-ahead pipe before "go" ends the monitor.
func (b *boot) close() {
	b.goW.Close()
	b.readyR.Close()
}

// monitorConfig makes the monitor's configuration once the hooks ran:
// the network plan from the monitor's own network namespace (what a CNI
// hook put there moves into the guest), the guest's configuration and
// the virtio-fs exports.
func (m *Manager) monitorConfig(o CreateOptions, mc *machine, rec *state.Container, disks []vm.Disk) (vm.MonitorConfig, error) {
	v := o.Settings.VM
	netPlan := mc.net
	ownNetNS := mc.newNS&unix.CLONE_NEWNET != 0
	if ownNetNS {
		netPlan = m.host().PlanNetwork(fmt.Sprintf("/proc/%d/ns/net", rec.Pid))
	}
	m.Log.Info("vm network", "id", o.ID, "mode", netPlan.Mode, "why", netPlan.Why)
	guest, shares, err := vm.GuestConfig(o.Spec, oci.RootPath(o.Bundle, o.Spec), v.Share, mc.scratchPath, netPlan)
	if err != nil {
		return vm.MonitorConfig{}, err
	}
	guest.DirectDNS = v.DirectDNS
	var shareFS *vm.ShareFS
	var virtiofs []vm.VirtioFS
	if v.Share == config.ShareVirtioFS {
		shareFS, virtiofs = virtiofsExports(m.dir(o.ID), shares, mc.shareFSBin, v, m.Debug)
		shares = nil
	}
	mcfg := vm.MonitorConfig{
		ID: o.ID, QEMU: mc.qemu, Guest: guest, ConsoleSocket: o.ConsoleSocket,
		BootTimeout: bootTimeout, ShareFS: shareFS, Cgroup: rec.Cgroup, Template: mc.template,
		NetNS: netPlan.NetNS, NetNSOwned: ownNetNS,
		Machine: vm.Machine{
			QEMU: mc.qemu, Arch: v.Arch, Accel: mc.accel, MemoryMiB: v.MemoryMiB, CPUs: v.CPUs,
			Kernel: mc.kernel, Initrd: mc.initrd, Shares: shares, VirtioFS: virtiofs, Network: netPlan.Mode, Disks: disks,
		},
	}
	mcfg.Paths(m.dir(o.ID))
	return mcfg, nil
}

// writeMonitorConfig writes cfg where the monitor reads it.
func writeMonitorConfig(dir string, cfg vm.MonitorConfig) error {
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, vm.MonitorConfigFile), b, 0o600)
}

// virtiofsExports turns the VM's shares into kiwi-sharefs exports, each
// with its socket in the state directory dir; bind mounts get the cache
// mode and mapped mode of v (sharefs.Options.Mapped); the container's
// root is cached entirely and never mapped.
func virtiofsExports(dir string, shares []vm.Share, bin string, v settings.VM, debug bool) (*vm.ShareFS, []vm.VirtioFS) {
	sf := &vm.ShareFS{Binary: bin, Debug: debug}
	var devs []vm.VirtioFS
	for i, sh := range shares {
		cache, mapped := v.ShareCache, v.ShareMapped
		if sh.Tag == vm.RootTag {
			// The container's root is its own while it runs, and its
			// programs are mapped: cache everything. Its set-user-ID
			// programs and device nodes are its own too, real as in
			// container mode (kept in the engine's storage).
			cache, mapped = sharefs.CacheAlways, false
		}
		e := vmshare.Export{
			Tag: sh.Tag, Source: sh.Path, Socket: vm.SocketPath(dir, fmt.Sprintf("v%d.sock", i)),
			Options: sharefs.Options{ReadOnly: sh.ReadOnly, Xattr: true, Cache: cache, Squash: !rootless.CanChown(), Mapped: mapped},
		}
		sf.Exports = append(sf.Exports, e)
		devs = append(devs, vm.VirtioFS{Tag: sh.Tag, Socket: e.Socket})
	}
	return sf, devs
}

// rollback undoes a create that failed: the monitor it started is killed
// and reaped, the box is released as delete releases it, a box whose
// prestart or createRuntime hooks ran gets its poststop hooks (the
// runtime spec: a failed hook stops the container, which then goes as at
// delete), and the record goes.
func (m *Manager) rollback(ctx context.Context, rec *state.Container, b *boot, hooksRan bool) {
	if b != nil && b.cmd.ProcessState == nil {
		b.cmd.Process.Kill()
		b.cmd.Wait()
	}
	if err := m.Release(ctx, rec); err != nil {
		m.Log.Warn("failed create not fully released", "id", rec.ID, "err", err)
	}
	if hooksRan {
		m.poststop(ctx, rec)
	}
	m.Store.Remove(rec.ID)
}
