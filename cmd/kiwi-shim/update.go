package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
)

// maxResourcesJSON bounds update's --resources document.
const maxResourcesJSON = 1 << 20

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
