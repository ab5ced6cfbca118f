// Package containermode runs a kiwi box as an ordinary container through
// runc (or crun), handing it exactly the loop devices it leased from the
// host allocator instead of the host's /dev.
//
// Threat model: the container runs KIWI as root with CAP_SYS_ADMIN and
// CAP_MKNOD, which it needs for mount, losetup and mknod. What keeps it
// from the host's block devices is the device filter: the devices
// controller on cgroup v1, runc's eBPF program on cgroup v2 (replaced by
// the keeper through pkg/devcgroup when partitions appear). It allows
// only the leased loop devices, their partitions and /dev/loop-control
// when asked for, so a node the container makes for any other device
// cannot be opened. Container mode is therefore weaker isolation than VM
// mode; use VM mode for untrusted descriptions.
package containermode
