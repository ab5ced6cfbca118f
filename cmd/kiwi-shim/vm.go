package main

import (
	"bufio"
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/urfave/cli"
	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/fdutil"
	"github.com/kiwi-shim/kiwi-shim/pkg/guestarch"
	"github.com/kiwi-shim/kiwi-shim/pkg/hooks"
	"github.com/kiwi-shim/kiwi-shim/pkg/hostcgroup"
	"github.com/kiwi-shim/kiwi-shim/pkg/initramfs"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
	"github.com/kiwi-shim/kiwi-shim/pkg/rootless"
	"github.com/kiwi-shim/kiwi-shim/pkg/sharefs"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
	"github.com/kiwi-shim/kiwi-shim/pkg/sysbin"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmnet"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmshare"
)

// vmMonitorCommand is the hidden command create starts as a VM's monitor.
var vmMonitorCommand = cli.Command{
	Name:   "vm-monitor",
	Hidden: true,
	Flags:  []cli.Flag{cli.StringFlag{Name: "state-dir"}},
	Action: withEnv(func(ctx *cli.Context, e *env) error {
		dir := ctx.String("state-dir")
		code, abandoned := vm.Run(dir, os.NewFile(3, "ready"), os.NewFile(vm.GoFD, "go-ahead"), e.log)
		if abandoned {
			// create went away before the VM was ready: no engine knows
			// this container, and none will delete it.
			e.removeAbandoned(dir)
		}
		return exitError{code: code}
	}),
}

// removeAbandoned deletes the VM container of the state directory dir
// from inside its own monitor, once the monitor has stopped the VM.
func (e *env) removeAbandoned(dir string) {
	rec, err := e.store().Load(filepath.Base(dir))
	if err != nil || e.store().Dir(rec.ID) != dir {
		e.log.Warn("abandoned container not removed", "dir", dir, "err", err)
		return
	}
	if err := e.releaseVM(rec, dir); err != nil {
		e.log.Warn("abandoned container not released", "id", rec.ID, "err", err)
		return
	}
	if err := e.store().Remove(rec.ID); err != nil {
		e.log.Warn("abandoned container not removed", "id", rec.ID, "err", err)
		return
	}
	e.log.Info("abandoned container removed", "id", rec.ID)
}

// guestArch is the guest's architecture: io.kiwi-shim.vm.arch, else the
// machine of the entrypoint's binary in the root file system, else the
// host's.
func guestArch(s oci.Settings, spec *specs.Spec, rootfs string, log *slog.Logger) string {
	if a := guestarch.Normalize(s.VMArch); a != "" {
		return a
	}
	if p := spec.Process; p != nil && len(p.Args) > 0 {
		a, err := guestarch.FromRootfs(rootfs, p.Args[0], p.Cwd, p.Env)
		switch {
		case err != nil:
			log.Debug("guest architecture not taken from the entrypoint", "err", err)
		case !vm.SupportedArch(a):
			log.Info("the entrypoint is for an architecture VM mode does not run; using the host's", "arch", a)
		default:
			return a
		}
	}
	return vm.HostArch()
}

// findKernel returns the guest kernel for arch: configured, in the cache,
// or the host's own; a rootless user also finds the one root's `kiwi-shim
// setup` put into the system's cache.
func (e *env) findKernel(arch string) (vm.Kernel, error) {
	return vm.FindKernel(e.cfg.VM.Kernel[arch], e.kernelChoice(), arch, e.cacheDirs()...)
}

// kernelChoice is the configured kernel series and flavour.
func (e *env) kernelChoice() vm.KernelChoice {
	return vm.KernelChoice{Version: e.cfg.VM.KernelVersion, Flavour: e.cfg.VM.KernelFlavour}
}

// cacheDirs are the cache directories to look for kernels and boxes in:
// the configured one, and for a rootless user also the system's, filled
// by root's `make kernel` and `make box` (read only).
func (e *env) cacheDirs() []string {
	dirs := []string{e.cfg.CacheDir}
	if sys := config.Default().CacheDir; e.rootless && sys != e.cfg.CacheDir {
		dirs = append(dirs, sys)
	}
	return dirs
}

// findQEMU returns the qemu-system binary for arch.
func (e *env) findQEMU(arch string) (string, error) {
	name := e.cfg.VM.QEMU[arch]
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

// initBins holds the kiwi-box-init binaries make build embeds, one per
// guest architecture (see initbin/README.md).
//
//go:embed initbin
var initBins embed.FS

// initBinary returns kiwi-box-init for the guest architecture: the one
// embedded in this binary, else one next to kiwi-shim or where an
// installation put it.
func initBinary(arch string) ([]byte, error) {
	name := "kiwi-box-init-" + arch
	if b, err := initBins.ReadFile("initbin/" + name); err == nil {
		return b, nil
	}
	self, _ := os.Executable()
	cands := []string{filepath.Join(filepath.Dir(self), name), filepath.Join("/usr/local/libexec/kiwi-shim", name), filepath.Join("/usr/libexec/kiwi-shim", name)}
	for _, c := range cands {
		if b, err := os.ReadFile(c); err == nil {
			return b, nil
		}
	}
	return nil, fmt.Errorf("kiwi-box-init for %s is not embedded and not found (looked in %s): build kiwi-shim with make", arch, strings.Join(cands, ", "))
}

// virtiofsExports turns the VM's shares into kiwi-sharefs exports, each
// with its socket in the state directory dir; bind mounts get the cache
// mode bindCache and, with mapped, mapped mode (sharefs.Options.Mapped);
// the container's root is cached entirely and never mapped.
func virtiofsExports(dir string, shares []vm.Share, bin, bindCache string, mapped, debug bool) (*vm.ShareFS, []vm.VirtioFS) {
	sf := &vm.ShareFS{Binary: bin, Debug: debug}
	var devs []vm.VirtioFS
	for i, sh := range shares {
		cache, m := bindCache, mapped
		if sh.Tag == vm.RootTag {
			// The container's root is its own while it runs, and its
			// programs are mapped: cache everything. Its set-user-ID
			// programs and device nodes are its own too, real as in
			// container mode (kept in the engine's storage).
			cache, m = sharefs.CacheAlways, false
		}
		e := vmshare.Export{
			Tag: sh.Tag, Source: sh.Path, Socket: vm.SocketPath(dir, fmt.Sprintf("v%d.sock", i)),
			Options: sharefs.Options{ReadOnly: sh.ReadOnly, Xattr: true, Cache: cache, Squash: !rootless.CanChown(), Mapped: m},
		}
		sf.Exports = append(sf.Exports, e)
		devs = append(devs, vm.VirtioFS{Tag: sh.Tag, Socket: e.Socket})
	}
	return sf, devs
}

// findShareFS finds kiwi-sharefs: vm.sharefs, next to kiwi-shim (as make
// builds and installs them), then PATH.
func (e *env) findShareFS() (string, error) {
	if p := e.cfg.VM.ShareFS; p != "" {
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
	return "", errors.New("kiwi-sharefs not found next to kiwi-shim or in PATH (make install puts it there); or use io.kiwi-shim.share=9p")
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// vmSize returns guest memory (MiB) and cpus: annotations, then the
// spec's resource limits, then the config.
func (e *env) vmSize(spec *specs.Spec, s oci.Settings) (int64, int, error) {
	mem := e.cfg.VM.Memory
	var memBytes int64
	if r := spec.Linux.Resources; r != nil && r.Memory != nil && r.Memory.Limit != nil && *r.Memory.Limit > 0 {
		memBytes = *r.Memory.Limit
	}
	if s.VMMemory != "" {
		mem, memBytes = s.VMMemory, 0
	}
	if memBytes == 0 {
		b, err := config.ParseSize(mem)
		if err != nil {
			return 0, 0, err
		}
		memBytes = b
	}
	cpus := e.cfg.VM.CPUs
	if r := spec.Linux.Resources; r != nil && r.CPU != nil && r.CPU.Quota != nil && r.CPU.Period != nil && *r.CPU.Period > 0 && *r.CPU.Quota > 0 {
		cpus = int((uint64(*r.CPU.Quota) + *r.CPU.Period - 1) / *r.CPU.Period)
	}
	if s.VMCPUs > 0 {
		cpus = s.VMCPUs
	}
	return memBytes >> 20, max(cpus, 1), nil
}

// createVM prepares the box and starts its monitor, which boots the guest
// and sets up the container's root; create returns once that is done.
func createVM(ctx *cli.Context, e *env, id, bundle string, spec *specs.Spec, s oci.Settings) (err error) {
	if err := vmHooksSupported(spec.Hooks); err != nil {
		return err
	}
	arch := guestArch(s, spec, oci.RootPath(bundle, spec), e.log)
	qemu, err := e.findQEMU(arch)
	if err != nil {
		return err
	}
	share := s.Share
	if share == "" {
		share = e.cfg.VM.Share
	}
	var shareFSBin string
	if share == "virtiofs" {
		if shareFSBin, err = e.findShareFS(); err != nil {
			return err
		}
	}
	kern, err := e.findKernel(arch)
	if err != nil {
		return err
	}
	accel, err := vm.ChooseAccel(e.cfg.VM.Accel, arch, qemu)
	if err != nil {
		return err
	}
	e.log.Debug("accelerator", "accel", accel.Name, "reason", accel.Reason)
	init, err := initBinary(arch)
	if err != nil {
		return err
	}
	initrd, err := initramfs.Build(initramfs.Spec{Init: init, ModulesDir: kern.ModulesDir}, e.cfg.CacheDir)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	bootImage, err := vm.BootImage(kern.Image, arch, e.cfg.CacheDir)
	if err != nil {
		e.log.Info("kernel boots as its compressed image (slower under TCG)", "image", kern.Image, "why", err)
	}
	memMiB, cpus, err := e.vmSize(spec, s)
	if err != nil {
		return err
	}
	netPlan := vm.PlanNetwork(spec)
	newNS := vm.NewNamespaces(spec)
	joinNS, err := vm.NamespacePaths(spec)
	if err != nil {
		return err
	}
	var scratchPath string
	if s.ScratchSize > 0 {
		scratchPath = s.ScratchPath
	}
	// Checked before anything is made. The guest's configuration is made
	// again after the hooks, which may write files that travel into the
	// guest by value (nerdctl's /etc/hosts, say).
	if _, _, err := vm.GuestConfig(spec, oci.RootPath(bundle, spec), share, scratchPath, netPlan); err != nil {
		return err
	}

	rec := &state.Container{ID: id, Bundle: bundle, Mode: config.ModeVM, Created: time.Now().UTC(), Annotations: spec.Annotations, Hooks: spec.Hooks}
	store := e.store()
	if err := store.Create(rec); err != nil {
		return err
	}
	dir := store.Dir(id)
	var monitor *exec.Cmd
	hooksRan := false
	defer func() {
		if err != nil {
			if monitor != nil && monitor.Process != nil {
				monitor.Process.Kill()
				monitor.Wait()
			}
			vm.Stop(dir, 0, 5*time.Second)
			if rec.Scratch != "" {
				os.Remove(rec.Scratch)
			}
			if st, _ := vmnet.Load(dir); st != nil {
				vmnet.Teardown(st)
			}
			if rec.Cgroup != "" {
				hostcgroup.Remove(rec.Cgroup, 5*time.Second)
			}
			if hooksRan {
				// The runtime spec: a failed prestart or createRuntime
				// hook stops the container, which then goes as at
				// delete, poststop hooks included.
				if perr := hooks.Run(context.Background(), hooks.Poststop, hooks.Of(spec.Hooks, hooks.Poststop), vmHookState(rec, specs.StateStopped)); perr != nil {
					e.log.Warn("poststop hook failed", "id", id, "err", perr)
				}
			}
			store.Remove(id)
		}
	}()
	cgroup, cgErr := hostcgroup.Path(spec.Linux.CgroupsPath)
	if e.rootless && cgroup != "" {
		// Creating cgroups takes root (or a delegated cgroup v2
		// subtree, which the engine's own runtime would use).
		e.log.Debug("rootless: vm processes stay in the caller's cgroup", "id", id)
		cgroup = ""
	}
	if cgErr != nil {
		// The VM's processes stay in the caller's cgroup.
		e.log.Info("vm processes not placed in the container's cgroup", "id", id, "why", cgErr)
	} else if cgroup != "" {
		if err := hostcgroup.Create(cgroup); err != nil {
			// Accounting is not worth failing the box for (a read-only
			// cgroupfs in a container, say).
			e.log.Warn("vm processes not placed in the container's cgroup", "id", id, "err", err)
		} else {
			rec.Cgroup = cgroup
			if err := store.Save(rec); err != nil {
				return err
			}
			// CPU controls bound the VM's host processes as runc's
			// bound the container's; values the kernel refuses fail
			// create, as with runc.
			if r := spec.Linux.Resources; r != nil {
				if err := hostcgroup.SetCPU(cgroup, r.CPU); err != nil {
					return err
				}
			}
		}
	}
	var disks []vm.Disk
	if s.ScratchSize > 0 {
		// Recorded before anything else can fail, so that delete finds it.
		if rec.Scratch, err = vm.CreateScratch(context.Background(), e.cfg.VM.ScratchDir, id, s.ScratchSize); err != nil {
			return err
		}
		if err := store.Save(rec); err != nil {
			return err
		}
		disks = append(disks, vm.Disk{Path: rec.Scratch, Serial: vm.ScratchSerial})
	}
	// The monitor first, born in the network, UTS and IPC namespaces the
	// spec asks for (new, or joined by path): it is the container's
	// process on the host, the pid that hooks and tools see. It waits
	// for the go-ahead on fd 4 before it boots anything.
	readyR, readyW, err := os.Pipe()
	if err != nil {
		return err
	}
	defer readyR.Close()
	goR, goW, err := os.Pipe()
	if err != nil {
		readyW.Close()
		return err
	}
	// Closed without the go-ahead (create failed), it ends the monitor.
	defer goW.Close()
	self, err := os.Executable()
	if err != nil {
		readyW.Close()
		goR.Close()
		return err
	}
	monitor = exec.Command(self, append(globalArgs(ctx), "vm-monitor", "--state-dir", dir)...)
	// The monitor's stdio is the container's: conmon's pipes.
	monitor.Stdin, monitor.Stdout, monitor.Stderr = os.Stdin, os.Stdout, os.Stderr
	// fd 3: the ready pipe; fd vm.GoFD: the go-ahead pipe.
	monitor.ExtraFiles = []*os.File{readyW, goR}
	monitor.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Cloneflags: newNS}
	err = vm.StartIn(joinNS, func() error { return fdutil.WithInheritedHidden(monitor.Start) })
	readyW.Close()
	goR.Close()
	if err != nil {
		return fmt.Errorf("start VM monitor: %w", err)
	}
	rec.Pid = monitor.Process.Pid
	// The host side of the box exists: prestart and createRuntime run
	// here, on the host, in kiwi-shim's namespaces, with the monitor as
	// the container's process. A failure fails create, and the deferred
	// cleanup takes the box. Their state says "creating", as runc's.
	hookState := vmHookState(rec, specs.StateCreating)
	hooksRan = true
	for _, stage := range []string{hooks.Prestart, hooks.CreateRuntime} {
		if err := hooks.Run(context.Background(), stage, hooks.Of(spec.Hooks, stage), hookState); err != nil {
			return err
		}
	}
	ownNetNS := newNS&unix.CLONE_NEWNET != 0
	if ownNetNS {
		// What the hooks put into the monitor's new namespace (a CNI
		// network, say) moves into the guest.
		netPlan = vm.PlanNetworkAt(fmt.Sprintf("/proc/%d/ns/net", rec.Pid))
	}
	e.log.Info("vm network", "id", id, "mode", netPlan.Mode, "why", netPlan.Why)
	guest, shares, err := vm.GuestConfig(spec, oci.RootPath(bundle, spec), share, scratchPath, netPlan)
	if err != nil {
		return err
	}
	guest.DirectDNS = s.VMDNS == "direct"
	var shareFS *vm.ShareFS
	var virtiofs []vm.VirtioFS
	if share == "virtiofs" {
		// Bind mounts carry data the box streams through (a build's
		// description, its images): by default names and attributes are
		// cached and file data goes straight to the reader (see
		// sharefs.CacheMetadata).
		cache := s.ShareCache
		if cache == "" {
			cache = sharefs.CacheMetadata
		}
		// Bind mounts are host directories that host users may reach:
		// by default a guest's device nodes and set-user-ID bits are
		// kept in extended attributes there, never made real (see
		// sharefs.Options.Mapped), and the guest still sees them.
		mapped := true
		if s.ShareMapped != nil {
			mapped = *s.ShareMapped
		}
		shareFS, virtiofs = virtiofsExports(dir, shares, shareFSBin, cache, mapped, ctx.GlobalBool("debug"))
		shares = nil
	}
	mc := vm.MonitorConfig{
		ID: id, QEMU: qemu, Guest: guest, ConsoleSocket: ctx.String("console-socket"),
		BootTimeout: 3 * time.Minute, ShareFS: shareFS, Cgroup: rec.Cgroup,
		NetNS: netPlan.NetNS, NetNSOwned: ownNetNS,
		Machine: vm.Machine{
			QEMU: qemu, Arch: arch, Accel: accel.Name, MemoryMiB: memMiB, CPUs: cpus,
			Kernel: bootImage, Initrd: initrd, Shares: shares, VirtioFS: virtiofs, Network: netPlan.Mode, Disks: disks,
		},
	}
	mc.Paths(dir)
	b, err := json.MarshalIndent(mc, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, vm.MonitorConfigFile), b, 0o600); err != nil {
		return err
	}
	if _, err := fmt.Fprintln(goW, "go"); err != nil {
		return fmt.Errorf("VM monitor: go-ahead: %w", err)
	}
	goW.Close()
	line, _ := bufio.NewReader(readyR).ReadString('\n')
	line = strings.TrimSpace(line)
	if msg, ok := strings.CutPrefix(line, "error "); ok {
		monitor.Wait()
		return errors.New(msg)
	}
	if line != "ok" {
		monitor.Process.Kill()
		monitor.Wait()
		return fmt.Errorf("VM monitor died during boot (guest console: %s)", filepath.Join(dir, "console.log"))
	}
	if err := store.Save(rec); err != nil {
		return err
	}
	if p := ctx.String("pid-file"); p != "" {
		if err := state.WritePidFile(p, rec.Pid); err != nil {
			return err
		}
	}
	// conmon (a subreaper) inherits the monitor when we exit.
	monitor.Process.Release()
	return nil
}

// vmHooksSupported refuses createContainer and startContainer hooks in
// VM mode. They are to run in the container's namespaces (its mount
// namespace, before and after pivot_root), to change what the container
// sees: the container's namespaces are in the guest, and the hook is a
// host program. Running them on the host would do their work (mounts,
// ldconfig, device nodes) to the host instead, so they are refused.
func vmHooksSupported(h *specs.Hooks) error {
	for _, stage := range []string{hooks.CreateContainer, hooks.StartContainer} {
		if hs := hooks.Of(h, stage); len(hs) > 0 {
			return fmt.Errorf("%s hooks (%s) are not supported in VM mode: they run in the container's namespaces, which are inside the VM, where host programs cannot run; use container mode (annotation %s=container)", stage, hs[0].Path, oci.AnnotationMode)
		}
	}
	return nil
}

// vmHookState is the state a VM container's hooks get: the caller's
// bundle, and the monitor's pid (the one --pid-file got).
func vmHookState(rec *state.Container, status specs.ContainerState) specs.State {
	st := specs.State{Version: specs.Version, ID: rec.ID, Status: status, Bundle: rec.Bundle, Annotations: rec.Annotations}
	if status != specs.StateStopped {
		st.Pid = rec.Pid
	}
	return st
}

// globalArgs repeats this invocation's global settings for a helper.
func globalArgs(ctx *cli.Context) []string {
	var args []string
	for _, g := range []string{"config", "log", "log-format", "root"} {
		// --root has a default that only root may use: pass it on only
		// when given, so that a rootless helper picks its own.
		if v := ctx.GlobalString(g); v != "" && (g != "root" || ctx.GlobalIsSet(g)) {
			args = append(args, "--"+g, v)
		}
	}
	if ctx.GlobalBool("debug") {
		args = append(args, "--debug")
	}
	return args
}

// vmState answers `state` for a VM container from its monitor.
func vmState(rec *state.Container, dir string) *state.OCI {
	st := &state.OCI{
		OCIVersion: specs.Version, ID: rec.ID, Bundle: rec.Bundle, Annotations: rec.Annotations,
		Created: rec.Created.Format(time.RFC3339Nano), Owner: "root", Status: "stopped",
	}
	if ms, err := vm.QueryState(dir); err == nil {
		st.Status, st.Pid = ms.Status, ms.Pid
	}
	return st
}
