package integration

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// dnsHostAddr is the test nameserver's address: a host of the test's own,
// in a network namespace behind a veth, reached from containers through
// the container network's NAT exactly as an upstream nameserver is.
const dnsHostAddr = "203.0.113.250"

// dnsHost starts the test nameserver (dnsload -serve) in a network
// namespace of its own and returns a function that stops it and returns
// the number of queries it got. Everything is removed at the test's end.
func dnsHost(t *testing.T, dnsload string) (stop func() string) {
	t.Helper()
	ns := fmt.Sprintf("kiwidns%d", os.Getpid())
	veth := fmt.Sprintf("kdns%d", os.Getpid()%10000000)
	t.Cleanup(func() {
		exec.Command("ip", "netns", "del", ns).Run()
		// The namespace's veth goes with it, a moment later.
		eventually(t, 10*time.Second, "veth "+veth+" removed", func() bool {
			return exec.Command("ip", "link", "show", veth).Run() != nil
		})
	})
	for _, args := range [][]string{
		{"netns", "add", ns},
		{"link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns},
		{"addr", "add", "203.0.113.249/30", "dev", veth},
		{"link", "set", veth, "up"},
		{"-n", ns, "addr", "add", dnsHostAddr + "/30", "dev", "eth0"},
		{"-n", ns, "link", "set", "eth0", "up"},
		{"-n", ns, "link", "set", "lo", "up"},
	} {
		mustRun(t, nil, "ip", args...)
	}
	srv := exec.Command("ip", "netns", "exec", ns, dnsload, "-serve", dnsHostAddr+":53")
	out, err := srv.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	srv.Stderr = os.Stderr
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	lines := bufio.NewScanner(out)
	if !lines.Scan() || lines.Text() != "serving" {
		srv.Process.Kill()
		srv.Wait()
		t.Fatalf("test nameserver did not start: %q", lines.Text())
	}
	var once sync.Once
	var last string
	stop = func() string {
		once.Do(func() {
			srv.Process.Signal(syscall.SIGTERM)
			if lines.Scan() {
				last = lines.Text()
			}
			srv.Wait()
		})
		return last
	}
	t.Cleanup(func() { stop() })
	return stop
}

// cpuHogs keeps n busy loops running until the test ends: a loaded build
// host.
func cpuHogs(t *testing.T, n int) {
	t.Helper()
	for range n {
		hog := exec.Command("sh", "-c", "while :; do :; done")
		if err := hog.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			hog.Process.Kill()
			hog.Wait()
		})
	}
}

// containerChurn starts and stops plain runc containers on podman's
// default network, one after another, until the returned function is
// called (it returns how many ran): the comings and goings of a shared
// build host. Each one adds and removes a port of the bridge.
func containerChurn(t *testing.T, p *podman, rootfs string) (stop func() int) {
	t.Helper()
	done := make(chan struct{})
	count := make(chan int, 1)
	go func() {
		n := 0
		defer func() { count <- n }()
		for {
			select {
			case <-done:
				return
			case <-time.After(time.Second):
			}
			cmd := exec.Command("podman", "--runtime", "runc", "run", "--rm", "--label", p.label, "--rootfs", rootfs, "true")
			cmd.Env = append(os.Environ(), "CONTAINERS_CONF="+p.conf)
			if cmd.Run() == nil {
				n++
			}
		}
	}()
	var once sync.Once
	var n int
	stop = func() int {
		once.Do(func() { close(done); n = <-count })
		return n
	}
	t.Cleanup(func() { stop() })
	return stop
}

type dnsReport struct {
	Lookups  int      `json:"lookups"`
	Failures int      `json:"failures"`
	Seconds  float64  `json:"seconds"`
	Errors   []string `json:"errors"`
}

// TestVMDNSUnderLoad: three VM-mode containers at once resolve 700
// distinct names each (2100 lookups, A and AAAA) through the podman
// bridge's NAT to a nameserver on a test host, while two busy loops load
// the host's two cores and runc containers start and stop on the same
// bridge (which, unpinned, changed the gateway's address under the boxes:
// see package bridgepin). Through the box's DNS forwarder (the default)
// not one lookup may fail; the same run with io.kiwi-shim.vm.dns=direct
// (the container's resolv.conf as podman wrote it) is measured beside it.
func TestVMDNSUnderLoad(t *testing.T) {
	const containers, lookups = 3, 700
	p := newPodman(t, 2, "")
	tools := buildTool(t, "dnsload", func(dir string) error { return goBuild(dir, "./dnsload") })
	dnsload := filepath.Join(tools, "dnsload")
	rootfs := busyboxRootfs(t)
	copyFile(t, dnsload, filepath.Join(rootfs, "dnsload"))
	os.Chmod(filepath.Join(rootfs, "dnsload"), 0o755)
	stop := dnsHost(t, dnsload)
	cpuHogs(t, 2)
	churn := containerChurn(t, p, rootfs)

	results := map[string]dnsReport{}
	for _, mode := range []string{"direct", "forward"} {
		start := time.Now()
		var wg sync.WaitGroup
		reps := make([]dnsReport, containers)
		for i := range containers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := p.run("", "run", "--rm", "--dns", dnsHostAddr, "--annotation", "io.kiwi-shim.vm.dns="+mode,
					"--annotation", "io.kiwi-shim.vm.memory=1G", "--rootfs", rootfs,
					"/dnsload", "-lookups", fmt.Sprint(lookups), "-parallel", "4", "-prefix", fmt.Sprintf("%s%d", mode, i))
				if r.code != 0 {
					t.Errorf("%s container %d: exit %d\n%s%s", mode, i, r.code, r.stdout, r.stderr)
					return
				}
				if err := json.Unmarshal([]byte(strings.TrimSpace(r.stdout)), &reps[i]); err != nil {
					t.Errorf("%s container %d: %v in %q", mode, i, err, r.stdout)
				}
			}()
		}
		wg.Wait()
		var sum dnsReport
		for _, r := range reps {
			sum.Lookups += r.Lookups
			sum.Failures += r.Failures
			sum.Seconds = max(sum.Seconds, r.Seconds)
			sum.Errors = append(sum.Errors, r.Errors...)
		}
		results[mode] = sum
		t.Logf("dns=%s: %d lookups from %d VM containers beside 2 busy loops, %d failed (%.2f%%), %.0f lookups/s, wall %s; first errors: %v",
			mode, sum.Lookups, containers, sum.Failures, 100*float64(sum.Failures)/float64(max(sum.Lookups, 1)),
			float64(sum.Lookups)/max(sum.Seconds, 0.001), time.Since(start).Round(time.Second), sum.Errors)
	}
	t.Logf("test nameserver: %s; %d runc containers started and stopped beside", stop(), churn())
	fwd := results["forward"]
	if fwd.Lookups < containers*lookups {
		t.Fatalf("forwarder run made %d lookups, want %d", fwd.Lookups, containers*lookups)
	}
	if fwd.Failures != 0 {
		t.Errorf("through the box's DNS forwarder %d of %d lookups failed: %v", fwd.Failures, fwd.Lookups, fwd.Errors)
	}
}
