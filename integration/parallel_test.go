package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// build is one KIWI build of a parallel run.
type build struct {
	mode string
	out  string
	took time.Duration
	r    result
}

// kiwiBuildIn runs the oem build in either mode: container mode with
// KIWI's tree on a tmpfs, VM mode on the guest's scratch disk (as make
// demo does), both downloading from this machine's Debian mirror.
func kiwiBuildIn(p *podman, mode, desc, out string) result {
	if mode == "container" {
		return kiwiBuild(p, mode, desc, out)
	}
	script := `kiwi-ng --logfile /out/kiwi.log system build --description /description --target-dir /build; rc=$?
cp --sparse=always /build/*.raw /build/*.packages /out/ 2>/dev/null
exit $rc`
	return p.run("", "run", "--rm", "--annotation", "io.kiwi-shim.mode=vm",
		"--annotation", "io.kiwi-shim.vm.memory=2G", "--annotation", "io.kiwi-shim.vm.scratch=10G:/build",
		"-v", desc+":/description:ro", "-v", out+":/out", box, "sh", "-c", script)
}

// runBuilds runs one build per mode, all at once or one after another,
// and returns the wall time. While builds run it polls loop status and
// reports the most requests it saw waiting.
func runBuilds(t *testing.T, p *podman, desc string, modes []string, parallel bool) (time.Duration, []build, int) {
	t.Helper()
	builds := make([]build, len(modes))
	var maxWaiting atomic.Int32
	done := make(chan struct{})
	polled := make(chan struct{})
	go func() {
		defer close(polled)
		for {
			select {
			case <-done:
				return
			case <-time.After(500 * time.Millisecond):
			}
			// Not status(): a failed look must not end the test from
			// this goroutine.
			var st loopStatus
			r := run(t, p.loopEnv, shim(), "loop", "status", "--format", "json")
			if json.Unmarshal([]byte(r.stdout), &st) == nil && int32(st.Waiting) > maxWaiting.Load() {
				maxWaiting.Store(int32(st.Waiting))
			}
		}
	}()
	start := time.Now()
	var wg sync.WaitGroup
	for i, mode := range modes {
		b := &builds[i]
		b.mode, b.out = mode, t.TempDir()
		one := func() {
			s := time.Now()
			b.r = kiwiBuildIn(p, mode, desc, b.out)
			b.took = time.Since(s)
		}
		if !parallel {
			one()
			continue
		}
		wg.Add(1)
		go func() { defer wg.Done(); one() }()
		// Requests are served in arrival order: let each arrive first.
		time.Sleep(2 * time.Second)
	}
	wg.Wait()
	wall := time.Since(start)
	close(done)
	<-polled
	return wall, builds, int(maxWaiting.Load())
}

// checkBuilds checks every build's image, that all of them installed
// the same packages and that their root file systems are the same but
// for what differs with every build (buildVaries).
func checkBuilds(t *testing.T, builds []build) {
	t.Helper()
	var first []byte
	var firstTree map[string]string
	for i, b := range builds {
		if b.r.code != 0 {
			log, _ := os.ReadFile(filepath.Join(b.out, "kiwi.log"))
			t.Errorf("build %d (%s mode): exit %d\n%s\n%s\nKIWI log tail:\n%s", i, b.mode, b.r.code, tailLines(b.r.stdout, 20), b.r.stderr, tailLines(string(log), 30))
			continue
		}
		checkImage(t, b.out)
		lists, _ := filepath.Glob(filepath.Join(b.out, "*.packages"))
		if len(lists) != 1 {
			t.Errorf("build %d: package lists %v", i, lists)
			continue
		}
		pkgs, err := os.ReadFile(lists[0])
		if err != nil {
			t.Fatal(err)
		}
		if first == nil {
			first = pkgs
		} else if string(pkgs) != string(first) {
			t.Errorf("build %d (%s mode) installed other packages than build 0:\n%s\nvs\n%s", i, b.mode, tailLines(string(pkgs), 10), tailLines(string(first), 10))
		}
		tree := imageTree(t, b.out)
		if firstTree == nil {
			firstTree = tree
		} else if d := treeDiff(firstTree, tree, "build 0", fmt.Sprintf("build %d (%s mode)", i, b.mode), buildVaries); len(d) > 0 {
			t.Errorf("build %d's root file system differs from build 0's in %d paths (all but the contents of %s should be the same):\n%s", i, len(d), describeExclusions(buildVaries), strings.Join(d, "\n"))
		}
	}
}

func modeTimes(builds []build) string {
	var s []string
	for _, b := range builds {
		s = append(s, b.mode+" "+b.took.Round(time.Second).String())
	}
	return strings.Join(s, ", ")
}

// TestParallelContainerBuilds: three real KIWI oem builds in container
// mode at once, each leasing two loop devices from a capacity of four, so
// the third waits its turn (loop status shows it); all succeed with the
// same packages, then the same three run one after another for the
// comparison. `make test-parallel` adds VM-mode builds beside them.
func TestParallelContainerBuilds(t *testing.T) {
	ensureBox(t)
	p := newPodman(t, 4, "")
	desc := renderDescription(t, "bookworm-oem", nil)
	modes := []string{"container", "container", "container"}
	wall, builds, waiting := runBuilds(t, p, desc, modes, true)
	checkBuilds(t, builds)
	if waiting == 0 {
		t.Errorf("loop status never showed a waiting request: three builds of two devices each fit a capacity of four?")
	}
	seqWall, seq, _ := runBuilds(t, p, desc, modes, false)
	checkBuilds(t, seq)
	t.Logf("3 container-mode builds: at once %s (%s; up to %d waiting for loop devices), one after another %s (%s), ratio %.2f",
		wall.Round(time.Second), modeTimes(builds), waiting, seqWall.Round(time.Second), modeTimes(seq), wall.Seconds()/seqWall.Seconds())
}
