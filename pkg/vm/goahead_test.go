package vm

import (
	"os"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// TestWaitGoAhead: the monitor boots only on create's go-ahead line; a
// pipe closed without it (create failed or died) or with anything else
// ends the monitor.
func TestWaitGoAhead(t *testing.T) {
	for _, tc := range []struct {
		name, write string
		want        bool
	}{
		{"go-ahead", "go\n", true},
		{"closed without a word", "", false},
		{"no newline", "go", false},
		{"another word", "stop\n", false},
		{"endless line", string(make([]byte, 4096)), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			go func() {
				w.WriteString(tc.write)
				w.Close()
			}()
			if got := waitGoAhead(r); got != tc.want {
				t.Errorf("waitGoAhead after %q = %v, want %v", tc.write, got, tc.want)
			}
		})
	}
}

// TestNewNamespaces: the monitor is born in the new network, UTS and IPC
// namespaces the spec asks for, never in one the spec names by path
// (those stay the guest's business or the engine's) nor in new mount,
// PID, user or cgroup namespaces (the monitor needs the host's).
func TestNewNamespaces(t *testing.T) {
	ns := func(kinds ...specs.LinuxNamespaceType) *specs.Spec {
		s := &specs.Spec{Linux: &specs.Linux{}}
		for _, k := range kinds {
			s.Linux.Namespaces = append(s.Linux.Namespaces, specs.LinuxNamespace{Type: k})
		}
		return s
	}
	withPath := ns(specs.NetworkNamespace, specs.UTSNamespace)
	withPath.Linux.Namespaces[0].Path = "/run/netns/x"
	for _, tc := range []struct {
		name string
		spec *specs.Spec
		want uintptr
	}{
		{"no linux section", &specs.Spec{}, 0},
		{"none", ns(), 0},
		{"runc's default set", ns(specs.PIDNamespace, specs.NetworkNamespace, specs.IPCNamespace, specs.UTSNamespace, specs.MountNamespace),
			unix.CLONE_NEWNET | unix.CLONE_NEWIPC | unix.CLONE_NEWUTS},
		{"network by path", withPath, unix.CLONE_NEWUTS},
		{"user and cgroup only", ns(specs.UserNamespace, specs.CgroupNamespace), 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := NewNamespaces(tc.spec); got != tc.want {
				t.Errorf("NewNamespaces = %#x, want %#x", got, tc.want)
			}
		})
	}
}
