package oci

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// AnnotationLoopLease names the loop devices that Kubernetes allocated to
// the container through kiwi-shim's device plugin (resource
// kiwi-shim.io/loop): the plugin leased them in the host's allocator
// under an allocation id and sets this annotation in its Allocate
// answer; the kubelet passes it into the container's CRI config and
// containerd into the OCI spec (it is listed in container_annotations).
// The container's keeper then adopts exactly that lease instead of
// leasing devices of its own. Value: "ID:loopA loopB", ID being 32
// lower-case hex digits, the devices separated by single spaces (not
// commas: podman's and nerdctl's --annotation split their argument at
// commas).
const AnnotationLoopLease = "io.kiwi-shim.loop.lease"

// maxLeaseDevices bounds the devices one lease annotation may name, as
// io.kiwi-shim.loop.count is bounded.
const maxLeaseDevices = 256

// maxLoopIndex is one past the highest loop device index (20-bit minors).
const maxLoopIndex = 1 << 20

// LoopLease is a parsed io.kiwi-shim.loop.lease annotation.
type LoopLease struct {
	// ID identifies the allocation at the device plugin that made it.
	ID string
	// Devices are the allocated devices' kernel names, "loopN", in the
	// plugin's order, each once.
	Devices []string
}

// String formats the lease as the annotation's value.
func (l LoopLease) String() string {
	return l.ID + ":" + strings.Join(l.Devices, " ")
}

// ParseLoopLease parses and checks an io.kiwi-shim.loop.lease value. The
// value may come from a pod's annotations as much as from the device
// plugin, so it is held to the exact form the plugin writes.
func ParseLoopLease(v string) (LoopLease, error) {
	id, list, ok := strings.Cut(v, ":")
	if !ok {
		return LoopLease{}, errors.New(`want "ID:loopA loopB"`)
	}
	if err := validLeaseID(id); err != nil {
		return LoopLease{}, err
	}
	names := strings.Split(list, " ")
	if len(names) > maxLeaseDevices {
		return LoopLease{}, fmt.Errorf("%d devices: at most %d", len(names), maxLeaseDevices)
	}
	seen := make(map[string]bool, len(names))
	for _, n := range names {
		if err := validLoopName(n); err != nil {
			return LoopLease{}, err
		}
		if seen[n] {
			return LoopLease{}, fmt.Errorf("%s named twice", n)
		}
		seen[n] = true
	}
	return LoopLease{ID: id, Devices: names}, nil
}

func validLeaseID(id string) error {
	if len(id) != 32 {
		return fmt.Errorf("allocation id %.40q: want 32 lower-case hex digits", id)
	}
	for _, c := range id {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return fmt.Errorf("allocation id %.40q: want 32 lower-case hex digits", id)
		}
	}
	return nil
}

// validLoopName accepts "loopN" with N in canonical decimal form.
func validLoopName(n string) error {
	digits, ok := strings.CutPrefix(n, "loop")
	i, err := strconv.Atoi(digits)
	if !ok || err != nil || i < 0 || i >= maxLoopIndex || strconv.Itoa(i) != digits {
		return fmt.Errorf("device %.40q: want a loop device name such as loop3", n)
	}
	return nil
}
