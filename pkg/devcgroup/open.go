package devcgroup

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// Options say where Open looks.
type Options struct {
	// RuncState is runc's state.json of the container, needed on
	// cgroup v2; "" when the runtime is not runc.
	RuncState string
	// V1Devices is the cgroup v1 devices controller's mount point;
	// "" means /sys/fs/cgroup/devices.
	V1Devices string
	// V2Root is the cgroup v2 (unified) mount point; "" means
	// /sys/fs/cgroup. Used only when runc recorded no cgroup path.
	V2Root string
}

// ErrNoRuncState is returned on cgroup v2 when the runtime left no runc
// state to rebuild its device filter from (crun keeps none).
var ErrNoRuncState = errors.New("cgroup v2 device filters can only be widened for runc containers (runc's state.json holds the rules of its filter); crun is not supported here")

// Open returns the Access of the device cgroup of process pid, the
// container's init: the v1 devices controller when the process has one
// (v1 and hybrid hosts, as runc decides), else its cgroup v2 directory.
func Open(pid int, o Options) (Access, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return nil, fmt.Errorf("cgroup of %d: %w", pid, err)
	}
	defer f.Close()
	pc, err := parseProcCgroup(io.LimitReader(f, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("cgroup of %d: %w", pid, err)
	}
	if pc.v1Devices != "" {
		root := o.V1Devices
		if root == "" {
			root = "/sys/fs/cgroup/devices"
		}
		dir := filepath.Join(root, pc.v1Devices)
		if _, err := os.Stat(filepath.Join(dir, "devices.allow")); err != nil {
			return nil, fmt.Errorf("devices cgroup of %d: %w", pid, err)
		}
		return NewV1(dir), nil
	}
	if !pc.hasV2 {
		return nil, fmt.Errorf("process %d is in no devices cgroup", pid)
	}
	if o.RuncState == "" {
		return nil, ErrNoRuncState
	}
	st, err := ReadRuncState(o.RuncState)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: %v", ErrNoRuncState, err)
	}
	if err != nil {
		return nil, err
	}
	dir := st.Path
	if dir == "" {
		root := o.V2Root
		if root == "" {
			root = "/sys/fs/cgroup"
		}
		dir = filepath.Join(root, pc.v2)
	}
	var unit Unit
	if st.Systemd {
		unit = NewSystemdUnit(st.Unit)
	}
	return NewV2(dir, st.Devices, unit)
}

// procCgroup is what /proc/PID/cgroup says about device cgroups.
type procCgroup struct {
	v1Devices string // path in the v1 devices hierarchy, "" if none
	v2        string // path in the unified hierarchy
	hasV2     bool
}

// parseProcCgroup reads /proc/PID/cgroup: "ID:CONTROLLERS:PATH" lines,
// "0::PATH" for the unified hierarchy. Paths are cleaned to stay below
// their mount point.
func parseProcCgroup(r io.Reader) (procCgroup, error) {
	var pc procCgroup
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		p := filepath.Clean("/" + parts[2])
		if parts[0] == "0" && parts[1] == "" {
			pc.v2, pc.hasV2 = p, true
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			if c == "devices" {
				pc.v1Devices = p
			}
		}
	}
	return pc, sc.Err()
}
