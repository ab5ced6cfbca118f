package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// shimState returns the status kiwi-shim's own `state` reports for a
// container podman runs (through the test's runtime wrapper, which names
// the test's --root).
func (p *podman) shimState(id string) string {
	p.t.Helper()
	r := run(p.t, nil, p.runtime, "state", id)
	if r.code != 0 {
		return "error: " + strings.TrimSpace(r.stderr)
	}
	for _, l := range strings.Split(r.stdout, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), `"status": "`); ok {
			return strings.TrimSuffix(strings.TrimSuffix(v, ","), `"`)
		}
	}
	return "no status in " + r.stdout
}

// logLines counts the lines of a container's log.
func (p *podman) logLines(id string) int {
	return strings.Count(p.must("logs", id), "\n")
}

// TestVMPause: podman pause stops a VM container's guest (its vCPUs, so
// its output stops) and podman unpause continues it; podman and
// kiwi-shim's state report paused and then running. The runtime refuses
// to pause what does not run and to resume what is not paused, as runc
// does, and a paused container ends with SIGKILL (137) and with podman
// rm -f.
func TestVMPause(t *testing.T) {
	guestRelease(t)
	p := newPodman(t, 2, "")
	noVMLeft(t)
	rootfs := busyboxRootfs(t)
	share := t.TempDir()
	id := p.must("run", "-d", "-v", share+":/share", "--rootfs", rootfs, "sh", "-c", "i=0; while :; do i=$((i+1)); echo $i; sleep 0.2; done")
	eventually(t, 60*time.Second, "output", func() bool { return p.logLines(id) > 2 })

	if r := run(t, nil, p.runtime, "resume", id); r.code == 0 || !strings.Contains(r.stderr, "not paused") {
		t.Fatalf("resume of a running container: exit %d, stderr %q; want an error (not paused)", r.code, r.stderr)
	}
	p.must("pause", id)
	if got := p.must("ps", "-a", "--filter", "id="+id, "--format", "{{.Status}}"); got != "Paused" {
		t.Fatalf("podman ps status %q, want Paused", got)
	}
	if got := p.must("inspect", id, "--format", "{{.State.Status}}"); got != "paused" {
		t.Fatalf("podman inspect %q, want paused", got)
	}
	if got := p.shimState(id); got != "paused" {
		t.Fatalf("kiwi-shim state %q, want paused", got)
	}
	// Lines already on their way may land; then nothing.
	time.Sleep(time.Second)
	n := p.logLines(id)
	time.Sleep(3 * time.Second)
	if m := p.logLines(id); m != n {
		t.Fatalf("the paused container went on: %d log lines, then %d", n, m)
	}
	if r := run(t, nil, p.runtime, "pause", id); r.code == 0 {
		t.Fatal("pause of a paused container succeeded")
	}
	if r := run(t, nil, p.runtime, "exec", id, "true"); r.code == 0 || !strings.Contains(r.stderr, "paused") {
		t.Fatalf("exec in a paused container: exit %d, stderr %q; want refused", r.code, r.stderr)
	}
	p.must("unpause", id)
	if got := p.must("ps", "--filter", "id="+id, "--format", "{{.Status}}"); !strings.HasPrefix(got, "Up") {
		t.Fatalf("podman ps status %q after unpause, want Up", got)
	}
	if got := p.shimState(id); got != "running" {
		t.Fatalf("kiwi-shim state %q after unpause, want running", got)
	}
	eventually(t, 30*time.Second, "output after unpause", func() bool { return p.logLines(id) > n+2 })
	// The shares (virtio-fs, whose rings QEMU stopped and restarted)
	// work after the pause.
	if got := p.must("exec", id, "sh", "-c", "echo resumed > /share/f && cat /share/f"); got != "resumed" {
		t.Fatalf("exec after unpause: %q", got)
	}

	// update: CPU controls reach the cgroup of the VM's host processes
	// (the monitor, the state's pid), as runc writes them to the
	// container's; a memory limit other than the container's is refused.
	p.must("update", "--cpu-shares", "512", id)
	pid := p.must("inspect", id, "--format", "{{.State.Pid}}")
	// The state's pid (the monitor) is in the container's network
	// namespace, as runc's container process is: nsenter -t PID -n
	// reaches podman's network of the container.
	sandbox := p.must("inspect", id, "--format", "{{.NetworkSettings.SandboxKey}}")
	if a, b := nsOf(t, "/proc/"+pid+"/ns/net"), nsOf(t, sandbox); a != b {
		t.Errorf("the state's pid %s is in network namespace %s, podman's is %s (%s)", pid, a, b, sandbox)
	}
	if got := cgroupFile(t, pid, "cpu", "cpu.shares", "cpu.weight"); got != "512" && got != "20" {
		t.Errorf("after podman update --cpu-shares 512 the VM's cgroup has %q", got)
	}
	if r := p.run("", "update", "--memory", "64m", id); r.code == 0 || !strings.Contains(r.stderr, "cannot change") {
		t.Errorf("podman update --memory of a VM: exit %d, stderr %q; want refused", r.code, r.stderr)
	}

	// SIGKILL ends a paused VM (the runtime's kill, as containerd's
	// shim or podman on cgroup v2 sends it without unpausing).
	p.must("pause", id)
	if r := run(t, nil, p.runtime, "kill", id, "KILL"); r.code != 0 {
		t.Fatalf("kill of a paused container: exit %d, stderr %q", r.code, r.stderr)
	}
	eventually(t, 60*time.Second, "the killed container exited", func() bool {
		return p.must("inspect", id, "--format", "{{.State.Status}}") == "exited"
	})
	if got := p.must("inspect", id, "--format", "{{.State.ExitCode}}"); got != "137" {
		t.Fatalf("exit code %s after SIGKILL of the paused container, want 137", got)
	}
	p.must("rm", id)

	// podman rm -f of a paused container.
	id = p.must("run", "-d", "--rootfs", rootfs, "sleep", "600")
	p.must("pause", id)
	p.must("rm", "-f", "-t", "0", id)
	if out := p.must("ps", "-a", "--filter", "id="+id, "--format", "{{.ID}}"); out != "" {
		t.Fatalf("container still listed after rm -f: %q", out)
	}
}

// startErrorCases are programs that cannot be started, with the status
// podman gives and runc's words for them.
var startErrorCases = []struct {
	name, prog string
	code       int
	msg        string
}{
	{"directory", "/etc", 126, `exec: "/etc": permission denied`},
	{"not executable", "/etc/passwd", 126, `exec: "/etc/passwd": permission denied`},
	{"not in PATH", "no-such-program", 127, `exec: "no-such-program": executable file not found in $PATH`},
	{"missing", "/no/such-program", 127, `exec: "/no/such-program": stat /no/such-program: no such file or directory`},
}

// TestStartErrors: podman run and podman exec of a program that cannot be
// started fail with 126 (not executable) or 127 (not found) and runc's
// message, in VM mode as in container mode (runc itself).
func TestStartErrors(t *testing.T) {
	guestRelease(t)
	for _, mode := range []string{"vm", "container"} {
		t.Run(mode, func(t *testing.T) {
			p := newPodman(t, 2, "")
			noVMLeft(t)
			rootfs := busyboxRootfs(t)
			ann := "io.kiwi-shim.mode=" + mode
			for _, tc := range startErrorCases {
				r := p.run("", "run", "--rm", "--annotation", ann, "--rootfs", rootfs, tc.prog)
				if r.code != tc.code || !strings.Contains(r.stderr, tc.msg) {
					t.Errorf("run %s (%s): exit %d, stderr %q; want %d and %q", tc.prog, tc.name, r.code, r.stderr, tc.code, tc.msg)
				}
			}
			id := p.must("run", "-d", "--annotation", ann, "--rootfs", rootfs, "sleep", "600")
			for _, tc := range startErrorCases {
				r := p.run("", "exec", id, tc.prog)
				if r.code != tc.code || !strings.Contains(r.stderr, "exec failed: unable to start container process: "+tc.msg) {
					t.Errorf("exec %s (%s): exit %d, stderr %q; want %d and %q", tc.prog, tc.name, r.code, r.stderr, tc.code, tc.msg)
				}
			}
			// A detached exec that starts still runs to its end.
			if r := p.run("", "exec", "-d", id, "sh", "-c", "echo detached > /tmp/d"); r.code != 0 {
				t.Errorf("exec -d: exit %d, stderr %q", r.code, r.stderr)
			}
			eventually(t, 30*time.Second, "the detached exec's file", func() bool {
				return p.run("", "exec", id, "cat", "/tmp/d").stdout == "detached\n"
			})
			p.must("rm", "-f", "-t", "0", id)
		})
	}
}

// TestPreserveFds: podman run --preserve-fds hands descriptors to a
// container-mode container (runc); VM mode refuses it at create, naming
// the option, rather than starting a box in which the descriptors are
// bad. podman exec --preserve-fds likewise.
func TestPreserveFds(t *testing.T) {
	guestRelease(t)
	p := newPodman(t, 2, "")
	noVMLeft(t)
	rootfs := busyboxRootfs(t)
	withFd := func(args ...string) result {
		f, err := os.Open(filepath.Join(rootfs, "etc/group"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		cmd := p.cmd(args...)
		cmd.ExtraFiles = []*os.File{f} // fd 3
		return runCmd(t, cmd, "")
	}
	r := withFd("run", "--rm", "--preserve-fds", "1", "--annotation", containerMode, "--rootfs", rootfs, "sh", "-c", "head -1 <&3")
	if r.code != 0 || r.stdout != "root:x:0:\n" {
		t.Fatalf("container mode: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	const msg = "--preserve-fds 1 is not supported in VM mode"
	r = withFd("run", "--rm", "--preserve-fds", "1", "--rootfs", rootfs, "sh", "-c", "head -1 <&3")
	if r.code == 0 || !strings.Contains(r.stderr, msg) {
		t.Fatalf("VM mode: exit %d, stdout %q, stderr %q; want a failure saying %q", r.code, r.stdout, r.stderr, msg)
	}
	id := p.must("run", "-d", "--rootfs", rootfs, "sleep", "600")
	r = withFd("exec", "--preserve-fds", "1", id, "sh", "-c", "head -1 <&3")
	if r.code == 0 || !strings.Contains(r.stderr, msg) {
		t.Fatalf("VM mode exec: exit %d, stdout %q, stderr %q; want a failure saying %q", r.code, r.stdout, r.stderr, msg)
	}
	p.must("rm", "-f", "-t", "0", id)
}

// TestVMPidNamespace: with the PID namespace podman asks for, the
// container's process is PID 1 of its own namespace in the guest, as
// under runc: exec'd processes join it, /proc is that namespace's (with
// its masked and read-only paths), and podman stop of a process without a
// TERM handler ends with SIGKILL after the timeout (137). --pid host
// leaves the process in the guest's namespace.
func TestVMPidNamespace(t *testing.T) {
	guestRelease(t)
	p := newPodman(t, 2, "")
	noVMLeft(t)
	rootfs := busyboxRootfs(t)
	// An unbindable mount among those after /proc: moving them behind
	// the namespace's own /proc must keep it, unbindable.
	id := p.must("run", "-d", "-v", t.TempDir()+":/ub:runbindable", "--rootfs", rootfs, "sleep", "600")
	out := p.must("exec", id, "sh", "-c", `tr '\0' ' ' </proc/1/cmdline; echo; echo "guest $(ps -o comm= | grep -c -e kthreadd -e '^init')"; echo "kcore $(wc -c </proc/kcore)"; awk '$5 == "/proc/sys" { print "procsys", $6 }' /proc/self/mountinfo; awk '$5 == "/proc" || $5 == "/dev" || $5 == "/sys" { printf "%s ", $5 } END { print "order" }' /proc/self/mountinfo; awk '$5 == "/ub" { print "ub", $7 }' /proc/self/mountinfo`)
	for _, want := range []string{
		"sleep 600 \n", // PID 1
		"guest 0\n",    // none of the guest's processes (kernel threads, init)
		"kcore 0\n",    // masked on the namespace's /proc
		"procsys ro,",  // read-only there
		// The namespace's /proc in the spec's place in the mount
		// table, as runc's (runtime-tools checks the order).
		"/proc /dev /sys order\n",
		"ub unbindable\n",
	} {
		if !strings.Contains(out+"\n", want) {
			t.Errorf("want %q in\n%s", want, out)
		}
	}
	start := time.Now()
	p.must("stop", "-t", "3", id)
	if got := p.must("inspect", id, "--format", "{{.State.Status}} {{.State.ExitCode}}"); got != "exited 137" {
		t.Fatalf("after stop: %q, want exited 137 (SIGTERM ignored by PID 1, then SIGKILL)", got)
	}
	if d := time.Since(start); d < 3*time.Second {
		t.Fatalf("stop took %s: SIGTERM ended PID 1 before the timeout", d)
	}
	p.must("rm", id)

	r := p.run("", "run", "--rm", "--pid", "host", "--rootfs", rootfs, "sh", "-c", "echo $$")
	if r.code != 0 || strings.TrimSpace(r.stdout) == "1" || strings.TrimSpace(r.stdout) == "" {
		t.Fatalf("--pid host: exit %d, stdout %q, stderr %q; want a guest pid other than 1", r.code, r.stdout, r.stderr)
	}
}

// cgroupFile reads a control file of process pid's cgroup: v1's file in
// the controller's hierarchy, or v2's file (the weight for shares, which
// the kernel converts: 512 shares are weight 20).
func cgroupFile(t *testing.T, pid, controller, v1, v2 string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + pid + "/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.SplitN(l, ":", 3)
		if len(f) != 3 {
			continue
		}
		var path string
		switch {
		case f[0] == "0" && f[1] == "":
			path = filepath.Join("/sys/fs/cgroup", f[2], v2)
		case slices.Contains(strings.Split(f[1], ","), controller):
			path = filepath.Join("/sys/fs/cgroup", controller, f[2], v1)
		default:
			continue
		}
		if c, err := os.ReadFile(path); err == nil {
			return strings.TrimSpace(string(c))
		}
	}
	t.Fatalf("no %s cgroup file for pid %s:\n%s", controller, pid, b)
	return ""
}

// nsOf identifies the namespace at path (a /proc/PID/ns link or a bind
// mount of one) by its device and inode.
func nsOf(t *testing.T, path string) string {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatalf("stat %s: %v", path, err)
	}
	return fmt.Sprintf("%d:%d", st.Dev, st.Ino)
}

// TestVMModulesOnDemand: the box's process starts before the guest has
// loaded the file systems KIWI builds with (xfs, btrfs, vfat, ...), which
// load in the background; a mount that needs one right at the start waits
// for it instead of failing with "unknown filesystem type", and the
// kernel's module requests are answered by kiwi-box-init, never by the
// image's own modprobe. Soon after, all of them are there.
func TestVMModulesOnDemand(t *testing.T) {
	guestRelease(t)
	ensureBox(t)
	p := newPodman(t, 2, "")
	r := p.run("", "run", "--rm", box, "sh", "-c",
		`cat /proc/sys/kernel/modprobe; mount -t btrfs /dev/null /mnt; for i in $(seq 100); do n=$(grep -cwE 'xfs|btrfs|vfat|iso9660|squashfs' /proc/filesystems); [ "$n" = 5 ] && break; sleep 0.1; done; echo "filesystems $n"`)
	t.Logf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	if !strings.HasPrefix(r.stdout, "/proc/1/exe\n") {
		t.Errorf("the kernel's modprobe is not kiwi-box-init (/proc/1/exe): %q", r.stdout)
	}
	if strings.Contains(r.stderr, "unknown filesystem type") || !strings.Contains(r.stderr, "not a block device") {
		t.Errorf("a btrfs mount at the start did not wait for the module: %q", r.stderr)
	}
	if !strings.Contains(r.stdout, "filesystems 5\n") {
		t.Errorf("the later file systems did not all arrive: %q", r.stdout)
	}
}
