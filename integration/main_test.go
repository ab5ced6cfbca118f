// Package integration drives the built kiwi-shim binaries through real
// podman, runc, loop devices and QEMU, the way a user's terminal session
// would. The tests need root and the packages `make deps` installs; a
// missing prerequisite fails the test with the fix instead of skipping it.
package integration

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kiwi-shim/kiwi-shim/pkg/gc"
)

// bin is the directory holding the binaries under test.
var bin string

// posixsuite is the static POSIX behaviour checker (./posixsuite), built
// for every run: the file-system tests run it on the host and in guests.
var posixsuite string

// toolsDir holds helper programs built for this run; removed at its end.
var toolsDir string

// built remembers the helper programs built so far (see buildTool).
var built = struct {
	sync.Mutex
	dirs map[string]string
}{dirs: map[string]string{}}

// buildTool runs build once per test binary into its own directory below
// toolsDir and returns that directory; tests that need the same tools
// (containerd, crictl) share one build.
func buildTool(t testing.TB, name string, build func(dir string) error) string {
	t.Helper()
	built.Lock()
	defer built.Unlock()
	if dir, ok := built.dirs[name]; ok {
		return dir
	}
	dir := filepath.Join(toolsDir, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := build(dir); err != nil {
		os.RemoveAll(dir)
		t.Fatalf("build %s: %v", name, err)
	}
	t.Logf("built %s in %s", name, time.Since(start).Round(time.Second))
	built.dirs[name] = dir
	return dir
}

// goBuild builds Go packages (static) into dir; with a version, as
// `go install pkg@version` outside this module.
func goBuild(dir string, pkgs ...string) error {
	args := append([]string{"build", "-o", dir + "/"}, pkgs...)
	if strings.Contains(pkgs[0], "@") {
		args = append([]string{"install"}, pkgs...)
	}
	cmd := exec.Command("go", args...)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOBIN="+dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

// testRunEnv marks the processes this test binary's commands start (every
// child inherits it, down to QEMU), so that leftover checks count this
// run's processes only, not those of other kiwi-shim users on the host.
const testRunEnv = "KIWI_SHIM_TEST_RUN"

// testRun is this run's mark.
var testRun = strconv.Itoa(os.Getpid())

func runMain(m *testing.M) int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "integration tests need root (run: sudo make test)")
		return 1
	}
	os.Setenv(testRunEnv, testRun)
	if b := os.Getenv("KIWI_SHIM_BIN"); b != "" {
		bin = b
	} else {
		dir, err := os.MkdirTemp("", "kiwi-shim-bin-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		cmd := exec.Command("go", "build", "-o", dir, "../cmd/...")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "build:", err)
			return 1
		}
		bin = dir
	}
	tools, err := os.MkdirTemp("", "kiwi-shim-tools-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(tools)
	toolsDir = tools
	posixsuite = filepath.Join(tools, "posixsuite")
	cmd := exec.Command("go", "build", "-o", posixsuite, "./posixsuite")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build posixsuite:", err)
		return 1
	}
	return m.Run()
}

// shim returns the path of the kiwi-shim binary.
func shim() string { return filepath.Join(bin, "kiwi-shim") }

// result is a finished command.
type result struct {
	stdout, stderr string
	code           int
}

// run runs a command with extra environment and returns its output and
// exit status; it fails the test only when the command cannot start.
func run(t testing.TB, env []string, name string, args ...string) result {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	return runCmd(t, cmd, "")
}

// runCmd runs cmd with stdin and returns its output and shell-style exit
// status (128+N for signal N); it fails the test only when cmd cannot
// start.
func runCmd(t testing.TB, cmd *exec.Cmd, stdin string) result {
	t.Helper()
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String()}
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("%s: %v", strings.Join(cmd.Args, " "), err)
		}
		r.code = ee.ExitCode()
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			r.code = 128 + int(ws.Signal())
		}
	}
	return r
}

// mustRun is run that fails the test on a non-zero status.
func mustRun(t testing.TB, env []string, name string, args ...string) string {
	t.Helper()
	r := run(t, env, name, args...)
	if r.code != 0 {
		t.Fatalf("%s %s: exit %d\nstdout: %s\nstderr: %s", name, strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// eventually polls cond until it holds or the timeout passes.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not reached within %s", what, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// boundLoopsUnder lists loop devices bound to files below dir.
func boundLoopsUnder(dir string) []string {
	var out []string
	matches, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, m := range matches {
		b, err := os.ReadFile(m)
		if err == nil && strings.HasPrefix(strings.TrimSpace(string(b)), dir) {
			out = append(out, strings.Split(m, "/")[3])
		}
	}
	return out
}

// loopPartitions lists loopNpK partition nodes anywhere on the host.
func loopPartitions() []string {
	m, _ := filepath.Glob("/sys/block/loop*/loop*p*")
	for i := range m {
		m[i] = filepath.Base(m[i])
	}
	return m
}

// leaveClean registers checks that the test left no loop device bound to
// its files, no partition node and no kiwi-shim process behind.
func leaveClean(t testing.TB, dir string) {
	t.Helper()
	partsBefore := len(loopPartitions())
	t.Cleanup(func() {
		if l := boundLoopsUnder(dir); len(l) > 0 {
			t.Errorf("left loop devices bound: %v", l)
		}
		if p := loopPartitions(); len(p) > partsBefore {
			t.Errorf("left loop partition nodes: %v", p)
		}
		// Helpers may still be on their way out (podman's cleanup runs
		// delete asynchronously): give them a moment.
		deadline := time.Now().Add(10 * time.Second)
		for len(binaryProcesses()) > 0 && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
		if left := binaryProcesses(); len(left) > 0 {
			t.Errorf("left processes of the binaries under test: %s", strings.Join(left, "; "))
		}
	})
}

// binaryProcesses lists running processes whose executable is one of the
// binaries under test (by argv[0], so that podman's cleanup command line,
// which merely names the runtime, does not count).
func binaryProcesses() []string {
	var out []string
	for _, p := range processes(func(argv []string) bool { return strings.HasPrefix(argv[0], bin+"/") }) {
		out = append(out, strconv.Itoa(p.Pid)+" "+strings.Join(p.Argv, " "))
	}
	return out
}

// processes lists the running processes whose argv match wants.
func processes(match func(argv []string) bool) []gc.Proc {
	var out []gc.Proc
	for _, p := range gc.Processes() {
		if match(p.Argv) {
			out = append(out, p)
		}
	}
	return out
}

// cmdlineHas matches processes whose command line contains s.
func cmdlineHas(s string) func(argv []string) bool {
	return func(argv []string) bool { return strings.Contains(strings.Join(argv, "\x00"), s) }
}

// rssKiB sums the resident memory of procs (KiB, from /proc/PID/status).
func rssKiB(procs []gc.Proc) int {
	total := 0
	for _, p := range procs {
		st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.Pid))
		for _, l := range strings.Split(string(st), "\n") {
			if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
				n, _ := strconv.Atoi(strings.Fields(v)[0])
				total += n
			}
		}
	}
	return total
}
