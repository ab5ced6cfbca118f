package hostcgroup

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
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
