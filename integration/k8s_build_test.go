//go:build k8s

package integration

import (
	"fmt"
	"os"
	"path/filepath"
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

// k8sVMAnnotations make a build pod's box a VM of 2 GiB with KIWI's
// tree on a 10 GiB scratch disk (description and output come through the
// hostPath volumes, shared into the guest).
const k8sVMAnnotations = `
        io.kiwi-shim.vm.memory: 2G
        io.kiwi-shim.vm.scratch: "10G:/build"`

// TestK8sKiwiBuildJob: 6 real KIWI oem builds at once, 3 in container
// mode and 3 in VM mode (the box image localhost/kiwi-box:bookworm
// imported into both nodes' containerd), each pod requesting
// kiwi-shim.io/loop: 2 on nodes of capacity 4: never more than 2 builds
// on a node at once, whatever their mode (the pods' own times and node
// names), all complete, and every image comes back through a hostPath
// volume and is checked as in TestKiwiBuildContainerMode. The pods use
// the host's network (the Debian mirror; the test's pod bridges have no
// route out).
//
// A box's mode is a pod annotation of the Job's template, so one Job has
// one mode: the mixed workload is two Jobs applied together, as a
// platform team would submit them, sharing the nodes' loop capacity.
func TestK8sKiwiBuildJob(t *testing.T) {
	c, desc, out := startBuildCluster(t)
	runs := c.buildJobs(desc, out,
		k8sBuildJob{name: "kiwi-build", mode: "container", n: 3},
		k8sBuildJob{name: "kiwi-build-vm", mode: "vm", n: 3, annotations: k8sVMAnnotations})
	checkPerNode(t, runs, k8sNodeLoops/2)
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

// k8sBuildJob is a Job of n KIWI builds in mode ("container" or "vm"),
// with further pod annotations (YAML lines).
type k8sBuildJob struct {
	name, mode, annotations string
	n                       int
}

// manifest is the Job: every pod requests kiwi-shim.io/loop: 2 and
// builds desc into its own directory of out.
func (j k8sBuildJob) manifest(desc, out string) string {
	// Container mode: KIWI's tree on a memory-backed emptyDir; VM mode:
	// on the guest's scratch disk (annotation io.kiwi-shim.vm.scratch).
	buildMount, buildVolume := "", ""
	if j.mode == "container" {
		buildMount = "\n        - {name: build, mountPath: /build}"
		buildVolume = "\n      - name: build\n        emptyDir: {medium: Memory, sizeLimit: 3Gi}"
	}
	return fmt.Sprintf(`apiVersion: batch/v1
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
`, j.name, j.n, j.mode, j.annotations, box, k8sBuildScript, desc, out, buildMount, buildVolume)
}

// buildJobs applies the Jobs together, waits until all their builds
// succeed (no node's allocator over capacity on the way; a VM-mode
// build's node leases 2 while the VM runs), checks every image in its
// pod's directory of out, deletes the Jobs and returns the runs.
func (c *k8sCluster) buildJobs(desc, out string, jobs ...k8sBuildJob) []k8sPodRun {
	t := c.t
	t.Helper()
	start := time.Now()
	var what []string
	for _, j := range jobs {
		c.kubectlIn(j.manifest(desc, out), "apply", "-f", "-")
		what = append(what, fmt.Sprintf("%s (%d in %s mode)", j.name, j.n, j.mode))
	}
	maxHeld := 0
	done := map[string]bool{}
	c.waitFor(60*time.Minute, "Jobs "+strings.Join(what, ", ")+" complete", func() bool {
		for _, n := range c.nodes {
			st := n.loopStatus()
			if len(st.Held) > k8sNodeLoops {
				t.Fatalf("node %s leases %d loop devices, capacity %d", n.name, len(st.Held), k8sNodeLoops)
			}
			maxHeld = max(maxHeld, len(st.Held))
		}
		for _, j := range jobs {
			if done[j.name] {
				continue
			}
			succeeded, failed := c.jobCounts(j.name)
			if failed > 0 {
				for _, p := range strings.Fields(c.kubectl("get", "pods", "-l", "job-name="+j.name, "-o", "name").stdout) {
					t.Logf("%s:\n%s", p, tailLines(c.kubectl("logs", p).stdout, 30))
				}
				t.Fatalf("Job %s: a build failed", j.name)
			}
			if succeeded == j.n {
				done[j.name] = true
				t.Logf("Job %s complete after %s", j.name, time.Since(start).Round(time.Second))
			}
		}
		return len(done) == len(jobs)
	})
	t.Logf("%s: all builds complete in %s; most loop devices leased on a node at once: %d", strings.Join(what, ", "), time.Since(start).Round(time.Second), maxHeld)
	if maxHeld < 2 {
		t.Fatalf("the builds' loop allocations were never seen leased (most %d)", maxHeld)
	}

	var runs []k8sPodRun
	for _, j := range jobs {
		pods := strings.Fields(c.kubectlMust("get", "pods", "-l", "job-name="+j.name, "-o", `jsonpath={range .items[*]}{.metadata.name},{.spec.nodeName} {end}`))
		if len(pods) != j.n {
			t.Fatalf("Job %s has %d pods, want %d: %v", j.name, len(pods), j.n, pods)
		}
		for _, p := range pods {
			runs = append(runs, c.buildRun(p, j.mode, start, out))
		}
	}
	for _, j := range jobs {
		c.kubectlMust("delete", "job", j.name, "--wait", "--timeout=90s", "--cascade=foreground")
	}
	return runs
}

// buildRun reads the build pod "pod,node" of a Job started at start: its
// own start and end from its log, and its image from out.
func (c *k8sCluster) buildRun(p, mode string, start time.Time, out string) k8sPodRun {
	t := c.t
	t.Helper()
	pod, node, _ := strings.Cut(p, ",")
	logs := c.kubectlMust("logs", pod)
	r := k8sPodRun{pod: pod, node: node}
	r.start, r.end = podTimes(logs)
	// A container-mode box sees exactly its allocation; a VM has loop
	// devices of its own.
	if r.start == 0 || r.end == 0 || (mode == "container" && !strings.Contains(logs, "loops 2\n")) {
		t.Fatalf("pod %s on %s: log tail\n%s", pod, node, tailLines(logs, 30))
	}
	t.Logf("%s (%s mode) on %s: seconds %d..%d after the Jobs", pod, mode, node, r.start-start.Unix(), r.end-start.Unix())
	dir := filepath.Join(out, pod)
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("no output of %s in the volume: %v", pod, err)
	}
	checkImage(t, dir)
	return r
}
