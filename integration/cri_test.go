package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiwi-shim/kiwi-shim/pkg/gc"
)

// crictlTool builds crictl once per test binary.
func crictlTool(t testing.TB) string {
	dir := buildTool(t, "crictl", func(dir string) error {
		return goBuild(dir, "sigs.k8s.io/cri-tools/cmd/crictl@"+crictlVersion)
	})
	return filepath.Join(dir, "crictl")
}

// cri drives the private containerd's CRI plugin with crictl, as a
// kubelet would.
type cri struct {
	t      testing.TB
	c      *containerd
	crictl string
}

func (r *cri) run(args ...string) result {
	r.t.Helper()
	ep := "unix://" + r.c.sock
	cmd := exec.Command(r.crictl, append([]string{"--runtime-endpoint", ep, "--image-endpoint", ep, "--timeout", "5m"}, args...)...)
	return runCmd(r.t, cmd, "")
}

func (r *cri) must(args ...string) string {
	r.t.Helper()
	res := r.run(args...)
	if res.code != 0 {
		r.t.Fatalf("crictl %s: exit %d\n%s%s", strings.Join(args, " "), res.code, res.stdout, res.stderr)
	}
	return strings.TrimSpace(res.stdout)
}

// importPause makes the pinned sandbox image from the host's static
// catatonit (podman's own pause process) in pause mode, and imports it and
// the busybox image into the CRI plugin's namespace.
func (c *containerd) importCRIImages() {
	t := c.t
	t.Helper()
	root := t.TempDir()
	catatonit, err := exec.LookPath("catatonit")
	if err != nil {
		t.Fatalf("catatonit (the sandbox's pause process) not found: run make deps: %v", err)
	}
	mustRun(t, nil, "cp", catatonit, filepath.Join(root, "pause"))
	archive := filepath.Join(c.dir, "pause.oci.tar")
	script := fmt.Sprintf(`tar -C %q -c . | podman import -q --change 'ENTRYPOINT ["/pause", "-P"]' - %s >/dev/null && podman save -q --format oci-archive -o %q %s && podman rmi -f %s >/dev/null`,
		root, pauseImage, archive, pauseImage, pauseImage)
	mustRun(t, nil, "bash", "-c", script)
	for _, a := range []string{archive, c.archive} {
		if r := c.runNS(criNS, "", "images", "import", a); r.code != 0 {
			t.Fatalf("ctr -n %s images import %s: %s%s", criNS, a, r.stdout, r.stderr)
		}
	}
}

// criVMs lists the QEMU processes of VMs kiwi-shim runs for the CRI
// plugin's namespace (their command lines name the state directory).
func criVMs() []gc.Proc {
	return processes(func(argv []string) bool {
		return strings.HasPrefix(filepath.Base(argv[0]), "qemu-system-") &&
			strings.Contains(strings.Join(argv, " "), filepath.Join("/run/kiwi-shim/containerd", criNS)+"/")
	})
}

// TestCRIPod: a Kubernetes-style pod through containerd's CRI plugin and
// the kiwi runtime handler, driven by crictl: the sandbox (pause) runs in
// container mode, the build container in its own VM that owns the pod's
// network address; logs, exec, stop and removal of both leave nothing.
func TestCRIPod(t *testing.T) {
	rel := guestRelease(t)
	noVMLeft(t)
	leaveClean(t, "")
	c := startContainerd(t)
	c.importCRIImages()
	r := &cri{t: t, c: c, crictl: crictlTool(t)}
	// A failed test leaves pods: remove them through CRI (which removes
	// their network namespaces) before containerd stops.
	t.Cleanup(func() {
		for _, id := range strings.Fields(r.run("pods", "-q").stdout) {
			r.run("stopp", id)
			r.run("rmp", "-f", id)
		}
	})
	dir := t.TempDir()

	// The pod asks for VM mode: the sandbox must still run in container
	// mode, the build container gets a VM.
	pod := fmt.Sprintf(`{"metadata": {"name": "kiwi-build", "namespace": "default", "uid": "kiwi-build-%d", "attempt": 1},
  "log_directory": %q, "annotations": {"io.kiwi-shim.mode": "vm"}, "linux": {}}`, os.Getpid(), filepath.Join(dir, "logs"))
	ctr := fmt.Sprintf(`{"metadata": {"name": "build"}, "image": {"image": %q},
  "command": ["sh", "-c", "trap 'exit 0' TERM; echo kernel $(uname -r); ip -4 -o addr; echo ready; sleep 600 & wait"],
  "log_path": "build.log", "linux": {}}`, c.image)
	podJSON, ctrJSON := filepath.Join(dir, "pod.json"), filepath.Join(dir, "ctr.json")
	os.WriteFile(podJSON, []byte(pod), 0o644)
	os.WriteFile(ctrJSON, []byte(ctr), 0o644)

	start := time.Now()
	podID := r.must("runp", "--runtime", "kiwi", podJSON)
	t.Logf("runp: %s", time.Since(start).Round(time.Millisecond))
	if vms := criVMs(); len(vms) != 0 {
		t.Fatalf("the pod sandbox started QEMU %v: it must run in container mode", vms)
	}
	var inspect struct {
		Status struct {
			Network struct{ IP string } `json:"network"`
		} `json:"status"`
	}
	if err := json.Unmarshal([]byte(r.must("inspectp", "-o", "json", podID)), &inspect); err != nil || inspect.Status.Network.IP == "" {
		t.Fatalf("inspectp: no pod IP (%v)", err)
	}
	podIP := inspect.Status.Network.IP

	ctrID := r.must("create", podID, ctrJSON, podJSON)
	start = time.Now()
	r.must("start", ctrID)
	var logs string
	eventually(t, 3*time.Minute, "build container ready", func() bool {
		logs = r.run("logs", ctrID).stdout
		return strings.Contains(logs, "ready")
	})
	t.Logf("start to ready: %s", time.Since(start).Round(time.Millisecond))
	if !strings.Contains(logs, "kernel "+rel) {
		t.Fatalf("the build container did not run in the guest (want kernel %s):\n%s", rel, logs)
	}
	if !strings.Contains(logs, podIP+"/") {
		t.Fatalf("the guest does not hold the pod's address %s:\n%s", podIP, logs)
	}
	vms := criVMs()
	if len(vms) != 1 {
		t.Fatalf("QEMU processes %v for one VM container", vms)
	}
	// The VM is accounted to the container: QEMU is in its cgroup.
	if cg, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", vms[0].Pid)); !strings.Contains(string(cg), ctrID) {
		t.Fatalf("QEMU is not in the container's cgroup:\n%s", cg)
	}
	if out := r.must("exec", ctrID, "sh", "-c", "echo exec $(uname -r)"); out != "exec "+rel {
		t.Fatalf("exec printed %q, want %q", out, "exec "+rel)
	}
	// ExecSync (what kubelet probes use) reports the exit status; crictl
	// itself exits 1 and names it.
	if res := r.run("exec", "--sync", ctrID, "sh", "-c", "exit 7"); res.code == 0 || !strings.Contains(res.stderr, "exited with 7") {
		t.Fatalf("exec --sync: exit %d, stderr %q; want the command's exit status 7", res.code, res.stderr)
	}
	if out := r.must("ps", "--id", ctrID, "-q", "--state", "running"); out != ctrID {
		t.Fatalf("crictl ps: %q, want the running container", out)
	}

	r.must("stop", "--timeout", "30", ctrID)
	eventually(t, 30*time.Second, "the VM gone after stop", func() bool { return len(criVMs()) == 0 })
	r.must("rm", ctrID)
	r.must("stopp", podID)
	r.must("rmp", podID)
	if out := r.must("pods", "-q"); out != "" {
		t.Fatalf("pods left: %s", out)
	}
	eventually(t, 30*time.Second, "kiwi-shim state removed", func() bool {
		states, _ := filepath.Glob(filepath.Join("/run/kiwi-shim/containerd", criNS, "containers", "*"))
		return len(states) == 0
	})
}
