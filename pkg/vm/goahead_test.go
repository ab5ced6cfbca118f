package vm

import (
	"fmt"
	"os"
	"os/exec"
	"reflect"
	"strings"
	"testing"
	"time"

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

// TestNamespacePaths: a namespace named by path must be of the declared
// kind (as runc checks); network, UTS and IPC paths are joined by the
// monitor, the others stay the guest's business.
func TestNamespacePaths(t *testing.T) {
	spec := func(nss ...specs.LinuxNamespace) *specs.Spec {
		return &specs.Spec{Linux: &specs.Linux{Namespaces: nss}}
	}
	for _, tc := range []struct {
		name    string
		spec    *specs.Spec
		join    map[int]string
		wantErr bool
	}{
		{"none", spec(), map[int]string{}, false},
		{"new ones only", spec(specs.LinuxNamespace{Type: specs.NetworkNamespace}), map[int]string{}, false},
		{"network and uts by path", spec(
			specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: "/proc/self/ns/net"},
			specs.LinuxNamespace{Type: specs.UTSNamespace, Path: "/proc/self/ns/uts"},
			specs.LinuxNamespace{Type: specs.PIDNamespace, Path: "/proc/self/ns/pid"}),
			map[int]string{unix.CLONE_NEWNET: "/proc/self/ns/net", unix.CLONE_NEWUTS: "/proc/self/ns/uts"}, false},
		{"wrong kind", spec(specs.LinuxNamespace{Type: specs.CgroupNamespace, Path: "/proc/self/ns/ipc"}), nil, true},
		{"not a namespace", spec(specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: "/proc/self/status"}), nil, true},
		{"missing", spec(specs.LinuxNamespace{Type: specs.IPCNamespace, Path: "/no/such/ns"}), nil, true},
		{"unknown kind", spec(specs.LinuxNamespace{Type: "bogus", Path: "/proc/self/ns/net"}), nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			join, err := NamespacePaths(tc.spec)
			if (err != nil) != tc.wantErr {
				t.Fatalf("NamespacePaths: %v, want error %v", err, tc.wantErr)
			}
			if !tc.wantErr && !reflect.DeepEqual(join, tc.join) {
				t.Errorf("join %v, want %v", join, tc.join)
			}
		})
	}
}

// TestStartIn: a process started by StartIn lives in the joined
// namespace, and the caller's threads stay where they were.
func TestStartIn(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to make a network namespace")
	}
	holder := exec.Command("unshare", "--net", "sleep", "30")
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { holder.Process.Kill(); holder.Wait() }()
	path := fmt.Sprintf("/proc/%d/ns/net", holder.Process.Pid)
	// unshare has made its namespace once it runs sleep.
	deadline := time.Now().Add(5 * time.Second)
	for {
		a, _ := os.Readlink(path)
		b, _ := os.Readlink("/proc/self/ns/net")
		if a != b || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	want, _ := os.Readlink(path)
	self, _ := os.Readlink("/proc/self/ns/net")
	if want == self {
		t.Fatal("unshare --net made no namespace")
	}
	child := exec.Command("readlink", "/proc/self/ns/net")
	var out strings.Builder
	child.Stdout = &out
	if err := StartIn(map[int]string{unix.CLONE_NEWNET: path}, child.Start); err != nil {
		t.Fatal(err)
	}
	child.Wait()
	if got := strings.TrimSpace(out.String()); got != want {
		t.Errorf("child in %s, want %s", got, want)
	}
	if now, _ := os.Readlink("/proc/thread-self/ns/net"); now != self {
		t.Errorf("this thread moved to %s", now)
	}
}
