// Package settings resolves what kiwi-shim decides per container: its
// mode, its loop devices, and for VM mode the guest's architecture,
// memory, CPUs, scratch disk and how host directories are shared. Each
// setting is decided here once, in one order: the container's
// io.kiwi-shim.* annotation (package oci), then what the spec itself
// asks for (its resource limits, its entrypoint's binary), then the host
// configuration (package config) with its defaults.
package settings

import (
	"fmt"
	"log/slog"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/guestarch"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
	"github.com/kiwi-shim/kiwi-shim/pkg/sharefs"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
)

// Container are the resolved settings of one container.
type Container struct {
	// Mode is the mode the container runs in.
	Mode config.Mode
	// Sandbox is set for a Kubernetes pod's sandbox (pause container):
	// it runs in container mode without loop devices.
	Sandbox bool
	// LoopCount is the number of loop devices container mode leases:
	// those of the Kubernetes allocation (Annotations.LoopLease) if any.
	LoopCount int
	// Scratch is the guest-local scratch disk VM mode gives the box.
	Scratch Scratch
	// VM holds the VM-mode settings; zero in container mode.
	VM VM
	// Annotations are the container's io.kiwi-shim.* annotations the
	// settings were resolved from (container mode reads its loop timeout
	// and /dev/loop-control choice there).
	Annotations oci.Settings
}

// Scratch is a scratch disk: Size bytes (0: none), mounted at Path in
// the container.
type Scratch struct {
	Size int64
	Path string
}

// VM are the settings of a VM-mode container.
type VM struct {
	// Arch is the guest's architecture (x86_64 or aarch64).
	Arch string
	// Share is how host directories reach the guest.
	Share config.ShareKind
	// ShareCache is the guest's caching of bind mounts served by
	// kiwi-sharefs (a sharefs cache mode); the container's root is
	// always cached entirely.
	ShareCache string
	// ShareMapped keeps a guest's device nodes and set-user-ID bits in
	// extended attributes on bind mounts served by kiwi-sharefs (see
	// sharefs.Options.Mapped).
	ShareMapped bool
	// MemoryMiB and CPUs size the guest.
	MemoryMiB int64
	CPUs      int
	// DirectDNS sends the box's name lookups straight to the
	// container's nameservers instead of the guest's forwarder.
	DirectDNS bool
}

// Resolve resolves the settings of the container of spec, whose bundle
// directory is bundle, under the host configuration cfg. The VM-mode
// settings look into the container's root file system (the entrypoint's
// architecture); log gets what was chosen and why.
func Resolve(cfg config.Config, bundle string, spec *specs.Spec, log *slog.Logger) (Container, error) {
	a, err := oci.ParseAnnotations(spec.Annotations)
	if err != nil {
		return Container{}, err
	}
	c := Container{Mode: a.Mode, LoopCount: a.LoopCount, Annotations: a, Sandbox: oci.IsPodSandbox(spec.Annotations)}
	if c.Mode == "" {
		c.Mode = cfg.DefaultMode
	}
	if c.LoopCount == 0 {
		c.LoopCount = cfg.Loop.DefaultCount
	}
	if l := a.LoopLease; l != nil {
		// Kubernetes allocated the devices: the box gets exactly those.
		if a.LoopCount != 0 && a.LoopCount != len(l.Devices) {
			log.Info("the Kubernetes loop allocation decides the device count", "annotation", oci.AnnotationLoopCount, "count", len(l.Devices))
		}
		c.LoopCount = len(l.Devices)
	}
	if c.Sandbox {
		// A pod's pause container runs nothing but holds the namespaces
		// the pod's containers join: no VM, no loop devices.
		if c.Mode != config.ModeContainer {
			log.Info("pod sandbox runs in container mode")
		}
		c.Mode = config.ModeContainer
	}
	if a.ScratchSize > 0 {
		c.Scratch = Scratch{Size: a.ScratchSize, Path: a.ScratchPath}
	}
	if c.Mode != config.ModeVM {
		return c, nil
	}
	c.VM, err = resolveVM(cfg.VM, spec, a, oci.RootPath(bundle, spec), log)
	return c, err
}

// resolveVM resolves the VM-mode settings.
func resolveVM(cfg config.VM, spec *specs.Spec, a oci.Settings, rootfs string, log *slog.Logger) (VM, error) {
	v := VM{
		Arch: guestArch(a, spec, rootfs, log), Share: a.Share, ShareCache: a.ShareCache,
		ShareMapped: true, DirectDNS: a.VMDNS == "direct",
	}
	if v.Share == "" {
		v.Share = cfg.Share
	}
	// Bind mounts carry data the box streams through (a build's
	// description, its images): by default names and attributes are
	// cached and file data goes straight to the reader (see
	// sharefs.CacheMetadata).
	if v.ShareCache == "" {
		v.ShareCache = sharefs.CacheMetadata
	}
	// Bind mounts are host directories that host users may reach: by
	// default a guest's device nodes and set-user-ID bits are kept in
	// extended attributes there, never made real (see
	// sharefs.Options.Mapped), and the guest still sees them.
	if a.ShareMapped != nil {
		v.ShareMapped = *a.ShareMapped
	}
	var err error
	v.MemoryMiB, v.CPUs, err = size(cfg, spec, a)
	return v, err
}

// guestArch is the guest's architecture: io.kiwi-shim.vm.arch, else the
// machine of the entrypoint's binary in the root file system, else the
// host's.
func guestArch(a oci.Settings, spec *specs.Spec, rootfs string, log *slog.Logger) string {
	if arch := guestarch.Normalize(a.VMArch); arch != "" {
		return arch
	}
	if p := spec.Process; p != nil && len(p.Args) > 0 {
		arch, err := guestarch.FromRootfs(rootfs, p.Args[0], p.Cwd, p.Env)
		switch {
		case err != nil:
			log.Debug("guest architecture not taken from the entrypoint", "err", err)
		case !vm.SupportedArch(arch):
			log.Info("the entrypoint is for an architecture VM mode does not run; using the host's", "arch", arch)
		default:
			return arch
		}
	}
	return vm.HostArch()
}

// size returns guest memory (MiB) and CPUs: annotations, then the spec's
// resource limits, then the configuration.
func size(cfg config.VM, spec *specs.Spec, a oci.Settings) (int64, int, error) {
	var res *specs.LinuxResources
	if spec.Linux != nil {
		res = spec.Linux.Resources
	}
	mem := cfg.Memory
	var memBytes int64
	if res != nil && res.Memory != nil && res.Memory.Limit != nil && *res.Memory.Limit > 0 {
		memBytes = *res.Memory.Limit
	}
	if a.VMMemory != "" {
		mem, memBytes = a.VMMemory, 0
	}
	if memBytes == 0 {
		b, err := config.ParseSize(mem)
		if err != nil {
			return 0, 0, fmt.Errorf("guest memory: %w", err)
		}
		memBytes = b
	}
	cpus := cfg.CPUs
	if res != nil && res.CPU != nil && res.CPU.Quota != nil && res.CPU.Period != nil && *res.CPU.Period > 0 && *res.CPU.Quota > 0 {
		cpus = int((uint64(*res.CPU.Quota) + *res.CPU.Period - 1) / *res.CPU.Period)
	}
	if a.VMCPUs > 0 {
		cpus = a.VMCPUs
	}
	return memBytes >> 20, max(cpus, 1), nil
}
