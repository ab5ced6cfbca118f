// Package devcgroup widens a running container's device cgroup by exact
// device numbers, and narrows it back: what the loop keeper needs to hand a
// container the partitions that appear on its leased loop devices.
//
// Threat model: the container runs as root with CAP_MKNOD, so its device
// cgroup is what keeps it from the host's disks. Every change here allows
// exactly one block device number at a time (never a wildcard: major 259
// is shared with NVMe namespaces), and on cgroup v2 the runtime's filter
// is swapped for the new one with the kernel's replace semantics, so that
// the cgroup is never without a filter.
//
// cgroup v1 has a devices controller with devices.allow and devices.deny.
// cgroup v2 has none: runc attaches an eBPF program to the container's
// cgroup that allows the devices of its config. The v2 Access rebuilds
// that program from the rules runc computed (read from runc's state.json)
// plus the extra devices, with github.com/opencontainers/cgroups, the
// library runc itself uses. With the systemd cgroup manager, systemd
// attaches a device program of its own to the container's scope, built
// from the scope's DeviceAllow list; programs on a cgroup are ANDed, so
// the v2 Access sets that list over D-Bus too.
package devcgroup

import (
	"cmp"
	"context"
	"fmt"
	"slices"
)

// Dev is a block device number.
type Dev struct {
	Major, Minor uint32
}

// String is the devices cgroup rule that allows d.
func (d Dev) String() string { return fmt.Sprintf("b %d:%d rwm", d.Major, d.Minor) }

// Access is the device cgroup of one container as the keeper changes it.
type Access interface {
	// Set makes extra the block devices the container may use beyond
	// what its runtime allowed: devices in an earlier Set and not in
	// extra are denied again.
	Set(ctx context.Context, extra []Dev) error
	// String says which mechanism this is, for logs.
	String() string
}

// normalize returns devs sorted without duplicates.
func normalize(devs []Dev) []Dev {
	out := slices.Clone(devs)
	slices.SortFunc(out, func(a, b Dev) int {
		return cmp.Or(cmp.Compare(a.Major, b.Major), cmp.Compare(a.Minor, b.Minor))
	})
	return slices.Compact(out)
}
