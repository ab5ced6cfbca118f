package vmmode

import (
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// TestUpdatable: VM mode updates CPU controls only; memory and PID
// limits pass when they are the container's own (CRI sends every field)
// and are refused when they change.
func TestUpdatable(t *testing.T) {
	i64 := func(n int64) *int64 { return &n }
	u64 := func(n uint64) *uint64 { return &n }
	orig := &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: i64(2 << 30)}, Pids: &specs.LinuxPids{Limit: i64(100)}}
	for _, tc := range []struct {
		name string
		req  *specs.LinuxResources
		ok   bool
	}{
		{"nothing", &specs.LinuxResources{}, true},
		{"cpu", &specs.LinuxResources{CPU: &specs.LinuxCPU{Shares: u64(512), Quota: i64(50000), Period: u64(100000)}}, true},
		{"same memory and pids", &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: i64(2 << 30)}, Pids: &specs.LinuxPids{Limit: i64(100)}}, true},
		{"more memory", &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: i64(4 << 30)}}, false},
		{"a swap limit the container had not", &specs.LinuxResources{Memory: &specs.LinuxMemory{Swap: i64(4 << 30)}}, false},
		{"other pids", &specs.LinuxResources{Pids: &specs.LinuxPids{Limit: i64(50)}}, false},
		{"block I/O", &specs.LinuxResources{BlockIO: &specs.LinuxBlockIO{}}, false},
		{"unified", &specs.LinuxResources{Unified: map[string]string{"memory.high": "1"}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := Updatable(tc.req, orig)
			if (err == nil) != tc.ok {
				t.Errorf("Updatable: %v, want ok=%v", err, tc.ok)
			}
		})
	}
	if err := Updatable(&specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: i64(1)}}, &specs.LinuxResources{}); err == nil {
		t.Error("a memory limit on a container created without one was accepted")
	}
}
