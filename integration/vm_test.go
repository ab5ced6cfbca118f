package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
)

// guestKernel is the x86_64 guest kernel kiwi-shim boots in these tests,
// found the way kiwi-shim finds it: each test gives kiwi-shim a
// configuration of its own that leaves the kernel and the cache at their
// defaults, which the environment overrides (KIWI_SHIM_CACHE_DIR,
// KIWI_SHIM_KERNEL_VERSION, KIWI_SHIM_KERNEL_FLAVOUR; newPodman forwards
// them).
func guestKernel(t testing.TB) vm.Kernel {
	t.Helper()
	cfg, err := config.Load(filepath.Join(t.TempDir(), "none.toml"), false, config.Default())
	if err != nil {
		t.Fatal(err)
	}
	c := vm.KernelChoice{Version: cfg.VM.KernelVersion, Flavour: cfg.VM.KernelFlavour}
	k, err := vm.FindKernel(cfg.VM.Kernel["x86_64"], c, "x86_64", cfg.CacheDir)
	if err != nil {
		t.Fatalf("%v (make kernel does it)", err)
	}
	return k
}

// guestRelease is the release of the guest kernel `make kernel` unpacked
// into the cache; it differs from the host's, which is how the tests
// prove a command ran inside the VM.
func guestRelease(t testing.TB) string {
	t.Helper()
	rel := guestKernel(t).Release
	var uts syscall.Utsname
	syscall.Uname(&uts)
	host := ""
	for _, c := range uts.Release {
		if c == 0 {
			break
		}
		host += string(rune(c))
	}
	if rel == host {
		t.Fatalf("guest kernel %s is the host's: the tests could not tell guest from host", rel)
	}
	return rel
}

// noVMLeft registers a check that the test left no QEMU behind.
func noVMLeft(t testing.TB) {
	t.Helper()
	count := func() int {
		n := 0
		for _, p := range processes(isQEMU) {
			if fromThisRun(p.Pid) {
				n++
			}
		}
		return n
	}
	before := count()
	t.Cleanup(func() {
		// Give a VM that is powering off a moment.
		deadline := time.Now().Add(10 * time.Second)
		for count() > before && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
		if n := count(); n > before {
			t.Errorf("%d QEMU process(es) left running", n-before)
		}
	})
}

// isQEMU matches QEMU processes.
func isQEMU(argv []string) bool {
	return len(argv) > 0 && strings.HasPrefix(filepath.Base(argv[0]), "qemu-system-")
}

// fromThisRun reports whether a process was started by a command of this
// test binary: such processes inherit testRunEnv (see TestMain) through
// podman, containerd, kiwi-shim and its monitor, so other users' VMs on
// the host do not count as this run's.
func fromThisRun(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	return err == nil && slices.Contains(strings.Split(string(b), "\x00"), testRunEnv+"="+testRun)
}

// TestVMRun: podman run through VM mode runs the command in the guest,
// with the container's environment, user, workdir, stdio and mounts.
func TestVMRun(t *testing.T) {
	rel := guestRelease(t)
	p := newPodman(t, 2, "")
	noVMLeft(t)
	rootfs := busyboxRootfs(t)
	share := t.TempDir()
	os.WriteFile(filepath.Join(share, "in.txt"), []byte("from host\n"), 0o644)

	r := p.run("", "run", "--rm", "--rootfs", rootfs, "sh", "-c", "uname -r; exit 42")
	if r.code != 42 || strings.TrimSpace(r.stdout) != rel {
		t.Fatalf("exit %d, stdout %q, stderr %q; want 42 and the guest release %s", r.code, r.stdout, r.stderr, rel)
	}
	r = p.run("through stdin\n", "run", "--rm", "-i", "--rootfs", rootfs, "cat")
	if r.code != 0 || r.stdout != "through stdin\n" {
		t.Fatalf("stdin: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	r = p.run("", "run", "--rm", "-t", "--rootfs", rootfs, "sh", "-c", "tty")
	if r.code != 0 || !strings.Contains(r.stdout, "/dev/pts/") {
		t.Fatalf("tty: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	r = p.run("", "run", "--rm", "-e", "KIWI=box", "-w", "/share", "--user", "1000:1000",
		"-v", share+":/share", "-v", share+":/ro:ro", "--rootfs", rootfs, "sh", "-c",
		`echo $KIWI $(pwd) $(id -u):$(id -g); cat /share/in.txt; touch /ro/x 2>/dev/null && echo ro-writable || echo ro-refused`)
	if r.code != 0 || r.stdout != "box /share 1000:1000\nfrom host\nro-refused\n" {
		t.Fatalf("env/user/workdir/mounts: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	r = p.run("", "run", "--rm", "-v", share+":/share", "--rootfs", rootfs, "sh", "-c", "echo made in the box > /share/out.txt")
	if b, err := os.ReadFile(filepath.Join(share, "out.txt")); r.code != 0 || err != nil || string(b) != "made in the box\n" {
		t.Fatalf("rw mount: exit %d, stderr %q, host file %q, %v", r.code, r.stderr, b, err)
	}
}

// TestVMCapabilities: the process gets the spec's capabilities plus
// KIWI's (SYS_ADMIN, MKNOD, AUDIT_WRITE, AUDIT_CONTROL), in every set but
// the inheritable one, and no_new_privs, as with runc in container mode;
// exec'd processes too.
func TestVMCapabilities(t *testing.T) {
	guestRelease(t)
	p := newPodman(t, 2, "")
	noVMLeft(t)
	rootfs := busyboxRootfs(t)
	// CHOWN (0) + SYS_ADMIN (21) + MKNOD (27) + AUDIT_WRITE (29) + AUDIT_CONTROL (30)
	const want = "0000000068200001"
	r := p.run("", "run", "-d", "--cap-drop", "all", "--cap-add", "CAP_CHOWN", "--security-opt", "no-new-privileges",
		"--rootfs", rootfs, "sh", "-c", "grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs)' /proc/self/status; sleep 300")
	if r.code != 0 {
		t.Fatalf("run: exit %d: %s", r.code, r.stderr)
	}
	id := strings.TrimSpace(r.stdout)
	var logs string
	eventually(t, 60*time.Second, "the process's capabilities in its log", func() bool {
		logs = p.run("", "logs", id).stdout
		return strings.Contains(logs, "NoNewPrivs")
	})
	for _, set := range []string{"CapEff", "CapPrm", "CapBnd"} {
		if !strings.Contains(logs, set+":\t"+want) {
			t.Errorf("%s: want %s in\n%s", set, want, logs)
		}
	}
	if !strings.Contains(logs, "NoNewPrivs:\t1") {
		t.Errorf("no_new_privs not set:\n%s", logs)
	}
	r = p.run("", "exec", id, "grep", "CapEff", "/proc/self/status")
	if r.code != 0 || !strings.Contains(r.stdout, want) {
		t.Errorf("exec: exit %d, stdout %q, stderr %q; want CapEff %s", r.code, r.stdout, r.stderr, want)
	}
	p.must("rm", "-f", "-t", "0", id)
}

// TestVMLinuxSpec: the spec's linux.devices, linux.sysctl, oomScoreAdj,
// masked and read-only paths, user namespace and mount propagation apply
// in the guest, and mount destinations follow the image's links inside
// its root. With a user namespace, the container's root is uid 100000 of
// the guest, and a file it writes to a share belongs to 100000 on the
// host.
func TestVMLinuxSpec(t *testing.T) {
	guestRelease(t)
	p := newPodman(t, 2, "")
	noVMLeft(t)
	rootfs := busyboxRootfs(t)
	share := t.TempDir()
	if err := os.Chmod(share, 0o777); err != nil {
		t.Fatal(err)
	}
	// A mount under an absolute link of the image lands where the link
	// points in the container's root.
	if err := os.Symlink("/run", filepath.Join(rootfs, "varrun")); err != nil {
		t.Fatal(err)
	}
	linked := t.TempDir()
	if err := os.WriteFile(filepath.Join(linked, "marker"), []byte("linked\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	script := `ls -l /dev/kiwifuse; echo "sysctl $(cat /proc/sys/net/ipv4/ip_forward)"; echo "oom $(cat /proc/self/oom_score_adj)"
echo "uidmap $(cat /proc/self/uid_map)"; echo "kcore $(wc -c </proc/kcore)"
awk '$5 == "/proc/sys" { print "procsys", $6 }' /proc/self/mountinfo
awk '$5 == "/share" { print "shareprop", $7 }' /proc/self/mountinfo
cat /run/linked/marker; echo "nofile $(ulimit -n)"; echo hi >/share/f`
	r := p.run("", "run", "--rm", "--network", "none", "-v", share+":/share:shared", "-v", linked+":/varrun/linked:ro",
		"--device", "/dev/fuse:/dev/kiwifuse", "--sysctl", "net.ipv4.ip_forward=1", "--oom-score-adj", "123",
		"--uidmap", "0:100000:65536", "--gidmap", "0:100000:65536", "--ulimit", "nofile=1000:4000",
		"--rootfs", rootfs, "sh", "-c", script)
	if r.code != 0 {
		t.Fatalf("run: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	fields := func(line string) string { return strings.Join(strings.Fields(line), " ") }
	out := fields(r.stdout)
	for _, want := range []string{
		"10, 229", // the device node, by its numbers
		"sysctl 1", "oom 123", "uidmap 0 100000 65536",
		"kcore 0",     // masked: /dev/null over it
		"procsys ro,", // read-only
		"shareprop shared:",
		"linked",
		"nofile 1000", // the soft limit (the Go helper restores it at exec)
	} {
		if !strings.Contains(out, want) {
			t.Errorf("want %q in\n%s", want, r.stdout)
		}
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(share, "f"), &st); err != nil {
		t.Fatal(err)
	}
	if st.Uid != 100000 || st.Gid != 100000 {
		t.Errorf("file written by the container's root belongs to %d:%d on the host, want 100000:100000", st.Uid, st.Gid)
	}
}

// TestVM9p: io.kiwi-shim.share=9p serves the root file system (with its
// symlinks: busybox's applets) and bind mounts through QEMU's 9p, both
// ways, and read-only mounts stay read-only.
func TestVM9p(t *testing.T) {
	guestRelease(t)
	p := newPodman(t, 2, "")
	noVMLeft(t)
	rootfs := busyboxRootfs(t)
	share := t.TempDir()
	os.WriteFile(filepath.Join(share, "in.txt"), []byte("from host\n"), 0o644)
	r := p.run("", "run", "--rm", "--annotation", "io.kiwi-shim.share=9p", "-v", share+":/share", "-v", share+":/ro:ro",
		"--rootfs", rootfs, "sh", "-c",
		`cat /share/in.txt; echo made in the box > /share/out.txt; touch /ro/x 2>/dev/null && echo ro-writable || echo ro-refused; grep -c ' 9p ' /proc/mounts`)
	if r.code != 0 || !strings.HasPrefix(r.stdout, "from host\nro-refused\n") {
		t.Fatalf("exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	if n := strings.TrimSpace(strings.TrimPrefix(r.stdout, "from host\nro-refused\n")); n == "0" {
		t.Fatalf("no 9p mount in the guest: %q", r.stdout)
	}
	if b, err := os.ReadFile(filepath.Join(share, "out.txt")); err != nil || string(b) != "made in the box\n" {
		t.Fatalf("host file %q, %v", b, err)
	}
}

// TestVMLoopDevices: the build's loop devices, partitions and filesystems
// are the guest's own; the host's loop devices are untouched.
func TestVMLoopDevices(t *testing.T) {
	guestRelease(t)
	p := newPodman(t, 2, "")
	noVMLeft(t)
	rootfs := busyboxRootfs(t, "losetup", "sfdisk", "mke2fs")
	share := t.TempDir()
	img := filepath.Join(share, "disk.img")
	mustRun(t, nil, "truncate", "-s", "64M", img)
	hostLoops, _ := filepath.Glob("/sys/block/loop*/loop")
	// Full paths: busybox sh prefers its own applets to PATH.
	script := `set -e
dev=$(/usr/sbin/losetup -f --show -P /share/disk.img)
printf 'label: dos\n,32M,L\n' | /usr/sbin/sfdisk -q "$dev"
/usr/sbin/losetup -d "$dev"
dev=$(/usr/sbin/losetup -f --show -P /share/disk.img)
/usr/sbin/mke2fs -q -t ext2 "${dev}p1"
mkdir -p /mnt/p1 && mount "${dev}p1" /mnt/p1
echo content > /mnt/p1/file && umount /mnt/p1
/usr/sbin/losetup -d "$dev"
echo ok`
	r := p.run("", "run", "--rm", "-v", share+":/share", "--rootfs", rootfs, "sh", "-c", script)
	if r.code != 0 || !strings.HasSuffix(r.stdout, "ok\n") {
		t.Fatalf("exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	if after, _ := filepath.Glob("/sys/block/loop*/loop"); len(after) != len(hostLoops) {
		t.Fatalf("host loop devices changed: %v -> %v", hostLoops, after)
	}
	// The partition table written in the guest is on the host's file.
	out := mustRun(t, nil, "sfdisk", "--dump", img)
	if !strings.Contains(out, "type=83") {
		t.Fatalf("no Linux partition in the image:\n%s", out)
	}
}

// TestVMDetached: a detached VM container through its lifecycle; exec
// runs in the guest.
func TestVMDetached(t *testing.T) {
	rel := guestRelease(t)
	p := newPodman(t, 2, "")
	noVMLeft(t)
	rootfs := busyboxRootfs(t)
	id := p.must("run", "-d", "--rootfs", rootfs, "sh", "-c", `echo started; trap "echo got-term; exit 3" TERM; while true; do sleep 0.2; done`)
	if got := p.must("inspect", id, "--format", "{{.State.Status}}"); got != "running" {
		t.Fatalf("state %q, want running", got)
	}
	if got := p.must("exec", id, "uname", "-r"); got != rel {
		t.Fatalf("exec ran on %q, want the guest %s", got, rel)
	}
	if r := p.run("", "exec", id, "sh", "-c", "exit 5"); r.code != 5 {
		t.Fatalf("exec exit status %d, want 5", r.code)
	}
	if r := p.run("piped\n", "exec", "-i", id, "cat"); r.stdout != "piped\n" {
		t.Fatalf("exec stdin: %q", r.stdout)
	}
	if r := p.run("", "exec", "-t", id, "sh", "-c", "tty; exit 4"); r.code != 4 || !strings.Contains(r.stdout, "/dev/pts/") {
		t.Fatalf("exec -t: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	eventually(t, 10*time.Second, "log shows started", func() bool { return strings.Contains(p.must("logs", id), "started") })
	p.must("stop", "-t", "20", id)
	if got := p.must("inspect", id, "--format", "{{.State.Status}} {{.State.ExitCode}}"); got != "exited 3" {
		t.Fatalf("after stop: %q, want exited 3 (SIGTERM reached the guest)", got)
	}
	p.must("rm", id)

	id = p.must("run", "-d", "--rootfs", rootfs, "sleep", "100")
	p.must("kill", "-s", "KILL", id)
	if got := p.must("wait", id); got != "137" {
		t.Fatalf("wait after kill -s KILL: %s, want 137", got)
	}
	p.must("rm", id)

	id = p.must("run", "-d", "--rootfs", rootfs, "sleep", "100")
	p.must("rm", "-f", "-t", "0", id)
}

// TestVMCrash: kill -9 of the monitor, of QEMU or of kiwi-sharefs mid-run;
// podman sees the container exit non-zero, and rm cleans up everything.
func TestVMCrash(t *testing.T) {
	guestRelease(t)
	for _, victim := range []string{"vm-monitor", "qemu-system-x86_64", "kiwi-sharefs"} {
		t.Run(victim, func(t *testing.T) {
			p := newPodman(t, 2, "")
			noVMLeft(t)
			rootfs := busyboxRootfs(t)
			id := p.must("run", "-d", "--rootfs", rootfs, "sleep", "100")
			killProc(t, victim, id)
			// podman 4.3's `wait` can race conmon's exit file; poll.
			var code string
			eventually(t, 30*time.Second, "container exited", func() bool {
				st := p.must("inspect", id, "--format", "{{.State.Status}} {{.State.ExitCode}}")
				status, c, _ := strings.Cut(st, " ")
				code = c
				return status == "exited"
			})
			if code == "0" {
				t.Fatalf("podman wait after SIGKILL of %s: %s, want non-zero", victim, code)
			}
			if victim == "kiwi-sharefs" {
				// The monitor says why the box stopped.
				if logs := p.run("", "logs", id); !strings.Contains(logs.stdout+logs.stderr, "kiwi-sharefs, the box's file server, died") {
					t.Errorf("container log does not explain the end: %q %q", logs.stdout, logs.stderr)
				}
			}
			p.must("rm", id)
		})
	}
}

// TestVMBadInput: each bad VM setting fails create in one line naming the
// fix, leaving nothing behind.
func TestVMBadInput(t *testing.T) {
	guestRelease(t)
	for _, tc := range []struct {
		name, config string
		args         []string
		cmd          string
		msg          string
	}{
		{"missing kernel", "[vm.kernel]\nx86_64 = \"/nonexistent/vmlinuz\"\n", nil, "true", "/nonexistent/vmlinuz"},
		{"unknown annotation value", "", []string{"--annotation", "io.kiwi-shim.vm.memory=lots"}, "true", "io.kiwi-shim.vm.memory"},
		{"architecture without QEMU", "[vm.qemu]\naarch64 = \"qemu-system-nonexistent\"\n", []string{"--annotation", "io.kiwi-shim.vm.arch=aarch64"}, "true", "qemu-system-nonexistent not found"},
		// Found missing in the guest, after its mounts: create fails.
		{"program not in the image", "", nil, "/no/such-program", "no such file or directory"},
		{"program not in PATH", "", nil, "no-such-program", "executable file not found in $PATH"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPodman(t, 2, tc.config)
			noVMLeft(t)
			rootfs := busyboxRootfs(t)
			args := append(append([]string{"run", "--rm"}, tc.args...), "--rootfs", rootfs, tc.cmd)
			r := p.run("", args...)
			if r.code == 0 || !strings.Contains(r.stderr, tc.msg) {
				t.Fatalf("exit %d, stderr %q; want failure mentioning %q", r.code, r.stderr, tc.msg)
			}
		})
	}
}

// killProc sends SIGKILL to the process of the container id whose
// executable is exe (or, for kiwi-shim helpers, whose command is exe).
// Matching argv exactly matters: conmon's command line also names the id.
func killProc(t testing.TB, exe, id string) {
	t.Helper()
	for _, pid := range pidsOf(exe, id) {
		if err := syscall.Kill(pid, syscall.SIGKILL); err == nil {
			return
		}
	}
	t.Fatalf("no %s process of %s found", exe, id)
}

// pidsOf lists the processes of container id whose executable (argv[0]'s
// base name) or one of whose arguments is exe; conmon, whose command line
// names every id, is left out.
func pidsOf(exe, id string) []int {
	var out []int
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !strings.Contains(string(b), id) {
			continue
		}
		argv := strings.Split(string(b), "\x00")
		if filepath.Base(argv[0]) != exe && !slices.Contains(argv, exe) || filepath.Base(argv[0]) == "conmon" {
			continue
		}
		pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		out = append(out, pid)
	}
	return out
}

// TestVMScratch: io.kiwi-shim.vm.scratch gives the box a guest-local ext4
// disk at the chosen path, backed by a sparse file that delete removes,
// also when the container is killed.
func TestVMScratch(t *testing.T) {
	guestRelease(t)
	scratchDir := t.TempDir()
	p := newPodman(t, 2, fmt.Sprintf("[vm]\nscratch_dir = %q\n", scratchDir))
	noVMLeft(t)
	rootfs := busyboxRootfs(t)
	script := `set -e
grep " /build " /proc/mounts | cut -d" " -f3
dd if=/dev/zero of=/build/blob bs=1M count=64 2>/dev/null
sync; ls -l /build/blob | tr -s " " | cut -d" " -f5`
	r := p.run("", "run", "--rm", "--annotation", "io.kiwi-shim.vm.scratch=2G:/build", "--rootfs", rootfs, "sh", "-c", script)
	if r.code != 0 || r.stdout != "ext4\n67108864\n" {
		t.Fatalf("exit %d, stdout %q, stderr %q; want an ext4 file system holding the 64 MiB written", r.code, r.stdout, r.stderr)
	}
	if left, _ := os.ReadDir(scratchDir); len(left) != 0 {
		t.Fatalf("scratch images left after podman run --rm: %v", left)
	}

	// Killed while running: delete still removes the image.
	name := "scratch-" + strconv.Itoa(os.Getpid())
	r = p.run("", "run", "-d", "--name", name, "--annotation", "io.kiwi-shim.vm.scratch=1G", "--rootfs", rootfs, "sh", "-c", "touch /scratch/x; sleep 600")
	if r.code != 0 {
		t.Fatalf("run -d: exit %d, stderr %q", r.code, r.stderr)
	}
	imgs, _ := filepath.Glob(filepath.Join(scratchDir, "*.img"))
	if len(imgs) != 1 {
		t.Fatalf("scratch images while running: %v, want 1", imgs)
	}
	if r := p.run("", "rm", "-f", "-t", "0", name); r.code != 0 {
		t.Fatalf("rm -f: exit %d, stderr %q", r.code, r.stderr)
	}
	if left, _ := os.ReadDir(scratchDir); len(left) != 0 {
		t.Fatalf("scratch images left after podman rm -f: %v", left)
	}
}

// runVMBundle runs bundle in a VM with kiwi-shim create, start and delete
// under a root in dir (with --debug when inspect is given, which is
// called with the container's state directory before the delete) and
// returns what the box and kiwi-shim printed.
func runVMBundle(t testing.TB, dir, bundle, id string, inspect func(stateDir string)) string {
	t.Helper()
	root := filepath.Join(dir, "root")
	global := []string{"--root", root}
	if inspect != nil {
		global = append(global, "--debug")
	}
	k := func(args ...string) result {
		return run(t, nil, shim(), append(slices.Clone(global), args...)...)
	}
	outPath := filepath.Join(dir, id+".out")
	out, err := os.Create(outPath)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	create := exec.Command(shim(), append(slices.Clone(global), "create", "--bundle", bundle, id)...)
	create.Stdout, create.Stderr = out, out
	if err := create.Run(); err != nil {
		b, _ := os.ReadFile(outPath)
		t.Fatalf("create: %v\n%s", err, b)
	}
	t.Cleanup(func() { k("delete", "--force", id) })
	if r := k("start", id); r.code != 0 {
		t.Fatalf("start: %s", r.stderr)
	}
	eventually(t, 120*time.Second, id+" stopped", func() bool { return strings.Contains(k("state", id).stdout, `"status": "stopped"`) })
	if inspect != nil {
		inspect(filepath.Join(root, "containers", id))
	}
	if r := k("delete", id); r.code != 0 {
		t.Fatalf("delete: %s", r.stderr)
	}
	b, _ := os.ReadFile(outPath)
	return string(b)
}

// TestVMGuestCrashReported: a box whose guest kernel crashes ends at once
// with status 255, and its stderr says so with the kernel's own line, as
// an oops would (oops=panic makes one a panic).
func TestVMGuestCrashReported(t *testing.T) {
	guestRelease(t)
	p := newPodman(t, 2, "")
	noVMLeft(t)
	rootfs := busyboxRootfs(t)
	// podman makes /proc/sysrq-trigger read-only, as the guest then does.
	r := p.run("", "run", "--rm", "--security-opt", "unmask=/proc/sysrq-trigger", "--rootfs", rootfs,
		"sh", "-c", "echo c > /proc/sysrq-trigger; sleep 60")
	if r.code != 255 || !strings.Contains(r.stderr, "kiwi-shim: the VM's kernel crashed: Kernel panic - not syncing: sysrq triggered crash") {
		t.Fatalf("exit %d, stderr %q; want 255 and the guest kernel's panic", r.code, r.stderr)
	}
}

// crashingQEMU writes a QEMU wrapper into a new directory that makes the
// guest kernel of the first crashes boots panic at once (no init:
// "Kernel panic - not syncing: ..."), before kiwi-box-init runs, and
// counts the boots (QEMU calls with -append) in the file boots beside it.
func crashingQEMU(t *testing.T, crashes int) (wrapper, boots string) {
	t.Helper()
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	wrapper, boots = filepath.Join(dir, "qemu-system-x86_64"), filepath.Join(dir, "boots")
	script := fmt.Sprintf(`#!/bin/sh
case " $* " in
*" -append "*)
	n=$(cat %[1]q 2>/dev/null || echo 0)
	n=$((n + 1))
	echo $n >%[1]q
	if [ $n -le %[2]d ]; then
		prev=
		for a do
			shift
			[ "$prev" = -append ] && a="$a rdinit=/nonexistent init=/nonexistent"
			set -- "$@" "$a"
			prev=$a
		done
	fi ;;
esac
exec %[3]q "$@"
`, boots, crashes, qemu)
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return wrapper, boots
}

// bootCount reads crashingQEMU's count of boots.
func bootCount(t *testing.T, boots string) int {
	t.Helper()
	b, _ := os.ReadFile(boots)
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return n
}

// TestVMBootCrashRetried: a guest kernel that crashes during a cold boot,
// before the container's process started, is booted once more (nothing
// of the container ran yet), and the first boot's console is kept as
// console.log.1; a kernel that crashes again ends the box with both
// crashes named. Making a template retries the same way.
func TestVMBootCrashRetried(t *testing.T) {
	guestRelease(t)
	const want = "Kernel panic - not syncing: "
	t.Run("once", func(t *testing.T) {
		wrapper, boots := crashingQEMU(t, 1)
		p := newPodman(t, 2, fmt.Sprintf("[vm]\ntemplate = \"off\"\nqemu = { x86_64 = %q }\n", wrapper))
		noVMLeft(t)
		rootfs := busyboxRootfs(t)
		// Detached, so that the state directory is there to look at.
		r := p.run("", "run", "-d", "--rootfs", rootfs, "sleep", "60")
		id := strings.TrimSpace(r.stdout)
		defer p.run("", "rm", "-f", "-t", "0", id)
		if r.code != 0 {
			t.Fatalf("exit %d, stdout %q, stderr %q; want the box up after the second boot", r.code, r.stdout, r.stderr)
		}
		if r := p.run("", "exec", id, "echo", "hello"); r.code != 0 || r.stdout != "hello\n" {
			t.Fatalf("exec: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
		}
		if n := bootCount(t, boots); n != 2 {
			t.Fatalf("%d boots, want 2", n)
		}
		kept, _ := filepath.Glob(filepath.Join(p.root, "containers", "*", "console.log.1"))
		if len(kept) != 1 {
			t.Fatalf("first boot's console kept as %v, want one console.log.1", kept)
		}
		if b, err := os.ReadFile(kept[0]); err != nil || !strings.Contains(string(b), want) && !strings.Contains(string(b), "Oops: ") {
			t.Fatalf("%s: %v; want the first boot's panic %q in:\n%s", kept[0], err, want, b)
		}
	})
	t.Run("twice", func(t *testing.T) {
		wrapper, boots := crashingQEMU(t, 99)
		p := newPodman(t, 2, fmt.Sprintf("[vm]\ntemplate = \"off\"\nqemu = { x86_64 = %q }\n", wrapper))
		noVMLeft(t)
		rootfs := busyboxRootfs(t)
		r := p.run("", "run", "--rm", "--rootfs", rootfs, "echo", "hello")
		// Each boot's first crash line is the wrapper's panic, or an
		// oops of the kind the retry is for (Oops: int3, seen here once
		// in the first boot of this case, before the panic).
		if r.code == 0 || !strings.Contains(r.stderr, "the VM's kernel crashed during boot: ") || !strings.Contains(r.stderr, "the first boot crashed too: ") || !strings.Contains(r.stderr, want) {
			t.Fatalf("exit %d, stdout %q, stderr %q; want a failure naming both boots' crash", r.code, r.stdout, r.stderr)
		}
		if n := bootCount(t, boots); n != 2 {
			t.Fatalf("%d boots, want 2", n)
		}
	})
	t.Run("template", func(t *testing.T) {
		wrapper, boots := crashingQEMU(t, 1)
		p, dir := templatePodman(t, fmt.Sprintf("qemu = { x86_64 = %q }\n", wrapper))
		noVMLeft(t)
		if out, err := exec.Command(p.runtime, "setup", "--template").CombinedOutput(); err != nil {
			t.Fatalf("setup --template: %v\n%s", err, out)
		}
		if n := bootCount(t, boots); n != 2 {
			t.Fatalf("%d boots, want 2", n)
		}
		if files := templateFiles(t, dir); len(files) != 1 {
			t.Fatalf("templates: %v, want the one made by the second boot", files)
		}
	})
}
