//go:build k8s

package integration

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// k8sLoopScript is the Job's workload: a box that uses its two leased
// loop devices (attaches a file to the first, makes an ext2 file system
// on it, detaches it), holds them a few seconds, and prints its devices
// and its start and end (Unix seconds).
const k8sLoopScript = `set -e
echo start $(date +%s)
set -- $(ls /dev | grep -E '^loop[0-9]+$')
echo loops $# "$@"
[ $# -eq 2 ]
truncate -s 16M /tmp/disk.img
losetup /dev/$1 /tmp/disk.img
mke2fs /dev/$1 >/dev/null
losetup -d /dev/$1
echo used /dev/$1
sleep 6
echo end $(date +%s)
`

// TestK8sLoopJob: each node's device plugin advertises the node's loop
// capacity (4) as kiwi-shim.io/loop, which kubectl describe node shows;
// a Job of 6 container-mode kiwi pods, each requesting
// kiwi-shim.io/loop: 2, never has more than 2 pods running on a node at
// once (their own timestamps and node names), each box sees exactly 2
// loop devices and uses them, all complete; the nodes' allocators never
// lease more than their capacity. Then a running pod holding 2 devices
// (container mode, then VM mode) is deleted and its leases are freed at
// once.
func TestK8sLoopJob(t *testing.T) {
	noVMLeft(t)
	leaveClean(t, "")
	c := startK8sCluster(t)

	for _, n := range c.nodes {
		c.waitFor(time.Minute, n.name+" advertises kiwi-shim.io/loop", func() bool {
			return c.kubectl("get", "node", n.name, "-o", `jsonpath={.status.allocatable.kiwi-shim\.io/loop}`).stdout == strconv.Itoa(k8sNodeLoops)
		})
		desc := c.kubectlMust("describe", "node", n.name)
		if strings.Count(desc, fmt.Sprintf("kiwi-shim.io/loop:  %d", k8sNodeLoops)) != 2 {
			t.Fatalf("kubectl describe node %s: want kiwi-shim.io/loop %d under Capacity and Allocatable:\n%s", n.name, k8sNodeLoops, desc)
		}
	}

	job := fmt.Sprintf(`apiVersion: batch/v1
kind: Job
metadata:
  name: loops
spec:
  completions: 6
  parallelism: 6
  backoffLimit: 0
  template:
    metadata:
      annotations:
        io.kiwi-shim.mode: container
    spec:
      runtimeClassName: kiwi
      restartPolicy: Never
      containers:
      - name: box
        image: %s
        imagePullPolicy: Never
        resources:
          limits:
            kiwi-shim.io/loop: 2
        command: ["sh", "-c", %q]
`, c.image, k8sLoopScript)
	start := time.Now()
	c.kubectlIn(job, "apply", "-f", "-")
	maxHeld := map[string]int{}
	allocated := false
	c.waitFor(5*time.Minute, "Job loops complete", func() bool {
		for _, n := range c.nodes {
			st := n.loopStatus()
			maxHeld[n.name] = max(maxHeld[n.name], len(st.Held))
			if len(st.Held) > k8sNodeLoops {
				t.Fatalf("node %s leases %d loop devices, capacity %d: %+v", n.name, len(st.Held), k8sNodeLoops, st.Held)
			}
			if !allocated && len(st.Held) == k8sNodeLoops {
				// A full node: describe shows its allocation.
				if desc := c.kubectlMust("describe", "node", n.name); regexp.MustCompile(fmt.Sprintf(`kiwi-shim.io/loop\s+%d\s+%d`, k8sNodeLoops, k8sNodeLoops)).MatchString(desc) {
					allocated = true
					t.Logf("%s full, kubectl describe node: %s", n.name, regexp.MustCompile(`kiwi-shim.io/loop.*`).FindAllString(desc, -1))
				}
			}
		}
		succeeded, failed := c.jobCounts("loops")
		if failed > 0 {
			t.Fatalf("Job loops: a pod failed:\n%s", c.kubectlMust("describe", "pods", "-l", "job-name=loops"))
		}
		return succeeded == 6
	})
	if !allocated {
		t.Fatalf("kubectl describe node never showed a full node's kiwi-shim.io/loop allocation (%d)", k8sNodeLoops)
	}
	t.Logf("Job of 6 pods complete in %s; most devices leased at once per node: %v", time.Since(start).Round(time.Second), maxHeld)

	// Each pod's node and its own start and end: at no time more than 2
	// on a node.
	var runs []k8sPodRun
	pods := strings.Fields(c.kubectlMust("get", "pods", "-l", "job-name=loops", "-o", `jsonpath={range .items[*]}{.metadata.name},{.spec.nodeName} {end}`))
	if len(pods) != 6 {
		t.Fatalf("Job loops has %d pods, want 6: %v", len(pods), pods)
	}
	for _, p := range pods {
		name, node, _ := strings.Cut(p, ",")
		logs := c.kubectlMust("logs", name)
		r := k8sPodRun{pod: name, node: node}
		r.start, r.end = podTimes(logs)
		if r.start == 0 || r.end == 0 || !strings.Contains(logs, "loops 2 ") || !strings.Contains(logs, "used /dev/loop") {
			t.Fatalf("pod %s on %s: log\n%s", name, node, logs)
		}
		t.Logf("%s on %s: seconds %d..%d after the Job; %s", name, node, r.start-start.Unix(), r.end-start.Unix(), strings.Join(strings.Fields(logs), " "))
		runs = append(runs, r)
	}
	checkPerNode(t, runs, k8sNodeLoops/2)
	nodes := map[string]bool{}
	for _, r := range runs {
		nodes[r.node] = true
	}
	if len(nodes) != len(c.nodes) {
		t.Fatalf("the Job's pods ran on %v only", nodes)
	}
	c.kubectlMust("delete", "job", "loops", "--wait", "--timeout=90s", "--cascade=foreground")

	// A running pod holding 2 devices, in container mode on one node and
	// in VM mode (whose box holds the allocation while the VM runs) on
	// the other; deleting it frees them at once.
	c.holdAndDelete(c.nodes[0], "container")
	c.holdAndDelete(c.nodes[1], "vm")
}

// holdAndDelete runs a pod in mode on node n that requests
// kiwi-shim.io/loop: 2 and waits; while it runs, n's allocator leases
// exactly 2 devices; once kubectl delete returns, none.
func (c *k8sCluster) holdAndDelete(n *k8sNode, mode string) {
	t := c.t
	t.Helper()
	name := "holder-" + mode
	holder := fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: %s
  annotations:
    io.kiwi-shim.mode: %s
spec:
  runtimeClassName: kiwi
  restartPolicy: Never
  terminationGracePeriodSeconds: 5
  nodeSelector:
    kubernetes.io/hostname: %s
  containers:
  - name: box
    image: %s
    imagePullPolicy: Never
    resources:
      limits:
        kiwi-shim.io/loop: 2
    command: ["sh", "-c", "trap 'exit 0' TERM; echo ready; sleep 600 & wait"]
`, name, mode, n.name, c.image)
	c.kubectlIn(holder, "apply", "-f", "-")
	c.waitFor(3*time.Minute, name+" ready", func() bool {
		return c.kubectl("get", "pod", name, "-o", "jsonpath={.status.phase}").stdout == "Running" &&
			strings.Contains(c.kubectl("logs", name).stdout, "ready")
	})
	st := n.loopStatus()
	if len(st.Held) != 2 {
		t.Fatalf("%s runs, %s leases %+v, want 2 devices", name, n.name, st.Held)
	}
	var held []string
	for _, h := range st.Held {
		held = append(held, h.Device+" "+h.Owner)
	}
	del := time.Now()
	c.kubectlMust("delete", "pod", name, "--wait", "--timeout=60s")
	deleted := time.Since(del)
	if st := n.loopStatus(); len(st.Held) != 0 {
		t.Fatalf("%s deleted (%s), but %s still leases %+v", name, deleted.Round(time.Millisecond), n.name, st.Held)
	}
	t.Logf("%s on %s leased %v; all freed when kubectl delete returned (%s)", name, n.name, held, deleted.Round(time.Millisecond))
}
