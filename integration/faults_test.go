package integration

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// faultPhases are the moments a part is killed in.
var faultPhases = []string{"create", "started", "io", "delete"}

// TestFaultMatrix: for every host-side part (VM monitor, QEMU,
// kiwi-sharefs, the containerd shim, and the guest's kernel crashed from
// inside) and every phase (during create, right after start, mid-run with
// writes in flight on the share, during delete), kill -9 that part and
// check that the engine reports the container stopped with a non-zero
// status, that the next delete succeeds, and that no process, mount,
// loop lease, state directory or QEMU is left. Prints the matrix.
func TestFaultMatrix(t *testing.T) {
	guestRelease(t)
	parts := []string{"vm-monitor", "qemu-system-x86_64", "kiwi-sharefs", "guest-kernel", "containerd-shim"}
	marks := map[string]string{}
	why := map[string]string{} // a failed cell's first message
	for _, part := range parts {
		for _, phase := range faultPhases {
			cell := part + "/" + phase
			if part == "guest-kernel" && phase == "create" {
				// Nothing runs in the guest before start: there is no
				// one inside to crash it.
				marks[cell] = "n/a"
				continue
			}
			ran := false
			var first string
			ok := t.Run(cell, func(t *testing.T) {
				ran = true
				r := failureRecorder{TB: t, first: &first}
				if part == "containerd-shim" {
					shimFault(r, phase)
				} else {
					podmanFault(r, part, phase)
				}
			})
			switch {
			case !ran:
				marks[cell] = "-" // not selected by -run
			case ok:
				marks[cell] = "pass"
			default:
				marks[cell] = "FAIL"
				why[cell] = first
			}
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n%-20s", "part \\ phase")
	for _, ph := range faultPhases {
		fmt.Fprintf(&b, " %-8s", ph)
	}
	for _, part := range parts {
		fmt.Fprintf(&b, "\n%-20s", part)
		for _, ph := range faultPhases {
			fmt.Fprintf(&b, " %-8s", marks[part+"/"+ph])
		}
	}
	// The reasons go with the matrix, which is what a truncated CI log
	// keeps.
	for _, part := range parts {
		for _, ph := range faultPhases {
			if w, ok := why[part+"/"+ph]; ok {
				if len(w) > 400 {
					w = w[:400] + "..."
				}
				fmt.Fprintf(&b, "\n%s/%s: %s", part, ph, w)
			}
		}
	}
	t.Log(b.String())
	fmt.Println(b.String())
}

// faultScript is the container's command per phase: a sleeper, a writer
// keeping I/O in flight on the share, or one that ignores SIGTERM so that
// delete has to wait and kill. A guest kernel is crashed during delete from
// inside, by the container when the TERM of delete reaches it.
func faultScript(part, phase string) string {
	switch {
	case phase == "io":
		return "while :; do dd if=/dev/zero of=/share/blob bs=1M count=32 conv=fsync 2>/dev/null; done"
	case phase == "delete" && part == "guest-kernel":
		return "trap 'echo c > /proc/sysrq-trigger' TERM; touch /share/ready; sleep 300 & wait"
	case phase == "delete":
		// The mark tells the test that TERM is ignored from now on.
		return "trap '' TERM; touch /share/ready; sleep 300"
	}
	return "sleep 300"
}

// killPart kills the part of container id: a host process by kill -9, or
// the guest's kernel by a crash from inside.
func killPart(t testing.TB, p *podman, part, id string) {
	t.Helper()
	if part == "guest-kernel" {
		// Ends with the guest: the exec's own status does not matter.
		p.run("", "exec", id, "sh", "-c", "echo c > /proc/sysrq-trigger")
		return
	}
	killProc(t, part, id)
}

// failureRecorder passes everything to the subtest and keeps the text of
// its first failure, for the matrix.
type failureRecorder struct {
	testing.TB
	first *string
}

func (r failureRecorder) note(s string) {
	if *r.first == "" {
		*r.first = s
	}
}

func (r failureRecorder) Errorf(format string, args ...any) {
	r.TB.Helper()
	r.note(fmt.Sprintf(format, args...))
	r.TB.Errorf(format, args...)
}

func (r failureRecorder) Fatalf(format string, args ...any) {
	r.TB.Helper()
	r.note(fmt.Sprintf(format, args...))
	r.TB.Fatalf(format, args...)
}

func (r failureRecorder) Error(args ...any) {
	r.TB.Helper()
	r.note(fmt.Sprint(args...))
	r.TB.Error(args...)
}

func (r failureRecorder) Fatal(args ...any) {
	r.TB.Helper()
	r.note(fmt.Sprint(args...))
	r.TB.Fatal(args...)
}

func podmanFault(t testing.TB, part, phase string) {
	p := newPodman(t, 2, "")
	noVMLeft(t)
	leaveClean(t, "")
	noLinkLeft(t)
	rootfs := busyboxRootfs(t)
	share := t.TempDir()
	// --rootfs ends podman's flags: the volume comes first.
	args := []string{"-v", share + ":/share", "--rootfs", rootfs, "sh", "-c", faultScript(part, phase)}
	if part == "guest-kernel" {
		// podman makes /proc/sysrq-trigger read-only, as the guest now
		// does too.
		args = append([]string{"--security-opt", "unmask=/proc/sysrq-trigger"}, args...)
	}
	var id string
	switch phase {
	case "create":
		// podman create does not run the runtime; start does (create +
		// start): kill the part while that runs.
		id = p.must(append([]string{"create"}, args...)...)
		start := p.cmd("start", id)
		if err := start.Start(); err != nil {
			t.Fatal(err)
		}
		eventually(t, 60*time.Second, part+" of "+id+" running", func() bool { return procOf(part, id) })
		killProc(t, part, id)
		start.Wait()
	default:
		id = p.must(append([]string{"run", "-d"}, args...)...)
		if phase == "io" {
			waitFile(t, filepath.Join(share, "blob"))
		}
		if phase == "delete" {
			waitFile(t, filepath.Join(share, "ready"))
			rm := p.cmd("rm", "-f", "-t", "10", id)
			if err := rm.Start(); err != nil {
				t.Fatal(err)
			}
			time.Sleep(time.Second)     // delete is under way: TERM ignored
			if part != "guest-kernel" { // that one crashed itself on TERM
				killPart(t, p, part, id)
			}
			rm.Wait()
			// The container is gone, or a second rm removes it.
			if r := p.run("", "rm", "-f", id); r.code != 0 && !strings.Contains(r.stderr, "no such container") {
				t.Fatalf("rm after the kill during delete: exit %d: %s", r.code, r.stderr)
			}
			checkNothingOf(t, id)
			return
		}
		killPart(t, p, part, id)
	}
	var code string
	eventually(t, 60*time.Second, "container stopped", func() bool {
		st := p.run("", "inspect", id, "--format", "{{.State.Status}} {{.State.ExitCode}}")
		status, c, _ := strings.Cut(strings.TrimSpace(st.stdout), " ")
		code = c
		return status == "exited" || status == "stopped" || status == "created" && phase == "create"
	})
	if code == "0" && phase != "create" {
		t.Fatalf("exit status 0 after killing %s", part)
	}
	if r := p.run("", "rm", "-f", id); r.code != 0 {
		t.Fatalf("rm: exit %d: %s", r.code, r.stderr)
	}
	checkNothingOf(t, id)
}

func shimFault(t testing.TB, phase string) {
	noVMLeft(t)
	leaveClean(t, "")
	noLinkLeft(t)
	c := startContainerd(t)
	share := t.TempDir()
	id := "fault-" + phase
	// The exits containerd publishes (a zero exit_status is left out).
	var events syncBuffer
	ev := exec.Command(c.ctr, "--address", c.sock, "events")
	ev.Stdout = &events
	if err := ev.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { ev.Process.Kill(); ev.Wait() }()
	args := []string{"run", "-d", "--runtime", "io.containerd.kiwi.v2",
		"--mount", "type=bind,src=" + share + ",dst=/share,options=rbind:rw", c.image, id, "sh", "-c", faultScript("containerd-shim", phase)}
	switch phase {
	case "create":
		run := exec.Command(c.ctr, append([]string{"--address", c.sock, "--namespace", c.ns}, args...)...)
		if err := run.Start(); err != nil {
			t.Fatal(err)
		}
		// The shim is up before it runs kiwi-shim create; kill it once
		// the VM's monitor exists, while create waits for the guest.
		eventually(t, 60*time.Second, "create under way", func() bool { return procOf("vm-monitor", id) })
		killProc(t, "-namespace", id)
		if err := run.Wait(); err == nil {
			t.Fatal("ctr run succeeded although its shim was killed during create")
		}
	case "delete":
		// ctr has no stop with a grace period: the test is the engine
		// that stops (TERM, which the script ignores, then a wait) to
		// delete, and the shim dies in the wait, as with podman rm -t.
		c.must(args...)
		waitFile(t, filepath.Join(share, "ready"))
		c.run("", "task", "kill", id)
		time.Sleep(time.Second)
		killProc(t, "-namespace", id)
	default:
		c.must(args...)
		if phase == "io" {
			waitFile(t, filepath.Join(share, "blob"))
		}
		killProc(t, "-namespace", id)
	}
	eventually(t, 60*time.Second, "task reported stopped or gone", func() bool {
		return !strings.Contains(c.run("", "task", "ls").stdout, "RUNNING")
	})
	if phase != "create" { // a task that never started has no exit
		var exit string
		eventually(t, 30*time.Second, "the task's exit event", func() bool {
			for _, line := range strings.Split(events.String(), "\n") {
				if strings.Contains(line, "/tasks/exit") && strings.Contains(line, `"container_id":"`+id+`"`) {
					exit = line
					return true
				}
			}
			return false
		})
		if !strings.Contains(exit, `"exit_status":`) {
			t.Errorf("exit status 0 after killing the shim: %s", exit)
		}
	}
	c.run("", "task", "delete", "-f", id)
	if r := c.run("", "containers", "rm", id); r.code != 0 && !strings.Contains(r.stderr, "not found") {
		t.Fatalf("containers rm: exit %d: %s", r.code, r.stderr)
	}
	eventually(t, 30*time.Second, "kiwi-shim state removed", func() bool {
		states, _ := filepath.Glob(filepath.Join("/run/kiwi-shim/containerd", c.ns, "containers", "*"))
		return len(states) == 0
	})
	checkNothingOf(t, id)
}

// noLinkLeft checks that the test adds no network interface (a tap, a
// veth end) to the host's namespace.
func noLinkLeft(t testing.TB) {
	t.Helper()
	names := func() map[string]bool {
		ifs, _ := net.Interfaces()
		m := map[string]bool{}
		for _, i := range ifs {
			m[i.Name] = true
		}
		return m
	}
	before := names()
	t.Cleanup(func() {
		for n := range names() {
			if !before[n] {
				t.Errorf("network interface %s left on the host", n)
			}
		}
	})
}

// syncBuffer is a bytes.Buffer that a command writes while the test
// reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// waitFile waits for the container to create a file on its share.
func waitFile(t testing.TB, path string) {
	t.Helper()
	eventually(t, 60*time.Second, path+" written by the container", func() bool {
		_, err := os.Stat(path)
		return err == nil
	})
}

// procOf reports whether a process of the part runs for container id.
func procOf(part, id string) bool { return len(pidsOf(part, id)) > 0 }

// checkNothingOf checks that no process and no mount names container id.
func checkNothingOf(t testing.TB, id string) {
	t.Helper()
	eventually(t, 30*time.Second, "no process of "+id, func() bool {
		procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
		for _, p := range procs {
			if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), id) && !strings.Contains(string(b), "podman") {
				return false
			}
		}
		return true
	})
	if b, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(b), id) {
		t.Errorf("mounts of %s left", id)
	}
}
