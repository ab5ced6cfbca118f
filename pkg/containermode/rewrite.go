package containermode

import (
	"encoding/json"
	"fmt"
	"os"
	"slices"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
)

// Device is a host device node to hand to the container.
type Device struct {
	// Path is the node's path, the same inside the container.
	Path string
	// Type is "b" or "c".
	Type string
	// Major and Minor are the device numbers.
	Major, Minor int64
}

// LoopControl is /dev/loop-control, handed out only on request.
var LoopControl = Device{Path: "/dev/loop-control", Type: "c", Major: 10, Minor: 237}

// Rewrite returns a copy of s for runc: the rootfs path made absolute
// (the copy lives in another bundle directory), the devices added as nodes
// with device-cgroup rules, KIWI's capabilities added, and /sys/dev/block
// unmasked (lsblk and KIWI read it to find partitions).
func Rewrite(s *specs.Spec, rootfs string, devs []Device) (*specs.Spec, error) {
	out, err := WithRoot(s, rootfs)
	if err != nil {
		return nil, err
	}
	if out.Linux == nil {
		out.Linux = &specs.Linux{}
	}
	if out.Linux.Resources == nil {
		out.Linux.Resources = &specs.LinuxResources{}
	}
	zero := uint32(0)
	mode := os.FileMode(0o660)
	for _, d := range devs {
		out.Linux.Devices = slices.DeleteFunc(out.Linux.Devices, func(x specs.LinuxDevice) bool { return x.Path == d.Path })
		out.Linux.Devices = append(out.Linux.Devices, specs.LinuxDevice{
			Path: d.Path, Type: d.Type, Major: d.Major, Minor: d.Minor,
			FileMode: &mode, UID: &zero, GID: &zero,
		})
		major, minor := d.Major, d.Minor
		out.Linux.Resources.Devices = append(out.Linux.Resources.Devices, specs.LinuxDeviceCgroup{
			Allow: true, Type: d.Type, Major: &major, Minor: &minor, Access: "rwm",
		})
	}
	if out.Process != nil {
		AddCapabilities(out.Process)
	}
	out.Linux.MaskedPaths = oci.KIWIMaskedPaths(out.Linux.MaskedPaths)
	return out, nil
}

// WithRoot returns a deep copy of s whose root is rootfs and that is
// otherwise unchanged: what a pod sandbox runs with.
func WithRoot(s *specs.Spec, rootfs string) (*specs.Spec, error) {
	b, err := json.Marshal(s)
	if err != nil {
		return nil, fmt.Errorf("copy spec: %w", err)
	}
	var out specs.Spec
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, fmt.Errorf("copy spec: %w", err)
	}
	if out.Root == nil {
		out.Root = &specs.Root{}
	}
	out.Root.Path = rootfs
	return &out, nil
}

// AddCapabilities gives a process the capabilities KIWI needs. Processes
// that `exec` adds get them too, so that a shell exec'd into a build
// container can run losetup and partx like the build itself.
func AddCapabilities(p *specs.Process) { oci.AddKIWICapabilities(p) }
