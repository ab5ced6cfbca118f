// Package hostcgroup puts the host processes of a VM-mode container (its
// monitor, QEMU and kiwi-sharefs) into the cgroup the container's
// config.json names (linux.cgroupsPath), so that an engine's accounting of
// the container (`ctr task metrics`, crictl stats, a kubelet's pod cgroup)
// covers the VM that runs it. It creates, joins and removes cgroups with
// containerd's cgroups library, on cgroup v1 (every mounted controller) and
// v2 alike. Limits are not written: they size the VM instead.
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
