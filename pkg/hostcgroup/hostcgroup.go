// Package hostcgroup puts the host processes of a VM-mode container (its
// monitor, QEMU and kiwi-sharefs) into the cgroup the container's
// config.json names (linux.cgroupsPath), so that an engine's accounting of
// the container (`ctr task metrics`, crictl stats, a kubelet's pod cgroup)
// covers the VM that runs it. It creates, joins and removes cgroups with
// containerd's cgroups library, on cgroup v1 (every mounted controller) and
// v2 alike.
//
// Of the spec's limits, the CPU controls are written (shares or weight,
// quota and period, realtime budget, cpuset): they bound the VM's host
// processes as they would bound runc's, and the guest's CPU count follows
// the quota as well. Memory and PID limits are not written: the guest's
// memory is sized from the memory limit and its kernel enforces it and
// the PID limit inside the box, while QEMU's own memory and threads on
// the host exceed what the container's processes use.
package hostcgroup

import (
	"errors"
	"fmt"
	"os"
	"path"
	"strings"
	"time"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// unifiedRoot is where the cgroup v2 hierarchy is mounted.
const unifiedRoot = "/sys/fs/cgroup"

// Path checks a linux.cgroupsPath and returns the cgroupfs path to use.
// An empty result with a nil error means "no cgroup": the spec names none.
// systemd's "slice:prefix:name" form is an error (kiwi-shim manages
// cgroupfs paths only, like runc without --systemd-cgroup); a relative path
// is taken below the hierarchy's root (runc would take it below its own
// cgroup; engines pass absolute paths).
func Path(cgroupsPath string) (string, error) {
	if cgroupsPath == "" {
		return "", nil
	}
	if strings.Contains(cgroupsPath, ":") {
		return "", fmt.Errorf("cgroups path %q: systemd cgroup paths are not supported in VM mode (use the cgroupfs driver)", cgroupsPath)
	}
	p := path.Clean("/" + cgroupsPath)
	if p == "/" {
		return "", fmt.Errorf("cgroups path %q: the root cgroup cannot be a container's", cgroupsPath)
	}
	return p, nil
}

// Create makes the cgroup p (from Path) in every controller. It is fine
// when it exists.
func Create(p string) error {
	if cgroups.Mode() == cgroups.Unified {
		if _, err := cgroup2.NewManager(unifiedRoot, p, &cgroup2.Resources{}); err != nil {
			return fmt.Errorf("create cgroup %s: %w", p, err)
		}
		return nil
	}
	if _, err := cgroup1.New(cgroup1.StaticPath(p), &specs.LinuxResources{}); err != nil {
		return fmt.Errorf("create cgroup %s: %w", p, err)
	}
	return nil
}

// SetCPU writes the CPU controls of cpu (shares or weight, quota and
// period, realtime budget, cpuset) into the cgroup p, made by Create.
// A nil cpu writes nothing.
func SetCPU(p string, cpu *specs.LinuxCPU) error {
	cpu = setCPUFields(cpu)
	if cpu == nil {
		return nil
	}
	res := &specs.LinuxResources{CPU: cpu}
	if cgroups.Mode() == cgroups.Unified {
		// NewManager of an existing cgroup enables the controllers the
		// resources need in its parents and writes them.
		if _, err := cgroup2.NewManager(unifiedRoot, p, cgroup2.ToResources(res)); err != nil {
			return fmt.Errorf("cgroup %s: cpu controls: %w", p, err)
		}
		return nil
	}
	cg, err := cgroup1.Load(cgroup1.StaticPath(p))
	if err == nil {
		err = cg.Update(res)
	}
	if err != nil {
		return fmt.Errorf("cgroup %s: cpu controls: %w", p, err)
	}
	return nil
}

// setCPUFields returns the CPU controls of cpu that are set, as runc
// reads them: a zero value means "leave it" (engines send zero shares or
// realtime periods for "unset", which the kernel refuses as values), and
// nil when none is set.
func setCPUFields(cpu *specs.LinuxCPU) *specs.LinuxCPU {
	if cpu == nil {
		return nil
	}
	c := *cpu
	for _, u := range []**uint64{&c.Shares, &c.Period, &c.RealtimePeriod, &c.Burst} {
		if *u != nil && **u == 0 {
			*u = nil
		}
	}
	for _, i := range []**int64{&c.Quota, &c.RealtimeRuntime} {
		if *i != nil && **i == 0 {
			*i = nil
		}
	}
	if c.Idle != nil && *c.Idle == 0 {
		c.Idle = nil
	}
	if c == (specs.LinuxCPU{}) {
		return nil
	}
	return &c
}

// Join moves process pid into the cgroup p, made by Create.
func Join(p string, pid int) error {
	if cgroups.Mode() == cgroups.Unified {
		m, err := cgroup2.Load(p)
		if err == nil {
			err = m.AddProc(uint64(pid))
		}
		if err != nil {
			return fmt.Errorf("join cgroup %s: %w", p, err)
		}
		return nil
	}
	cg, err := cgroup1.Load(cgroup1.StaticPath(p))
	if err == nil {
		err = cg.AddProc(uint64(pid))
	}
	if err != nil {
		return fmt.Errorf("join cgroup %s: %w", p, err)
	}
	return nil
}

// Leave moves process pid to the root cgroup of every controller (the
// only cgroup v2 always accepts a process into). A monitor removing its
// own container leaves the container's cgroup first: the kernel refuses
// to remove a cgroup that holds a process.
func Leave(pid int) error { return Join("/", pid) }

// Remove deletes the cgroup p. Its processes must be gone; processes that
// are still exiting are waited for up to timeout. A cgroup that does not
// exist is not an error.
func Remove(p string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		err := remove(p)
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func remove(p string) error {
	if cgroups.Mode() == cgroups.Unified {
		m, err := cgroup2.Load(p)
		if err == nil {
			err = m.Delete()
		}
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove cgroup %s: %w", p, err)
		}
		return nil
	}
	cg, err := cgroup1.Load(cgroup1.StaticPath(p))
	if errors.Is(err, cgroup1.ErrCgroupDeleted) || errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err == nil {
		err = cg.Delete()
	}
	if err != nil {
		return fmt.Errorf("remove cgroup %s: %w", p, err)
	}
	return nil
}
