package vm

import (
	"fmt"
	"os"
	"runtime"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// The monitor is the container's process on the host: the pid of its
// state, which hooks and tools (nsenter, a CNI plugin) use to find the
// container's namespaces. It lives in those of the spec's namespaces that
// it can live in without a change to what it does: network, UTS and IPC,
// new or joined by path. The others (mount, PID, user, cgroup) are the
// guest's business: the container's processes run there.

// monitorNamespace returns the clone flag of a namespace kind the
// monitor lives in, or 0.
func monitorNamespace(t specs.LinuxNamespaceType) int {
	switch t {
	case specs.NetworkNamespace:
		return unix.CLONE_NEWNET
	case specs.UTSNamespace:
		return unix.CLONE_NEWUTS
	case specs.IPCNamespace:
		return unix.CLONE_NEWIPC
	}
	return 0
}

// nsType returns the clone flag of a namespace kind, as NS_GET_NSTYPE
// reports it, or 0 for an unknown kind.
func nsType(t specs.LinuxNamespaceType) int {
	switch t {
	case specs.MountNamespace:
		return unix.CLONE_NEWNS
	case specs.PIDNamespace:
		return unix.CLONE_NEWPID
	case specs.UserNamespace:
		return unix.CLONE_NEWUSER
	case specs.CgroupNamespace:
		return unix.CLONE_NEWCGROUP
	case specs.TimeNamespace:
		return unix.CLONE_NEWTIME
	}
	return monitorNamespace(t)
}

// NewNamespaces returns the clone flags of the namespaces the spec asks
// to be made new (no path) that the monitor is born in.
func NewNamespaces(spec *specs.Spec) uintptr {
	if spec.Linux == nil {
		return 0
	}
	var flags uintptr
	for _, ns := range spec.Linux.Namespaces {
		if f := monitorNamespace(ns.Type); f != 0 && ns.Path == "" {
			flags |= uintptr(f)
		}
	}
	return flags
}

// NamespacePaths checks every namespace the spec names by path, as runc
// does: the path must be a namespace of the declared kind. It returns
// those the monitor joins (network, UTS, IPC), as clone flag to path.
func NamespacePaths(spec *specs.Spec) (map[int]string, error) {
	if spec.Linux == nil {
		return nil, nil
	}
	join := map[int]string{}
	for _, ns := range spec.Linux.Namespaces {
		if ns.Path == "" {
			continue
		}
		want := nsType(ns.Type)
		if want == 0 {
			return nil, fmt.Errorf("namespace %q: unknown type", ns.Type)
		}
		got, err := namespaceType(ns.Path)
		if err != nil {
			return nil, fmt.Errorf("%s namespace path %s: %w", ns.Type, ns.Path, err)
		}
		if got != want {
			return nil, fmt.Errorf("%s namespace path %s is a namespace of another type", ns.Type, ns.Path)
		}
		if f := monitorNamespace(ns.Type); f != 0 {
			join[f] = ns.Path
		}
	}
	return join, nil
}

// namespaceType returns the clone flag of the namespace at path.
func namespaceType(path string) (int, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	t, err := unix.IoctlRetInt(int(f.Fd()), unix.NS_GET_NSTYPE)
	if err != nil {
		return 0, fmt.Errorf("not a namespace: %w", err)
	}
	return t, nil
}

// StartIn starts cmd (with start, which calls cmd.Start, maybe wrapped)
// in the namespaces join names (clone flag to path): a child inherits
// the namespaces of the thread that forks it, so the fork happens on a
// locked thread that has entered them. That thread is never unlocked: it
// ends with its goroutine, so no other goroutine ever runs in its
// namespaces.
func StartIn(join map[int]string, start func() error) error {
	if len(join) == 0 {
		return start()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		for flag, path := range join {
			f, err := os.Open(path)
			if err != nil {
				errc <- fmt.Errorf("join namespace %s: %w", path, err)
				return
			}
			err = unix.Setns(int(f.Fd()), flag)
			f.Close()
			if err != nil {
				errc <- fmt.Errorf("join namespace %s: %w", path, err)
				return
			}
		}
		errc <- start()
	}()
	return <-errc
}
