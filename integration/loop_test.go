package integration

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// loopEnv isolates the allocator of one test in its own directory.
func loopEnv(t testing.TB, capacity int) []string {
	return []string{
		"KIWI_SHIM_LOOP_DIR=" + filepath.Join(t.TempDir(), "loop"),
		"KIWI_SHIM_LOOP_CAPACITY=" + strconv.Itoa(capacity),
	}
}

type loopStatus struct {
	Capacity int `json:"capacity"`
	Held     []struct {
		Device string `json:"device"`
		Owner  string `json:"owner"`
		PID    int    `json:"pid"`
	} `json:"held"`
	Waiting int `json:"waiting"`
}

func status(t testing.TB, env []string) loopStatus {
	t.Helper()
	var st loopStatus
	out := mustRun(t, env, shim(), "loop", "status", "--format", "json")
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("loop status: %v\n%s", err, out)
	}
	return st
}

// TestLoopAcquireCapacityAndOrder: twelve concurrent holders over three
// devices. The holders' own timestamps show that never more than three ran
// at once, that all twelve ran, and that they were served in the order
// they arrived.
func TestLoopAcquireCapacityAndOrder(t *testing.T) {
	const n, capacity = 12, 3
	dir := t.TempDir()
	leaveClean(t, dir)
	env := loopEnv(t, capacity)
	logf := filepath.Join(dir, "events")
	script := `echo "$1 start $(date +%s%N) $KIWI_LOOP_DEVICES" >> ` + logf + `; sleep "$2"; echo "$1 end $(date +%s%N) $KIWI_LOOP_DEVICES" >> ` + logf
	var procs []*exec.Cmd
	for i := range n {
		// The order is read from the holders' start lines, which a busy
		// machine can delay: holding times that grow with i keep the
		// devices from freeing at nearly the same moment, so that grants
		// are at least 100 ms apart.
		hold := strconv.FormatFloat(0.1*float64(i+1), 'f', 1, 64)
		cmd := exec.Command(shim(), "loop", "acquire", "--count", "1", "--owner", fmt.Sprintf("p%d", i), "--", "sh", "-c", script, "sh", strconv.Itoa(i), hold)
		cmd.Env = append(os.Environ(), env...)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		procs = append(procs, cmd)
		// Arrival order is defined by the queue: start the next holder
		// only once this one is holding or waiting.
		eventually(t, 10*time.Second, fmt.Sprintf("holder %d queued", i), func() bool {
			if i < capacity {
				// Served at once: wait until it has started, so that the
				// first holders' start lines are in arrival order too.
				return countLines(logf, " start ") == i+1
			}
			// Every holder so far has either started or is queued.
			return countLines(logf, " start ")+status(t, env).Waiting >= i+1
		})
	}
	for i, p := range procs {
		if err := p.Wait(); err != nil {
			t.Errorf("holder %d: %v", i, err)
		}
	}
	type event struct {
		who   int
		start bool
		at    int64
		dev   string
	}
	var evs []event
	f, err := os.Open(logf)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var e event
		var kind string
		if _, err := fmt.Sscanf(sc.Text(), "%d %s %d %s", &e.who, &kind, &e.at, &e.dev); err != nil {
			t.Fatalf("bad event %q: %v", sc.Text(), err)
		}
		e.start = kind == "start"
		evs = append(evs, e)
	}
	sort.SliceStable(evs, func(i, j int) bool { return evs[i].at < evs[j].at })
	active := map[string]int{}
	var starts []int
	peak := 0
	for _, e := range evs {
		if e.start {
			if who, busy := active[e.dev]; busy {
				t.Fatalf("%s given to %d while %d held it", e.dev, e.who, who)
			}
			active[e.dev] = e.who
			starts = append(starts, e.who)
			peak = max(peak, len(active))
		} else {
			delete(active, e.dev)
		}
	}
	if len(starts) != n {
		t.Fatalf("%d holders ran, want %d", len(starts), n)
	}
	if peak > capacity {
		t.Fatalf("%d devices held at once, capacity %d", peak, capacity)
	}
	for i, who := range starts {
		if who != i {
			t.Fatalf("served in order %v, want arrival order 0..%d", starts, n-1)
		}
	}
	t.Logf("12 holders over %d devices: peak %d at once, served in arrival order", capacity, peak)
	if st := status(t, env); len(st.Held) != 0 || st.Waiting != 0 {
		t.Fatalf("after all holders: %+v", st)
	}
}

func countLines(path, substr string) int {
	b, _ := os.ReadFile(path)
	return strings.Count(string(b), substr)
}

// holder starts `kiwi-shim loop acquire` with a command that binds its
// device to a fresh image (partitioned when parts) and then sleeps; it
// returns once the device is bound.
func holder(t testing.TB, env []string, dir string, parts bool) (*exec.Cmd, string) {
	t.Helper()
	img := filepath.Join(dir, "disk.img")
	mustRun(t, nil, "truncate", "-s", "16M", img)
	partx := ""
	if parts {
		cmd := exec.Command("sfdisk", "-q", img)
		cmd.Stdin = strings.NewReader("label: dos\n,4M,L\n,4M,L\n")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("sfdisk: %v\n%s", err, out)
		}
		// KIWI registers partitions with partx (BLKPG), which also works
		// where the host kernel does not scan partition tables itself.
		partx = `&& partx -a "$KIWI_LOOP_DEVICES"`
	}
	ready := filepath.Join(dir, "ready")
	script := fmt.Sprintf(`losetup "$KIWI_LOOP_DEVICES" %s %s && echo "$KIWI_LOOP_DEVICES" > %s && exec sleep 60`, img, partx, ready)
	cmd := exec.Command(shim(), "loop", "acquire", "--owner", "crash", "--", "sh", "-c", script)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// On failure, take the holder down; its lease then goes stale.
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	var dev string
	eventually(t, 10*time.Second, "holder bound its device", func() bool {
		b, err := os.ReadFile(ready)
		dev = strings.TrimSpace(string(b))
		return err == nil && dev != ""
	})
	return cmd, dev
}

func childOf(t testing.TB, pid int) int {
	t.Helper()
	out, err := exec.Command("pgrep", "-P", strconv.Itoa(pid)).Output()
	if err != nil {
		t.Fatalf("no child of %d: %v", pid, err)
	}
	c, err := strconv.Atoi(strings.Fields(string(out))[0])
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func bound(dev string) bool {
	_, err := os.Stat(filepath.Join("/sys/block", filepath.Base(dev), "loop"))
	return err == nil
}

// TestLoopCrashRecovery kills each part of a holder with SIGKILL and shows
// the lease is free again within a second, with the device detached and
// its partition nodes gone.
func TestLoopCrashRecovery(t *testing.T) {
	for _, tc := range []struct {
		name   string
		victim string // "child" or "shim"
		parts  bool
	}{
		{"kill child", "child", false},
		{"kill kiwi-shim", "shim", false},
		{"kill kiwi-shim with partitions", "shim", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			leaveClean(t, dir)
			env := loopEnv(t, 1)
			cmd, dev := holder(t, env, dir, tc.parts)
			if tc.parts {
				eventually(t, 5*time.Second, "partitions appear", func() bool {
					m, _ := filepath.Glob(filepath.Join("/sys/block", filepath.Base(dev), filepath.Base(dev)+"p*"))
					return len(m) == 2
				})
			}
			victim := cmd.Process.Pid
			if tc.victim == "child" {
				victim = childOf(t, victim)
			}
			if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			err := cmd.Wait()
			if tc.victim == "child" {
				// kiwi-shim reports the child's death as 128+9.
				if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 137 {
					t.Fatalf("kiwi-shim after child killed: %v, want exit 137", err)
				}
			}
			killed := time.Now()
			eventually(t, time.Second, "lease free and device clean", func() bool {
				st := status(t, env)
				m, _ := filepath.Glob(filepath.Join("/sys/block", filepath.Base(dev), filepath.Base(dev)+"p*"))
				return len(st.Held) == 0 && !bound(dev) && len(m) == 0
			})
			t.Logf("%s free and detached %v after SIGKILL of the %s", dev, time.Since(killed).Round(time.Millisecond), tc.victim)
			// And the next holder gets it.
			mustRun(t, env, shim(), "loop", "acquire", "--no-wait", "--", "true")
		})
	}
}

// TestLoopBadInput: every bad invocation fails in one line, with a non-zero
// status, and holds nothing afterwards.
func TestLoopBadInput(t *testing.T) {
	env := loopEnv(t, 2)
	badConfig := filepath.Join(t.TempDir(), "bad.toml")
	os.WriteFile(badConfig, []byte("[loop]\ncapacty = 3\n"), 0o600)
	for _, tc := range []struct {
		name string
		env  []string
		args []string
		code int
		msg  string
	}{
		{"count zero", env, []string{"loop", "acquire", "--count", "0", "--", "true"}, 1, "between 1 and the capacity"},
		{"count above capacity", env, []string{"loop", "acquire", "--count", "3", "--", "true"}, 1, "between 1 and the capacity 2"},
		{"unknown flag", env, []string{"loop", "acquire", "--frob", "--", "true"}, 1, "flag provided but not defined"},
		{"no command", env, []string{"loop", "acquire", "--"}, 1, "no command given"},
		{"unreadable config", env, []string{"--config", "/nonexistent/config.toml", "loop", "status"}, 1, "no such file"},
		{"unknown config key", env, []string{"--config", badConfig, "loop", "status"}, 1, "unknown key(s) loop.capacty"},
		{"bad capacity env", append(env, "KIWI_SHIM_LOOP_CAPACITY=lots"), []string{"loop", "status"}, 1, "KIWI_SHIM_LOOP_CAPACITY"},
		{"bad format", env, []string{"loop", "status", "--format", "yaml"}, 1, "want table or json"},
		{"command not found", env, []string{"loop", "acquire", "--", "/nonexistent"}, 1, "no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := run(t, tc.env, shim(), tc.args...)
			if r.code != tc.code || !strings.Contains(r.stderr, tc.msg) {
				t.Fatalf("exit %d, stderr %q; want exit %d mentioning %q", r.code, r.stderr, tc.code, tc.msg)
			}
			if lines := strings.Count(strings.TrimSpace(r.stderr), "\n"); lines > 0 {
				t.Fatalf("error is %d lines, want one:\n%s", lines+1, r.stderr)
			}
		})
	}
	if st := status(t, env); len(st.Held) != 0 || st.Waiting != 0 {
		t.Fatalf("bad input left state: %+v", st)
	}
	// A timeout exits 75 (EX_TEMPFAIL) and leaves nothing queued.
	hold := exec.Command(shim(), "loop", "acquire", "--count", "2", "--", "sleep", "5")
	hold.Env = append(os.Environ(), env...)
	if err := hold.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { hold.Process.Kill(); hold.Wait() }()
	eventually(t, 5*time.Second, "holder has both devices", func() bool { return len(status(t, env).Held) == 2 })
	r := run(t, env, shim(), "loop", "acquire", "--timeout", "300ms", "--", "true")
	if r.code != 75 || !strings.Contains(r.stderr, "2 of 2 loop devices leased") {
		t.Fatalf("timeout: exit %d, stderr %q", r.code, r.stderr)
	}
	if st := status(t, env); st.Waiting != 0 {
		t.Fatalf("timed-out request still waiting: %+v", st)
	}
}
