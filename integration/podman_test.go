package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
)

// podman runs the real podman with kiwi-shim as its runtime. Each test gets
// its own kiwi-shim --root (container records), configuration and loop
// allocator directory, so that other users of kiwi-shim on the host
// cannot fail it and it cannot disturb them.
type podman struct {
	t        testing.TB
	conf     string // CONTAINERS_CONF
	shimConf string // kiwi-shim --config
	runtime  string // the wrapper podman runs as its runtime
	root     string // kiwi-shim --root
	loopEnv  []string
	label    string // put on every container the test runs
}

func newPodman(t testing.TB, capacity int, extraConfig string) *podman {
	t.Helper()
	if _, err := exec.LookPath("podman"); err != nil {
		t.Fatal("podman not found: make deps installs it")
	}
	dir := t.TempDir()
	loopDir := filepath.Join(dir, "loop")
	p := &podman{t: t, conf: filepath.Join(dir, "containers.conf"), shimConf: filepath.Join(dir, "kiwi-shim.toml"),
		runtime: filepath.Join(dir, "runtime", "kiwi-shim"), root: filepath.Join(dir, "root")}
	p.loopEnv = []string{"KIWI_SHIM_LOOP_DIR=" + loopDir, fmt.Sprintf("KIWI_SHIM_LOOP_CAPACITY=%d", capacity)}
	// podman hands --runtime-flag to the runtime only in the podman
	// process that got it, not to the cleanup that conmon's exit command
	// runs: a wrapper named kiwi-shim (podman keys runtime_supports_json
	// by that name) gives every call the test's root and configuration,
	// and the run's mark (testRunEnv) whatever environment podman passes.
	// The configuration's environment overrides (a private kernel cache,
	// another kernel: KIWI_SHIM_CACHE_DIR, KIWI_SHIM_KERNEL_VERSION, ...)
	// given to the test reach kiwi-shim the same way, except
	// KIWI_SHIM_VM_TEMPLATE for a test that sets vm.template itself (it
	// compares the two ways, whichever way the suite runs).
	forward := ""
	ownTemplate := strings.Contains(extraConfig, "template = ")
	for _, k := range config.EnvOverrides {
		if k == config.EnvTemplate && ownTemplate {
			continue
		}
		if v, ok := os.LookupEnv(k); ok && !strings.HasPrefix(k, "KIWI_SHIM_LOOP_") {
			forward += fmt.Sprintf("%s=%q ", k, v)
		}
	}
	wrapper := fmt.Sprintf("#!/bin/sh\n%s=%s %sexec %q --root %q --config %q \"$@\"\n", testRunEnv, testRun, forward, shim(), p.root, p.shimConf)
	if err := os.MkdirAll(filepath.Dir(p.runtime), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p.runtime, []byte(wrapper), 0o755); err != nil {
		t.Fatal(err)
	}
	// podman's default rlimits cannot be applied on these hosts (no
	// CAP_SYS_RESOURCE): see ENVIRONMENT.md.
	conf := fmt.Sprintf(`[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime_supports_json = ["crun", "runc", "kiwi-shim"]
%s[engine.runtimes]
kiwi-shim = [%q]
`, cgroupManagerConf(), p.runtime)
	shimConf := fmt.Sprintf("[loop]\ndir = %q\ncapacity = %d\n%s", loopDir, capacity, extraConfig)
	if err := os.WriteFile(p.conf, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p.shimConf, []byte(shimConf), 0o644); err != nil {
		t.Fatal(err)
	}
	p.label = fmt.Sprintf("kiwi-shim.test=%s-%d", t.Name(), time.Now().UnixNano())
	t.Cleanup(func() {
		// A failed test may leave containers running: remove them first.
		ids, _ := p.cmd("ps", "-aq", "--filter", "label="+p.label).Output()
		for _, id := range strings.Fields(string(ids)) {
			p.cmd("rm", "-f", "-t", "0", id).Run()
		}
		// Whatever the test did, nothing of it may remain; podman's
		// cleanup (conmon's exit command) may still be deleting a
		// container that a fault killed: give it the moment the other
		// checks give.
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			ents, _ := os.ReadDir(filepath.Join(p.root, "containers"))
			if len(ents) == 0 && len(status(t, p.loopEnv).Held) == 0 {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if st := status(t, p.loopEnv); len(st.Held) != 0 {
			t.Errorf("loop devices still leased after the test: %+v", st.Held)
		}
		ents, _ := os.ReadDir(filepath.Join(p.root, "containers"))
		for _, e := range ents {
			t.Errorf("state directory left: %s", filepath.Join(p.root, "containers", e.Name()))
		}
	})
	leaveClean(t, dir)
	return p
}

// cgroupManagerEnv names podman's cgroup manager (systemd or cgroupfs)
// for the tests' podman; unset, podman's default for the host. make
// test-cgroup2 runs the container-mode tests once with each.
const cgroupManagerEnv = "KIWI_SHIM_TEST_CGROUP_MANAGER"

// cgroupManagerConf is the [engine] line that sets it, if any.
func cgroupManagerConf() string {
	if m := os.Getenv(cgroupManagerEnv); m != "" {
		return fmt.Sprintf("cgroup_manager = %q\n", m)
	}
	return ""
}

func (p *podman) cmd(args ...string) *exec.Cmd {
	if len(args) > 0 && (args[0] == "run" || args[0] == "create") {
		args = append([]string{args[0], "--label", p.label}, args[1:]...)
	}
	cmd := exec.Command("podman", append([]string{"--runtime", p.runtime}, args...)...)
	cmd.Env = append(os.Environ(), "CONTAINERS_CONF="+p.conf)
	return cmd
}

// run runs podman and returns its output and status.
func (p *podman) run(stdin string, args ...string) result {
	p.t.Helper()
	return runCmd(p.t, p.cmd(args...), stdin)
}

func (p *podman) must(args ...string) string {
	p.t.Helper()
	r := p.run("", args...)
	if r.code != 0 {
		p.t.Fatalf("podman %s: exit %d\n%s%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return strings.TrimSpace(r.stdout)
}

const containerMode = "io.kiwi-shim.mode=container"

// TestContainerModeRun: the basic contract of `podman run` through
// kiwi-shim in container mode: output, exit status, stdin, tty, signals.
func TestContainerModeRun(t *testing.T) {
	p := newPodman(t, 2, "")
	rootfs := busyboxRootfs(t)
	base := []string{"run", "--rm", "--annotation", containerMode, "--rootfs", rootfs}

	r := p.run("", append(base, "sh", "-c", "echo hi; exit 7")...)
	if r.code != 7 || r.stdout != "hi\n" {
		t.Fatalf("exit %d, stdout %q, stderr %q; want 7 and hi", r.code, r.stdout, r.stderr)
	}
	r = p.run("from stdin\n", append([]string{"run", "--rm", "-i", "--annotation", containerMode, "--rootfs", rootfs}, "cat")...)
	if r.code != 0 || r.stdout != "from stdin\n" {
		t.Fatalf("stdin: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	r = p.run("", append([]string{"run", "--rm", "-t", "--annotation", containerMode, "--rootfs", rootfs}, "sh", "-c", "tty")...)
	if r.code != 0 || !strings.Contains(r.stdout, "/dev/pts/") {
		t.Fatalf("tty: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	r = p.run("", append([]string{"run", "--rm", "--annotation", containerMode, "-e", "KIWI=box", "-w", "/tmp", "--user", "1000:1000", "--rootfs", rootfs}, "sh", "-c", "echo $KIWI $(pwd) $(id -u):$(id -g)")...)
	if r.code != 0 || r.stdout != "box /tmp 1000:1000\n" {
		t.Fatalf("env/workdir/user: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	// A signal death is reported as 128+N.
	id := p.must("run", "-d", "--annotation", containerMode, "--rootfs", rootfs, "sleep", "100")
	p.must("kill", "-s", "KILL", id)
	if got := p.must("wait", id); got != "137" {
		t.Fatalf("podman wait after SIGKILL: %s, want 137", got)
	}
	p.must("rm", id)
}

// TestContainerModeDetached: a detached container through its lifecycle.
func TestContainerModeDetached(t *testing.T) {
	p := newPodman(t, 2, "")
	rootfs := busyboxRootfs(t)
	id := p.must("run", "-d", "--annotation", containerMode, "--rootfs", rootfs,
		"sh", "-c", `echo started; trap "echo got-term; exit 3" TERM; while true; do sleep 0.1; done`)
	if got := p.must("inspect", id, "--format", "{{.State.Status}}"); got != "running" {
		t.Fatalf("podman inspect state %q, want running", got)
	}
	if got := p.must("ps", "--filter", "id="+id, "--format", "{{.Status}}"); !strings.HasPrefix(got, "Up") {
		t.Fatalf("podman ps status %q, want Up", got)
	}
	if out := p.must("exec", id, "sh", "-c", "echo in-exec"); out != "in-exec" {
		t.Fatalf("exec output %q", out)
	}
	// exec'd processes get KIWI's capabilities like the build itself
	// (CAP_SYS_ADMIN is bit 21).
	capEff := p.must("exec", id, "sh", "-c", "grep CapEff /proc/self/status | cut -f2")
	if c, err := strconv.ParseUint(capEff, 16, 64); err != nil || c&(1<<21) == 0 {
		t.Fatalf("exec'd process lacks CAP_SYS_ADMIN: CapEff %q", capEff)
	}
	eventually(t, 5*time.Second, "log shows started", func() bool { return strings.Contains(p.must("logs", id), "started") })
	p.must("stop", "-t", "10", id)
	if got := p.must("inspect", id, "--format", "{{.State.Status}} {{.State.ExitCode}}"); got != "exited 3" {
		t.Fatalf("after stop: %q, want exited 3 (SIGTERM reached the trap)", got)
	}
	if out := p.must("logs", id); !strings.Contains(out, "got-term") {
		t.Fatalf("logs %q", out)
	}
	p.must("rm", id)

	// rm -f of a running container.
	id = p.must("run", "-d", "--annotation", containerMode, "--rootfs", rootfs, "sleep", "100")
	p.must("rm", "-f", "-t", "0", id)
	if out := p.must("ps", "-a", "--filter", "id="+id, "--format", "{{.ID}}"); out != "" {
		t.Fatalf("container still listed after rm -f: %q", out)
	}
}

// TestContainerModeLoopDevices: the container sees exactly its leased
// devices and KIWI's `losetup -f --show FILE` works on them.
func TestContainerModeLoopDevices(t *testing.T) {
	p := newPodman(t, 3, "")
	rootfs := busyboxRootfs(t, "losetup")
	img := filepath.Join(t.TempDir(), "disk.img")
	mustRun(t, nil, "truncate", "-s", "16M", img)
	script := `set -e
dev=$(/usr/sbin/losetup -f --show /disk.img)
echo "attached $dev"
/usr/sbin/losetup -a
echo nodes $(ls /dev | grep -c '^loop')
ls /dev/loop-control 2>/dev/null && echo has-control || echo no-control
/usr/sbin/losetup -d "$dev"
`
	r := p.run("", "run", "--rm", "--annotation", containerMode, "--annotation", "io.kiwi-shim.loop.count=2",
		"-v", img+":/disk.img", "--rootfs", rootfs, "sh", "-c", script)
	if r.code != 0 {
		t.Fatalf("exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if !strings.Contains(r.stdout, "attached /dev/loop") || !strings.Contains(r.stdout, "nodes 2\n") || !strings.Contains(r.stdout, "no-control") {
		t.Fatalf("unexpected output:\n%s", r.stdout)
	}
	// Partitions KIWI registers with partx appear in the container (and
	// only those): node and device-cgroup rule made by the loop keeper.
	rootfs = busyboxRootfs(t, "losetup", "sfdisk", "partx", "mke2fs")
	partScript := `set -e
dev=$(/usr/sbin/losetup -f --show /disk.img)
printf 'label: dos\n,8M,L\n' | /usr/sbin/sfdisk -q "$dev"
/usr/sbin/partx -a "$dev"
i=0; while [ ! -b "${dev}p1" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
/usr/sbin/mke2fs -q -t ext2 "${dev}p1"
echo "made ${dev}p1"
# The partition goes and comes back at once, after another device's
# partition took its number: its node must follow the new number.
dev2=$(/usr/sbin/losetup -f --show /disk2.img)
printf 'label: dos\n,8M,L\n' | /usr/sbin/sfdisk -q "$dev2"
/usr/sbin/partx -d "$dev" && /usr/sbin/partx -a "$dev2" && /usr/sbin/partx -a "$dev"
i=0; until /usr/sbin/mke2fs -q -t ext2 "${dev}p1" 2>/dev/null; do
	i=$((i+1)); [ $i -lt 50 ] || { echo "${dev}p1 stale: $(cat /sys/class/block/$(basename $dev)p1/dev)"; exit 1; }; sleep 0.1
done
echo "remade ${dev}p1"
/usr/sbin/partx -d "$dev2"
/usr/sbin/losetup -d "$dev2"
/usr/sbin/partx -d "$dev"
/usr/sbin/losetup -d "$dev"
`
	img2 := filepath.Join(filepath.Dir(img), "disk2.img")
	mustRun(t, nil, "truncate", "-s", "16M", img2)
	r = p.run("", "run", "--rm", "--annotation", containerMode, "--annotation", "io.kiwi-shim.loop.count=2",
		"-v", img+":/disk.img", "-v", img2+":/disk2.img", "--rootfs", rootfs, "sh", "-c", partScript)
	if r.code != 0 || !strings.Contains(r.stdout, "made /dev/loop") || !strings.Contains(r.stdout, "remade /dev/loop") {
		t.Fatalf("partitions in container mode: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	// A device outside the lease cannot be opened even with a node made
	// by hand: the device cgroup refuses it.
	r = p.run("", "run", "--rm", "--annotation", containerMode, "--annotation", "io.kiwi-shim.loop.count=1",
		"--rootfs", rootfs, "sh", "-c", `mknod /tmp/other b 7 200 && cat /tmp/other > /dev/null`)
	if r.code == 0 {
		t.Fatalf("opened a loop device outside the lease:\n%s%s", r.stdout, r.stderr)
	}
}

// TestContainerModeCapacity: five concurrent runs over a capacity of two
// never hold more than two devices at once, and all of them finish.
func TestContainerModeCapacity(t *testing.T) {
	const runs = 5
	p := newPodman(t, 2, "")
	rootfs := busyboxRootfs(t)
	stop := make(chan struct{})
	peak := make(chan int)
	go func() {
		max := 0
		for {
			select {
			case <-stop:
				peak <- max
				return
			default:
			}
			if n := len(status(t, p.loopEnv).Held); n > max {
				max = n
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	errs := make(chan error, runs)
	for i := range runs {
		go func() {
			cmd := p.cmd("run", "--rm", "--annotation", containerMode, "--annotation", "io.kiwi-shim.loop.count=1",
				"--rootfs", rootfs, "sh", "-c", "ls /dev/loop*; sleep 1")
			out, err := cmd.CombinedOutput()
			if err != nil {
				err = fmt.Errorf("run %d: %v\n%s", i, err, out)
			}
			errs <- err
		}()
	}
	for range runs {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	close(stop)
	if got := <-peak; got > 2 || got == 0 {
		t.Fatalf("peak of %d devices leased at once, want 1..2", got)
	}
}

// TestBadBundles drives kiwi-shim directly, as conmon would: each bad
// bundle fails in one line, with a non-zero status, leaving nothing.
func TestBadBundles(t *testing.T) {
	dir := t.TempDir()
	leaveClean(t, dir)
	root := filepath.Join(dir, "root")
	env := loopEnv(t, 2)
	good := `{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["true"],"cwd":"/"},"linux":{},"annotations":{"io.kiwi-shim.mode":"container"}}`
	for _, tc := range []struct {
		name, config string
		rootfs       bool
		msg          string
	}{
		{"missing config.json", "", true, "has no config.json"},
		{"invalid JSON", "{not json", true, "invalid JSON"},
		{"unsupported ociVersion", strings.Replace(good, "1.0.2", "3.0.0", 1), true, "not supported"},
		{"missing rootfs", good, false, "is not a directory"},
		{"unknown annotation value", strings.Replace(good, `"container"`, `"box"`, 1), true, "io.kiwi-shim.mode"},
		{"too many loop devices", strings.Replace(good, `"io.kiwi-shim.mode"`, `"io.kiwi-shim.loop.count":"5","io.kiwi-shim.mode"`, 1), true, "at most 2 loop devices"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bundle := t.TempDir()
			if tc.config != "" {
				os.WriteFile(filepath.Join(bundle, "config.json"), []byte(tc.config), 0o644)
			}
			if tc.rootfs {
				os.Mkdir(filepath.Join(bundle, "rootfs"), 0o755)
			}
			logf := filepath.Join(dir, "log.json")
			r := run(t, env, shim(), "--root", root, "--log", logf, "--log-format", "json", "create", "--bundle", bundle, "bad1")
			if r.code == 0 || !strings.Contains(r.stderr, tc.msg) || strings.Count(strings.TrimSpace(r.stderr), "\n") > 0 {
				t.Fatalf("exit %d, stderr %q; want one line mentioning %q", r.code, r.stderr, tc.msg)
			}
			b, _ := os.ReadFile(logf)
			if !strings.Contains(string(b), `"level":"error"`) || !strings.Contains(string(b), tc.msg) {
				t.Fatalf("log.json lacks the error in runc's format: %s", b)
			}
			if ents, _ := os.ReadDir(filepath.Join(root, "containers")); len(ents) > 0 {
				t.Fatalf("state left behind: %v", ents)
			}
			if st := status(t, env); len(st.Held) != 0 {
				t.Fatalf("lease left behind: %+v", st)
			}
		})
	}
}

// TestRuntimeCLI drives the OCI CLI directly the way runtime-tools and
// containerd's runc shim do: create, state, start, kill, delete, list.
func TestRuntimeCLI(t *testing.T) {
	dir := t.TempDir()
	leaveClean(t, dir)
	root := filepath.Join(dir, "root")
	env := loopEnv(t, 2)
	bundle := busyboxBundle(t, dir, `"sleep", "30"`, `{"io.kiwi-shim.mode": "container", "org.example": "x"}`, false)

	k := func(args ...string) string {
		return mustRun(t, env, shim(), append([]string{"--root", root}, args...)...)
	}
	// The container inherits create's stdio (runtime-tools reads the
	// container's output there), so give it files, not pipes that would
	// stay open for as long as the container runs.
	create := exec.Command(shim(), "--root", root, "create", "--bundle", bundle, "--pid-file", filepath.Join(dir, "pid"), "c1")
	create.Env = append(os.Environ(), env...)
	out, err := os.Create(filepath.Join(dir, "create.out"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	create.Stdout, create.Stderr = out, out
	if err := create.Run(); err != nil {
		b, _ := os.ReadFile(out.Name())
		t.Fatalf("create: %v\n%s", err, b)
	}
	st := k("state", "c1")
	for _, want := range []string{`"status": "created"`, `"bundle": "` + bundle + `"`, `"org.example": "x"`, `"ociVersion"`, `"created": "`} {
		if !strings.Contains(st, want) {
			t.Fatalf("state lacks %s:\n%s", want, st)
		}
	}
	if pid, _ := os.ReadFile(filepath.Join(dir, "pid")); !strings.Contains(st, `"pid": `+string(pid)) {
		t.Fatalf("state pid differs from pid file %s:\n%s", pid, st)
	}
	k("start", "c1")
	if st := k("state", "c1"); !strings.Contains(st, `"status": "running"`) {
		t.Fatalf("after start:\n%s", st)
	}
	if l := k("list", "--format", "json"); !strings.Contains(l, `"id":"c1"`) {
		t.Fatalf("list: %s", l)
	}
	if ps := k("ps", "--format", "json", "c1"); !strings.HasPrefix(ps, "[") {
		t.Fatalf("ps: %s", ps)
	}
	r := run(t, env, shim(), "--root", root, "delete", "c1")
	if r.code == 0 {
		t.Fatal("delete of a running container without --force succeeded")
	}
	k("kill", "c1", "KILL")
	eventually(t, 5*time.Second, "stopped", func() bool { return strings.Contains(k("state", "c1"), `"status": "stopped"`) })
	k("delete", "c1")
	if r := run(t, env, shim(), "--root", root, "state", "c1"); r.code == 0 || !strings.Contains(r.stderr, "does not exist") {
		t.Fatalf("state after delete: %d %s", r.code, r.stderr)
	}
	if out := k("--version"); !strings.Contains(out, "spec: 1.") {
		t.Fatalf("--version: %s", out)
	}
	if out := k("features"); !strings.Contains(out, `"ociVersionMax"`) {
		t.Fatalf("features: %s", out)
	}
}

// busyboxBundle makes dir/bundle: a busybox root file system and runc's
// default config.json without a terminal, running args (a JSON list's
// inside) with the annotations (a JSON object); writable makes the root
// file system writable.
func busyboxBundle(t testing.TB, dir, args, annotations string, writable bool) string {
	t.Helper()
	bundle := filepath.Join(dir, "bundle")
	os.MkdirAll(bundle, 0o755)
	os.Rename(busyboxRootfs(t), filepath.Join(bundle, "rootfs"))
	mustRun(t, nil, "runc", "spec", "--bundle", bundle)
	cfg, _ := os.ReadFile(filepath.Join(bundle, "config.json"))
	cfgs := strings.Replace(string(cfg), `"terminal": true`, `"terminal": false`, 1)
	cfgs = strings.Replace(cfgs, `"sh"`, args, 1)
	if writable {
		cfgs = strings.Replace(cfgs, `"readonly": true`, `"readonly": false`, 1)
	}
	cfgs = strings.Replace(cfgs, `"ociVersion"`, `"annotations": `+annotations+`, "ociVersion"`, 1)
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), []byte(cfgs), 0o644); err != nil {
		t.Fatal(err)
	}
	return bundle
}
