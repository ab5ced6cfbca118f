//go:build k8s

package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// k8sBuildScript is the build Job's workload, as in kiwiBuild: KIWI's oem
// build with its tree on /build, the image and package list copied to the
// pod's own directory of the output volume (named after the pod: with the
// host's network its host name is the host's), with the pod's start and
// end (Unix seconds).
const k8sBuildScript = `echo start $(date +%s)
echo loops $(ls /dev | grep -cE '^loop[0-9]+$')
mkdir -p /out/$POD_NAME
kiwi-ng --logfile /out/$POD_NAME/kiwi.log system build --description /description --target-dir /build; rc=$?
cp --sparse=always /build/*.raw /build/*.packages /out/$POD_NAME/ 2>/dev/null
echo end $(date +%s) rc $rc
exit $rc
`

// TestK8sKiwiBuildJob: a Job of 6 real KIWI oem builds in container mode
// (the box image localhost/kiwi-box:bookworm imported into both nodes'
// containerd), each requesting kiwi-shim.io/loop: 2 on nodes of capacity
// 4: never more than 2 builds on a node at once (the pods' own times and
// node names), all complete, and every image comes back through a
// hostPath volume and is checked as in TestKiwiBuildContainerMode. The
// pods use the host's network (the Debian mirror; the test's pod
// bridges have no route out).
func TestK8sKiwiBuildJob(t *testing.T) {
	c, desc, out := startBuildCluster(t)
	runs := c.buildJob("kiwi-build", "container", 6, "", desc, out)
	for _, a := range runs {
		at := 0
		for _, b := range runs {
			if b.node == a.node && b.start <= a.start && a.start < b.end {
				at++
			}
		}
		if at > k8sNodeLoops/2 {
			t.Fatalf("%d builds ran on %s at once (at %d): %+v", at, a.node, a.start, runs)
		}
	}
}

// TestK8sKiwiBuildVM: the same build as one VM-mode pod (2 GiB guest, its
// tree on a 10 GiB scratch disk, description and output through the
// hostPath volumes shared into the guest) requesting kiwi-shim.io/loop:
// 2, which its node's allocator holds while the VM runs; the image comes
// back through the volume and is checked.
func TestK8sKiwiBuildVM(t *testing.T) {
	c, desc, out := startBuildCluster(t)
	c.buildJob("kiwi-build-vm", "vm", 1, `
        io.kiwi-shim.vm.memory: 2G
        io.kiwi-shim.vm.scratch: "10G:/build"`, desc, out)
}

// startBuildCluster starts the cluster with the box image in both nodes'
// containerd, and returns it, the rendered description and the output
// directory.
func startBuildCluster(t *testing.T) (*k8sCluster, string, string) {
	ensureBox(t)
	noVMLeft(t)
	leaveClean(t, "")
	desc := renderDescription(t, "bookworm-oem", nil)
	out := t.TempDir()
	c := startK8sCluster(t)
	archive := filepath.Join(t.TempDir(), "box.oci.tar")
	start := time.Now()
	mustRun(t, nil, "podman", "save", "-q", "--format", "oci-archive", "-o", archive, box)
	for _, n := range c.nodes {
		n.ctrd.must("images", "import", archive)
	}
	t.Logf("box image imported into both nodes in %s", time.Since(start).Round(time.Second))
	return c, desc, out
}

// k8sBuildRun is one build pod: its node and its own start and end.
type k8sBuildRun struct {
	pod, node  string
	start, end int64
}

// buildJob runs a Job of n KIWI builds in mode, each requesting
// kiwi-shim.io/loop: 2 (annotations: further pod annotations, YAML
// lines), waits until all succeed (no node's allocator over capacity on
// the way; in VM mode the build's node leases 2), checks every image in
// its pod's directory of out, and returns the runs.
func (c *k8sCluster) buildJob(name, mode string, n int, annotations, desc, out string) []k8sBuildRun {
	t := c.t
	t.Helper()
	// Container mode: KIWI's tree on a memory-backed emptyDir; VM mode:
	// on the guest's scratch disk (annotation io.kiwi-shim.vm.scratch).
	buildMount, buildVolume := "", ""
	if mode == "container" {
		buildMount = "\n        - {name: build, mountPath: /build}"
		buildVolume = "\n      - name: build\n        emptyDir: {medium: Memory, sizeLimit: 3Gi}"
	}
	job := fmt.Sprintf(`apiVersion: batch/v1
kind: Job
metadata:
  name: %[1]s
spec:
  completions: %[2]d
  parallelism: %[2]d
  backoffLimit: 0
  template:
    metadata:
      annotations:
        io.kiwi-shim.mode: %[3]s%[4]s
    spec:
      runtimeClassName: kiwi
      restartPolicy: Never
      hostNetwork: true
      dnsPolicy: Default
      containers:
      - name: build
        image: %[5]s
        imagePullPolicy: Never
        resources:
          limits:
            kiwi-shim.io/loop: 2
        command: ["sh", "-c", %[6]q]
        env:
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        volumeMounts:
        - {name: description, mountPath: /description, readOnly: true}
        - {name: out, mountPath: /out}%[9]s
      volumes:
      - name: description
        hostPath: {path: %[7]q, type: Directory}
      - name: out
        hostPath: {path: %[8]q, type: Directory}%[10]s
`, name, n, mode, annotations, box, k8sBuildScript, desc, out, buildMount, buildVolume)
	start := time.Now()
	c.kubectlIn(job, "apply", "-f", "-")
	maxHeld := 0
	c.waitFor(25*time.Minute, "Job "+name+" complete", func() bool {
		for _, n := range c.nodes {
			st := n.loopStatus()
			if len(st.Held) > k8sNodeLoops {
				t.Fatalf("node %s leases %d loop devices, capacity %d", n.name, len(st.Held), k8sNodeLoops)
			}
			maxHeld = max(maxHeld, len(st.Held))
		}
		r := c.kubectl("get", "job", name, "-o", "jsonpath={.status.succeeded} {.status.failed}")
		if f := strings.Fields(r.stdout); len(f) == 2 && f[1] != "0" {
			for _, p := range strings.Fields(c.kubectl("get", "pods", "-l", "job-name="+name, "-o", "name").stdout) {
				t.Logf("%s:\n%s", p, tailLines(c.kubectl("logs", p).stdout, 30))
			}
			t.Fatalf("Job %s: a build failed", name)
		}
		return strings.HasPrefix(r.stdout, strconv.Itoa(n))
	})
	t.Logf("Job %s of %d %s-mode KIWI builds complete in %s; most loop devices leased on a node at once: %d", name, n, mode, time.Since(start).Round(time.Second), maxHeld)
	if maxHeld < 2 {
		t.Fatalf("the builds' loop allocations were never seen leased (most %d)", maxHeld)
	}

	var runs []k8sBuildRun
	pods := strings.Fields(c.kubectlMust("get", "pods", "-l", "job-name="+name, "-o", `jsonpath={range .items[*]}{.metadata.name},{.spec.nodeName} {end}`))
	if len(pods) != n {
		t.Fatalf("Job %s has %d pods, want %d: %v", name, len(pods), n, pods)
	}
	for _, p := range pods {
		pod, node, _ := strings.Cut(p, ",")
		logs := c.kubectlMust("logs", pod)
		r := k8sBuildRun{pod: pod, node: node}
		for _, line := range strings.Split(logs, "\n") {
			f := strings.Fields(line)
			switch {
			case len(f) == 2 && f[0] == "start":
				r.start, _ = strconv.ParseInt(f[1], 10, 64)
			case len(f) == 4 && f[0] == "end":
				r.end, _ = strconv.ParseInt(f[1], 10, 64)
			}
		}
		if r.start == 0 || r.end == 0 || (mode == "container" && !strings.Contains(logs, "loops 2\n")) {
			t.Fatalf("pod %s on %s: log tail\n%s", pod, node, tailLines(logs, 30))
		}
		t.Logf("%s on %s: seconds %d..%d after the Job", pod, node, r.start-start.Unix(), r.end-start.Unix())
		runs = append(runs, r)
		dir := filepath.Join(out, pod)
		if _, err := os.Stat(dir); err != nil {
			t.Fatalf("no output of %s in the volume: %v", pod, err)
		}
		checkImage(t, dir)
	}
	c.kubectlMust("delete", "job", name, "--wait", "--timeout=90s", "--cascade=foreground")
	return runs
}
