package vm

import (
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// maxFileMount bounds a host file that travels into the guest by value
// (resolv.conf, hosts, .containerenv are a few hundred bytes).
const maxFileMount = 1 << 20

// propagations are the mount propagation words of the OCI spec.
var propagations = []string{"shared", "rshared", "slave", "rslave", "private", "rprivate", "unbindable", "runbindable"}

// RootTag is the share tag of the container's root filesystem.
const RootTag = "rootfs"

// GuestConfig translates an OCI spec into what kiwi-box-init needs, and
// lists the host directories QEMU must serve for it.
//
// Bind mounts of directories become shares of their own; bind mounts of
// files (podman's /etc/hosts, /etc/resolv.conf, ...) travel by value,
// because a 9p or virtio-fs share is a directory and sharing the file's
// parent would expose its siblings. The container's /dev is the guest's
// devtmpfs, so that the build sees the box's own loop and partition
// devices.
//
// A scratch disk, when scratchPath is set, is mounted there last.
func GuestConfig(spec *specs.Spec, rootfs string, share config.ShareKind, scratchPath string, netPlan NetworkPlan) (vmproto.Config, []Share, error) {
	p := spec.Process
	cfg := vmproto.Config{
		Network:      netPlan.guestNetwork(),
		Hostname:     spec.Hostname,
		RootTag:      RootTag,
		RootShare:    string(share),
		RootReadonly: spec.Root.Readonly,
		Process:      processFromSpec(p),
	}
	for _, r := range p.Rlimits {
		cfg.Rlimits = append(cfg.Rlimits, vmproto.Rlimit{Type: r.Type, Hard: r.Hard, Soft: r.Soft})
	}
	if l := spec.Linux; l != nil {
		cfg.Sysctl, cfg.ReadonlyPaths, cfg.RootPropagation = l.Sysctl, l.ReadonlyPaths, l.RootfsPropagation
		if prop := l.RootfsPropagation; prop != "" && !slices.Contains(propagations, prop) {
			return cfg, nil, fmt.Errorf("linux.rootfsPropagation %q: want one of %s", prop, strings.Join(propagations, ", "))
		}
		cfg.MaskedPaths = oci.KIWIMaskedPaths(l.MaskedPaths)
		for _, d := range l.Devices {
			gd := vmproto.Device{Path: d.Path, Type: d.Type, Major: d.Major, Minor: d.Minor, UID: d.UID, GID: d.GID}
			if d.FileMode != nil {
				m := uint32(d.FileMode.Perm())
				gd.Mode = &m
			}
			cfg.Devices = append(cfg.Devices, gd)
		}
		userNS, err := guestUserNS(l)
		if err != nil {
			return cfg, nil, err
		}
		cfg.UserNS = userNS
		// A PID namespace to join by path (another container's, the
		// host's) cannot reach into a VM: the process stays in the
		// guest's.
		cfg.PidNS = slices.ContainsFunc(l.Namespaces, func(ns specs.LinuxNamespace) bool { return ns.Type == specs.PIDNamespace && ns.Path == "" })
	}
	shares := []Share{{Tag: RootTag, Path: rootfs, ReadOnly: spec.Root.Readonly}}
	for _, m := range spec.Mounts {
		bind := m.Type == "bind" || slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind")
		if !bind {
			gm := vmproto.Mount{Destination: m.Destination, Type: m.Type, Source: m.Source, Options: m.Options}
			if m.Destination == "/dev" && m.Type == "tmpfs" {
				gm = vmproto.Mount{Destination: "/dev", Type: "devtmpfs", Source: "devtmpfs", Options: []string{"nosuid", "mode=755"}}
			}
			cfg.Mounts = append(cfg.Mounts, gm)
			continue
		}
		fi, err := os.Stat(m.Source)
		if err != nil {
			return cfg, nil, fmt.Errorf("bind mount %s: %w", m.Destination, err)
		}
		ro := slices.Contains(m.Options, "ro")
		switch {
		case fi.IsDir():
			tag := fmt.Sprintf("kiwi%d", len(shares))
			shares = append(shares, Share{Tag: tag, Path: m.Source, ReadOnly: ro})
			cfg.Mounts = append(cfg.Mounts, vmproto.Mount{Destination: m.Destination, Type: "share", Tag: tag, Options: m.Options})
		case fi.Mode().IsRegular():
			content, err := readBounded(m.Source)
			if err != nil {
				return cfg, nil, fmt.Errorf("bind mount %s: %w", m.Destination, err)
			}
			cfg.Mounts = append(cfg.Mounts, vmproto.Mount{Destination: m.Destination, Type: "file", Content: content, Options: m.Options})
		default:
			return cfg, nil, fmt.Errorf("bind mount %s: %s is neither a directory nor a regular file; a VM cannot share host devices (use container mode)", m.Destination, m.Source)
		}
	}
	if scratchPath != "" {
		cfg.Mounts = append(cfg.Mounts, vmproto.Mount{Destination: scratchPath, Type: "disk", Source: ScratchSerial})
	}
	return cfg, shares, nil
}

// guestUserNS is the user namespace the container's processes get in the
// guest, nil when the spec asks for none. Joining one by path cannot
// reach into a VM, as for the other namespaces.
func guestUserNS(l *specs.Linux) (*vmproto.UserNS, error) {
	if !slices.ContainsFunc(l.Namespaces, func(ns specs.LinuxNamespace) bool { return ns.Type == specs.UserNamespace && ns.Path == "" }) {
		return nil, nil
	}
	if len(l.UIDMappings) == 0 || len(l.GIDMappings) == 0 {
		return nil, errors.New("linux.namespaces has a user namespace but linux.uidMappings or linux.gidMappings is empty")
	}
	conv := func(ms []specs.LinuxIDMapping) []vmproto.IDMap {
		out := make([]vmproto.IDMap, len(ms))
		for i, m := range ms {
			out[i] = vmproto.IDMap{ContainerID: m.ContainerID, HostID: m.HostID, Size: m.Size}
		}
		return out
	}
	return &vmproto.UserNS{UIDMappings: conv(l.UIDMappings), GIDMappings: conv(l.GIDMappings)}, nil
}

func processFromSpec(p *specs.Process) vmproto.Process {
	gp := vmproto.Process{
		Args: p.Args, Env: p.Env, Cwd: p.Cwd,
		UID: p.User.UID, GID: p.User.GID, AdditionalGids: p.User.AdditionalGids,
		Umask: p.User.Umask, Terminal: p.Terminal,
	}
	if p.ConsoleSize != nil {
		gp.Rows, gp.Cols = uint16(p.ConsoleSize.Height), uint16(p.ConsoleSize.Width)
	}
	gp.NoNewPrivileges, gp.OOMScoreAdj = p.NoNewPrivileges, p.OOMScoreAdj
	if p.Capabilities != nil {
		// The spec's sets, plus what KIWI needs (as in container mode);
		// without any the process keeps all of the guest root's.
		q := *p
		q.Capabilities = &specs.LinuxCapabilities{}
		*q.Capabilities = *p.Capabilities
		oci.AddKIWICapabilities(&q)
		c := q.Capabilities
		gp.Capabilities = &vmproto.Capabilities{
			Bounding: c.Bounding, Effective: c.Effective, Inheritable: c.Inheritable,
			Permitted: c.Permitted, Ambient: c.Ambient,
		}
	}
	return gp
}

// ProcessFromSpec converts an OCI process (exec's process.json).
func ProcessFromSpec(p *specs.Process) vmproto.Process { return processFromSpec(p) }

func readBounded(p string) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxFileMount+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxFileMount {
		return nil, fmt.Errorf("%s is larger than %d KiB; bind-mount its directory instead", p, maxFileMount>>10)
	}
	return b, nil
}
