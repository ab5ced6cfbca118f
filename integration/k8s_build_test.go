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
// build with its tree on the pod's memory-backed /build, the image and
// package list copied to the pod's own directory of the output volume
// (named after the pod: with the host's network its host name is the host's),
// with the pod's start and end (Unix seconds).
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

	job := fmt.Sprintf(`apiVersion: batch/v1
kind: Job
metadata:
  name: kiwi-build
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
      hostNetwork: true
      dnsPolicy: Default
      containers:
      - name: build
        image: %s
        imagePullPolicy: Never
        resources:
          limits:
            kiwi-shim.io/loop: 2
        command: ["sh", "-c", %q]
        env:
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        volumeMounts:
        - {name: description, mountPath: /description, readOnly: true}
        - {name: out, mountPath: /out}
        - {name: build, mountPath: /build}
      volumes:
      - name: description
        hostPath: {path: %q, type: Directory}
      - name: out
        hostPath: {path: %q, type: Directory}
      - name: build
        emptyDir: {medium: Memory, sizeLimit: 3Gi}
`, box, k8sBuildScript, desc, out)
	start = time.Now()
	c.kubectlIn(job, "apply", "-f", "-")
	c.waitFor(15*time.Minute, "Job kiwi-build complete", func() bool {
		for _, n := range c.nodes {
			if st := n.loopStatus(); len(st.Held) > k8sNodeLoops {
				t.Fatalf("node %s leases %d loop devices, capacity %d", n.name, len(st.Held), k8sNodeLoops)
			}
		}
		r := c.kubectl("get", "job", "kiwi-build", "-o", "jsonpath={.status.succeeded} {.status.failed}")
		if f := strings.Fields(r.stdout); len(f) == 2 && f[1] != "0" {
			for _, p := range strings.Fields(c.kubectl("get", "pods", "-l", "job-name=kiwi-build", "-o", "name").stdout) {
				t.Logf("%s:\n%s", p, tailLines(c.kubectl("logs", p).stdout, 30))
			}
			t.Fatalf("Job kiwi-build: a build failed")
		}
		return strings.HasPrefix(r.stdout, "6")
	})
	t.Logf("Job of 6 KIWI builds complete in %s", time.Since(start).Round(time.Second))

	type run struct {
		pod, node  string
		start, end int64
	}
	var runs []run
	pods := strings.Fields(c.kubectlMust("get", "pods", "-l", "job-name=kiwi-build", "-o", `jsonpath={range .items[*]}{.metadata.name},{.spec.nodeName} {end}`))
	if len(pods) != 6 {
		t.Fatalf("Job kiwi-build has %d pods, want 6: %v", len(pods), pods)
	}
	for _, p := range pods {
		name, node, _ := strings.Cut(p, ",")
		logs := c.kubectlMust("logs", name)
		r := run{pod: name, node: node}
		for _, line := range strings.Split(logs, "\n") {
			f := strings.Fields(line)
			switch {
			case len(f) == 2 && f[0] == "start":
				r.start, _ = strconv.ParseInt(f[1], 10, 64)
			case len(f) == 4 && f[0] == "end":
				r.end, _ = strconv.ParseInt(f[1], 10, 64)
			}
		}
		if r.start == 0 || r.end == 0 || !strings.Contains(logs, "loops 2\n") {
			t.Fatalf("pod %s on %s: log tail\n%s", name, node, tailLines(logs, 30))
		}
		t.Logf("%s on %s: seconds %d..%d after the Job", name, node, r.start-start.Unix(), r.end-start.Unix())
		runs = append(runs, r)
		dir := filepath.Join(out, name)
		if _, err := os.Stat(dir); err != nil {
			t.Fatalf("no output of %s in the volume: %v", name, err)
		}
		checkImage(t, dir)
	}
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
	c.kubectlMust("delete", "job", "kiwi-build", "--wait", "--timeout=90s", "--cascade=foreground")
}
