package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"strconv"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/hostcgroup"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
)

// maxResourcesJSON bounds update's --resources document.
const maxResourcesJSON = 1 << 20

// vmUpdate is update for a VM-mode container: the CPU controls are
// written to the cgroup of the VM's host processes, as runc writes them
// to the container's. Memory, swap and PID limits are fixed for a VM's
// life (guest RAM is sized at boot, and the guest kernel enforces the
// limits inside the box): a request that keeps them as they are (CRI
// sends every field it knows) is accepted, one that changes them is
// refused, and so are the controls VM mode has no equivalent for.
func vmUpdate(ctx *cli.Context, e *env, rec *state.Container) error {
	req, err := updateRequest(ctx)
	if err != nil {
		return err
	}
	var orig specs.LinuxResources
	if spec, err := oci.LoadSpec(rec.Bundle); err == nil && spec.Linux != nil && spec.Linux.Resources != nil {
		orig = *spec.Linux.Resources
	}
	if err := vmUpdatable(req, &orig); err != nil {
		return err
	}
	if req.CPU == nil || reflect.ValueOf(*req.CPU).IsZero() {
		return nil
	}
	if rec.Cgroup == "" {
		return errors.New("update: this VM-mode container's processes are not in a cgroup of their own (rootless, or no linux.cgroupsPath), so there are no CPU controls to update")
	}
	return hostcgroup.SetCPU(rec.Cgroup, req.CPU)
}

// vmUpdatable refuses the parts of req that VM mode cannot change: a
// memory or PID limit other than the container's own (orig), and the
// block I/O, huge page, network, RDMA and unified controls.
func vmUpdatable(req, orig *specs.LinuxResources) error {
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

// updateRequest reads runc update's request: the --resources JSON
// document (a file, or - for stdin), with the single-value flags laid
// over it as runc does. --kernel-memory is ignored, as by runc 1.1 and
// later (the kernel has dropped kernel memory limits).
func updateRequest(ctx *cli.Context) (*specs.LinuxResources, error) {
	r := &specs.LinuxResources{}
	if path := ctx.String("resources"); path != "" {
		var in io.Reader = os.Stdin
		if path != "-" {
			f, err := os.Open(path)
			if err != nil {
				return nil, fmt.Errorf("update --resources: %w", err)
			}
			defer f.Close()
			in = f
		}
		b, err := io.ReadAll(io.LimitReader(in, maxResourcesJSON+1))
		if err != nil {
			return nil, fmt.Errorf("update --resources: %w", err)
		}
		if len(b) > maxResourcesJSON {
			return nil, fmt.Errorf("update --resources: more than %d bytes", maxResourcesJSON)
		}
		if err := json.Unmarshal(b, r); err != nil {
			return nil, fmt.Errorf("update --resources: %w", err)
		}
	}
	cpu := func() *specs.LinuxCPU {
		if r.CPU == nil {
			r.CPU = &specs.LinuxCPU{}
		}
		return r.CPU
	}
	mem := func() *specs.LinuxMemory {
		if r.Memory == nil {
			r.Memory = &specs.LinuxMemory{}
		}
		return r.Memory
	}
	for _, f := range []struct {
		flag string
		set  func(string) error
	}{
		{"cpu-shares", func(v string) error { n, err := strconv.ParseUint(v, 10, 64); cpu().Shares = &n; return err }},
		{"cpu-quota", func(v string) error { n, err := strconv.ParseInt(v, 10, 64); cpu().Quota = &n; return err }},
		{"cpu-period", func(v string) error { n, err := strconv.ParseUint(v, 10, 64); cpu().Period = &n; return err }},
		{"cpuset-cpus", func(v string) error { cpu().Cpus = v; return nil }},
		{"cpuset-mems", func(v string) error { cpu().Mems = v; return nil }},
		{"memory", func(v string) error { n, err := parseMemory(v); mem().Limit = &n; return err }},
		{"memory-swap", func(v string) error { n, err := parseMemory(v); mem().Swap = &n; return err }},
		{"memory-reservation", func(v string) error { n, err := parseMemory(v); mem().Reservation = &n; return err }},
		{"kernel-memory-tcp", func(v string) error { n, err := parseMemory(v); mem().KernelTCP = &n; return err }},
		{"blkio-weight", func(v string) error {
			n, err := strconv.ParseUint(v, 10, 16)
			w := uint16(n)
			r.BlockIO = &specs.LinuxBlockIO{Weight: &w}
			return err
		}},
	} {
		if v := ctx.String(f.flag); ctx.IsSet(f.flag) && v != "" {
			if err := f.set(v); err != nil {
				return nil, fmt.Errorf("update --%s %q: %w", f.flag, v, err)
			}
		}
	}
	if ctx.IsSet("pids-limit") {
		n := int64(ctx.Int("pids-limit"))
		r.Pids = &specs.LinuxPids{Limit: &n}
	}
	for _, f := range []string{"l3-cache-schema", "mem-bw-schema"} {
		if ctx.String(f) != "" {
			return nil, fmt.Errorf("update --%s: Intel RDT is not supported in VM mode", f)
		}
	}
	return r, nil
}

// parseMemory parses a memory flag of runc update: a size (as
// config.ParseSize) or -1 for no limit.
func parseMemory(v string) (int64, error) {
	if v == "-1" {
		return -1, nil
	}
	return config.ParseSize(v)
}
