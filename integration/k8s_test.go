//go:build k8s

package integration

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestK8sKiwiPods: on the two-node cluster (k8s_cluster_test.go) a pod
// with runtimeClassName kiwi is scheduled onto each node, in container
// mode and then in VM mode; it runs through that node's containerd and
// the kiwi shim (kiwi-shim holds its state while it runs; in VM mode the
// guest's kernel answers uname), completes, has an address on its node's
// pod network, and its log comes back through the API server and the
// kubelet; deleting the pods removes kiwi-shim's state.
func TestK8sKiwiPods(t *testing.T) {
	rel := guestRelease(t)
	noVMLeft(t)
	leaveClean(t, "")
	c := startK8sCluster(t)
	for _, mode := range []string{"container", "vm"} {
		c.kiwiPods(mode, rel)
	}
}

// kiwiPods runs a pod in mode (container, vm) on each node; see
// TestK8sKiwiPods.
func (c *k8sCluster) kiwiPods(mode, guestRel string) {
	t := c.t
	pod := func(node string) string {
		return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: %[3]s-%[1]s
  annotations:
    io.kiwi-shim.mode: %[3]s
spec:
  runtimeClassName: kiwi
  restartPolicy: Never
  nodeSelector:
    kubernetes.io/hostname: %[1]s
  containers:
  - name: box
    image: %[2]s
    imagePullPolicy: Never
    command: ["sh", "-c", "echo kiwi pod on %[1]s; echo kernel $(uname -r); ip -4 -o addr show eth0; sleep 10; echo done"]
`, node, c.image, mode)
	}
	for _, n := range c.nodes {
		c.kubectlIn(pod(n.name), "apply", "-f", "-")
	}
	start := time.Now()
	for _, n := range c.nodes {
		name := mode + "-" + n.name
		var id string
		c.waitFor(5*time.Minute, name+" running", func() bool {
			out := c.kubectl("get", "pod", name, "-o", "jsonpath={.status.phase} {.spec.nodeName} {.status.containerStatuses[0].containerID}").stdout
			f := strings.Fields(out)
			if len(f) == 3 && f[0] == "Running" {
				if f[1] != n.name {
					t.Fatalf("%s scheduled onto %s, want %s", name, f[1], n.name)
				}
				id = strings.TrimPrefix(f[2], "containerd://")
				return true
			}
			if len(f) > 0 && (f[0] == "Failed" || f[0] == "Succeeded") {
				t.Fatalf("%s ended before it was seen running: %s\n%s", name, out, c.kubectl("describe", "pod", name).stdout)
			}
			return false
		})
		// The container runs through the kiwi shim: kiwi-shim's state
		// for it is there while it runs.
		state := filepath.Join("/run/kiwi-shim/containerd", criNS, "containers", id)
		if _, err := os.Stat(state); err != nil {
			t.Fatalf("%s runs, but not through kiwi-shim (no %s): %v", name, state, err)
		}
	}
	t.Logf("%s mode: both pods running %s after creation", mode, time.Since(start).Round(time.Second))
	var host syscall.Utsname
	syscall.Uname(&host)
	hostRel := ""
	for _, b := range host.Release {
		if b == 0 {
			break
		}
		hostRel += string(rune(b))
	}
	for _, n := range c.nodes {
		name := mode + "-" + n.name
		c.waitFor(5*time.Minute, name+" succeeded", func() bool {
			phase := c.kubectl("get", "pod", name, "-o", "jsonpath={.status.phase}").stdout
			if phase == "Failed" {
				t.Fatalf("%s failed:\n%s", name, c.kubectl("describe", "pod", name).stdout)
			}
			return phase == "Succeeded"
		})
		logs := c.kubectlMust("logs", name)
		if !strings.Contains(logs, "kiwi pod on "+n.name) || !strings.Contains(logs, "done") {
			t.Fatalf("%s's log:\n%s", name, logs)
		}
		wantRel := hostRel
		if mode == "vm" {
			wantRel = guestRel
		}
		if !strings.Contains(logs, "kernel "+wantRel+"\n") {
			t.Fatalf("%s did not run on the %s's kernel %s:\n%s", name, map[string]string{"vm": "guest", "container": "host"}[mode], wantRel, logs)
		}
		_, subnet, _ := net.ParseCIDR(n.subnet)
		m := regexp.MustCompile(`inet ([0-9.]+)/`).FindStringSubmatch(logs)
		if m == nil || !subnet.Contains(net.ParseIP(m[1])) {
			t.Fatalf("%s has no address on its node's pod network %s:\n%s", name, n.subnet, logs)
		}
		t.Logf("%s: %s", name, strings.Join(strings.Fields(logs), " "))
	}
	c.kubectlMust("delete", "pods", "--all", "--wait", "--timeout=90s")
	c.waitFor(time.Minute, "kiwi-shim state removed", func() bool {
		states, _ := filepath.Glob(filepath.Join("/run/kiwi-shim/containerd", criNS, "containers", "*"))
		return len(states) == 0
	})
}

// podTimes reads a pod's own start and end (Unix seconds) from its log:
// the lines "start N" and "end N ..." its script printed; 0 for a line it
// did not print.
func podTimes(logs string) (start, end int64) {
	for _, line := range strings.Split(logs, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 2 && f[0] == "start":
			start, _ = strconv.ParseInt(f[1], 10, 64)
		case len(f) >= 2 && f[0] == "end":
			end, _ = strconv.ParseInt(f[1], 10, 64)
		}
	}
	return start, end
}

// k8sPodRun is one pod of a Job: its node and its own start and end.
type k8sPodRun struct {
	pod, node  string
	start, end int64
}

// checkPerNode fails the test if more than most of runs ran on one node
// at once: counted when each pod started, the pods running on its node
// then (itself too).
func checkPerNode(t *testing.T, runs []k8sPodRun, most int) {
	t.Helper()
	for _, a := range runs {
		at := 0
		for _, b := range runs {
			if b.node == a.node && b.start <= a.start && a.start < b.end {
				at++
			}
		}
		if at > most {
			t.Fatalf("%d pods ran on %s at once (at %d): %+v", at, a.node, a.start, runs)
		}
	}
}

// jobCounts returns how many pods of the Job name succeeded and failed so
// far. The API leaves a count out while it is zero: a Job whose first pod
// failed has a failed count and no succeeded one.
func (c *k8sCluster) jobCounts(name string) (succeeded, failed int) {
	out := c.kubectl("get", "job", name, "-o", "jsonpath={.status.succeeded},{.status.failed}").stdout
	s, f, _ := strings.Cut(strings.TrimSpace(out), ",")
	succeeded, _ = strconv.Atoi(s)
	failed, _ = strconv.Atoi(f)
	return succeeded, failed
}
