package vmmode

import (
	"context"
	"errors"
	"fmt"
	"reflect"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
)

// Update is `update` for a VM-mode container: the CPU controls of req
// are written to the cgroup of the VM's host processes, as runc writes
// them to the container's. Memory, swap and PID limits are fixed for a
// VM's life (guest RAM is sized at boot, and the guest kernel enforces
// the limits inside the box): a request that keeps them as they are (CRI
// sends every field it knows) is accepted, one that changes them is
// refused, and so are the controls VM mode has no equivalent for.
func (m *Manager) Update(_ context.Context, rec *state.Container, req *specs.LinuxResources) error {
	var orig specs.LinuxResources
	if spec, err := oci.LoadSpec(rec.Bundle); err == nil && spec.Linux != nil && spec.Linux.Resources != nil {
		orig = *spec.Linux.Resources
	}
	if err := Updatable(req, &orig); err != nil {
		return err
	}
	if req.CPU == nil || reflect.ValueOf(*req.CPU).IsZero() {
		return nil
	}
	if rec.Cgroup == "" {
		return errors.New("update: this VM-mode container's processes are not in a cgroup of their own (rootless, or no linux.cgroupsPath), so there are no CPU controls to update")
	}
	return m.host().SetCPU(rec.Cgroup, req.CPU)
}

// Updatable refuses the parts of req that VM mode cannot change: a
// memory or PID limit other than the container's own (orig), and the
// block I/O, huge page, network, RDMA and unified controls.
func Updatable(req, orig *specs.LinuxResources) error {
	if m := req.Memory; m != nil {
		var om specs.LinuxMemory
		if orig.Memory != nil {
			om = *orig.Memory
		}
		for _, f := range []struct {
			name      string
			want, was *int64
		}{
			{"memory limit", m.Limit, om.Limit},
			{"memory+swap limit", m.Swap, om.Swap},
			{"memory reservation", m.Reservation, om.Reservation},
			{"kernel TCP memory limit", m.KernelTCP, om.KernelTCP},
		} {
			if f.want != nil && (f.was == nil || *f.want != *f.was) {
				return fmt.Errorf("update: a VM-mode container's %s cannot change: its guest memory is sized at boot; recreate the container (or use container mode, annotation %s=container)", f.name, oci.AnnotationMode)
			}
		}
	}
	if p := req.Pids; p != nil {
		if p.Limit != nil && (orig.Pids == nil || orig.Pids.Limit == nil || *p.Limit != *orig.Pids.Limit) {
			return fmt.Errorf("update: a VM-mode container's PID limit cannot change: the guest kernel enforces it from boot; recreate the container (or use container mode, annotation %s=container)", oci.AnnotationMode)
		}
	}
	if req.BlockIO != nil || len(req.HugepageLimits) > 0 || req.Network != nil || len(req.Rdma) > 0 || len(req.Unified) > 0 {
		return fmt.Errorf("update: only CPU controls can be updated in VM mode (block I/O, huge pages, network, RDMA and unified controls have no counterpart for a VM's host processes)")
	}
	return nil
}
