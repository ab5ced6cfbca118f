package hostcgroup

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/containerd/cgroups/v3"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func TestPath(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		err      bool
	}{
		{"", "", false},
		{"/k8s.io/abc", "/k8s.io/abc", false},
		{"kiwitest/vm1", "/kiwitest/vm1", false},
		{"/a/../b", "/b", false},
		{"/../../x", "/x", false},
		{"/", "", true},
		{"..", "", true},
		{"machine.slice:libpod:abc", "", true},
	} {
		got, err := Path(tc.in)
		if got != tc.want || (err != nil) != tc.err {
			t.Errorf("Path(%q) = %q, %v; want %q, error %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

// TestCreateJoinRemove needs root and a cgroup file system, as the
// container runtimes it serves do.
func TestCreateJoinRemove(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	p := fmt.Sprintf("/kiwi-shim-test-%d", os.Getpid())
	if err := Create(p); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { Remove(p, 5*time.Second) })
	if err := Create(p); err != nil {
		t.Fatalf("second create: %v", err)
	}
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if err := Join(p, cmd.Process.Pid); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		Remove(p, time.Second)
		t.Fatal(err)
	}
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", cmd.Process.Pid))
	if !strings.Contains(string(b), ":"+p+"\n") {
		t.Errorf("process not in %s:\n%s", p, b)
	}
	// Busy: Remove waits, then fails.
	if err := Remove(p, 100*time.Millisecond); err == nil {
		t.Error("removed a cgroup with a live process")
	}
	cmd.Process.Kill()
	cmd.Wait()
	if err := Remove(p, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := Remove(p, time.Second); err != nil {
		t.Fatalf("removing a removed cgroup: %v", err)
	}
	if b, _ := os.ReadFile("/proc/self/cgroup"); strings.Contains(string(b), p) {
		t.Fatal("the test process itself moved")
	}
}

// TestSetCPU writes a spec's CPU controls into the container's cgroup,
// where the kernel shows them (cgroup v1's cpu and cpuset files, or v2's
// cpu.weight and cpu.max), and a nil CPU section writes nothing.
func TestSetCPU(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	p := fmt.Sprintf("/kiwi-shim-test-cpu-%d", os.Getpid())
	if err := Create(p); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { Remove(p, 5*time.Second) })
	if err := SetCPU(p, nil); err != nil {
		t.Fatalf("nil cpu: %v", err)
	}
	shares, quota, period := uint64(512), int64(50000), uint64(100000)
	if err := SetCPU(p, &specs.LinuxCPU{Shares: &shares, Quota: &quota, Period: &period, Cpus: "0"}); err != nil {
		t.Fatal(err)
	}
	read := func(parts ...string) string {
		b, err := os.ReadFile(filepath.Join(append([]string{"/sys/fs/cgroup"}, parts...)...))
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(b))
	}
	want := map[string]string{}
	if cgroups.Mode() == cgroups.Unified {
		want[filepath.Join(p, "cpu.max")] = "50000 100000"
		want[filepath.Join(p, "cpuset.cpus")] = "0"
	} else {
		want[filepath.Join("cpu", p, "cpu.shares")] = "512"
		want[filepath.Join("cpu", p, "cpu.cfs_quota_us")] = "50000"
		want[filepath.Join("cpu", p, "cpu.cfs_period_us")] = "100000"
		want[filepath.Join("cpuset", p, "cpuset.cpus")] = "0"
	}
	for f, w := range want {
		if got := read(f); got != w {
			t.Errorf("%s = %q, want %q", f, got, w)
		}
	}
}

// TestSetCPUFields: zero values are "unset", as runc reads them (nerdctl
// sends a zero realtime period, which the kernel refuses as a value).
func TestSetCPUFields(t *testing.T) {
	u := func(n uint64) *uint64 { return &n }
	i := func(n int64) *int64 { return &n }
	for _, tc := range []struct {
		name string
		in   *specs.LinuxCPU
		want *specs.LinuxCPU
	}{
		{"nil", nil, nil},
		{"all zero", &specs.LinuxCPU{Shares: u(0), Quota: i(0), Period: u(0), RealtimePeriod: u(0), RealtimeRuntime: i(0)}, nil},
		{"shares and a zero realtime period", &specs.LinuxCPU{Shares: u(1024), RealtimePeriod: u(0)}, &specs.LinuxCPU{Shares: u(1024)}},
		{"cpuset only", &specs.LinuxCPU{Cpus: "0-1"}, &specs.LinuxCPU{Cpus: "0-1"}},
		{"negative quota (no limit)", &specs.LinuxCPU{Quota: i(-1), Period: u(100000)}, &specs.LinuxCPU{Quota: i(-1), Period: u(100000)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := setCPUFields(tc.in)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("setCPUFields = %+v, want %+v", got, tc.want)
			}
		})
	}
}
