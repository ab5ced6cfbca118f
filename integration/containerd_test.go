package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// containerdVersion is the containerd the shim is tested against, built
// from the module proxy (it is kiwi-shim's own dependency).
const containerdVersion = "v2.4.2"

// crictlVersion is the CRI client the CRI tests drive.
const crictlVersion = "v1.37.0"

// Names the private containerd's CRI plugin uses: the pinned sandbox
// (pause) image and the CNI bridge its pods attach to, on a documentation
// prefix that neither the host nor the podman tests use.
const (
	pauseImage   = "localhost/kiwi-test-pause:latest"
	criBridge    = "kiwicri0"
	criSubnet    = "203.0.113.0/24"
	criNS        = "k8s.io"
	criNetName   = "kiwi-cri-test"
	cniPluginDir = "/usr/lib/cni"
)

// containerd is a private containerd with its own socket, root and state.
type containerd struct {
	t       testing.TB
	dir     string
	sock    string
	ctr     string
	ns      string
	image   string
	archive string
}

// containerdTools builds containerd, ctr and containerd-shim-runc-v2 of
// containerdVersion once per test binary, next to a
// containerd-shim-kiwi-v2 link to kiwi-shim as make install makes it.
func containerdTools(t testing.TB) string {
	return buildTool(t, "containerd-"+containerdVersion, func(dir string) error {
		if err := goBuild(dir,
			"github.com/containerd/containerd/v2/cmd/containerd",
			"github.com/containerd/containerd/v2/cmd/ctr",
			"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"); err != nil {
			return err
		}
		return os.Symlink(shim(), filepath.Join(dir, "containerd-shim-kiwi-v2"))
	})
}

// ctrdConfig is where a private containerd keeps its files: root and
// state directories, the gRPC socket (ttrpc beside it), the shims'
// socket directory and the CNI configuration directory. RuncRoot, when
// set, adds a runc handler with that state root as CRI's default;
// otherwise kiwi is the default.
type ctrdConfig struct {
	Root, State, Sock, ShimDir, CNIDir, RuncRoot string
}

// containerdConfig is c's containerd configuration (version 3): CRI with
// the pinned pause image, the CNI plugins of cniPluginDir, and the kiwi
// handler (io.kiwi-shim.* annotations passed to the shim).
func containerdConfig(c ctrdConfig) string {
	handlers := `[plugins.'io.containerd.cri.v1.runtime'.containerd]
  default_runtime_name = "kiwi"
`
	if c.RuncRoot != "" {
		handlers = fmt.Sprintf(`[plugins.'io.containerd.cri.v1.runtime'.containerd]
  default_runtime_name = "runc"
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = %q
`, c.RuncRoot)
	}
	return fmt.Sprintf(`version = 3
root = %[1]q
state = %[2]q
[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[plugins.'io.containerd.shim.v1.manager']
  socket_dir = %[5]q
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = %[6]q
[plugins.'io.containerd.cri.v1.runtime']
  # These hosts deny a negative oom_score_adj (no CAP_SYS_RESOURCE), which
  # CRI gives pod sandboxes (-998): keep it at containerd's own.
  restrict_oom_score_adj = true
[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = [%[7]q]
  conf_dir = %[8]q
%[9]s[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.kiwi]
  runtime_type = "io.containerd.kiwi.v2"
  pod_annotations = ["io.kiwi-shim.*"]
  container_annotations = ["io.kiwi-shim.*"]
[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
`, c.Root, c.State, c.Sock, c.Sock+".ttrpc", c.ShimDir, pauseImage, cniPluginDir, c.CNIDir, handlers)
}

// bridgeConflist is a CNI network name on a bridge without gateway or
// masquerading (the bridge plugin then changes no host sysctl, such as
// ip_forward, and adds no iptables rule), its addresses from subnet.
func bridgeConflist(name, bridge, subnet, ipamDir string) string {
	return fmt.Sprintf(`{"cniVersion": "1.0.0", "name": %q, "plugins": [{"type": "bridge", "bridge": %q,
  "isGateway": false, "ipMasq": false, "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "dataDir": %q}}]}`,
		name, bridge, subnet, ipamDir)
}

// startContainerd starts the private containerd (its CRI plugin uses the
// kiwi runtime handler, a pinned local pause image and a private CNI
// configuration), imports a busybox image into it, and stops it (checking
// that nothing is left) when the test ends.
func startContainerd(t testing.TB) *containerd {
	t.Helper()
	tools := containerdTools(t)
	dir, err := os.MkdirTemp("", "kiwi-ctrd-")
	if err != nil {
		t.Fatal(err)
	}
	c := &containerd{t: t, dir: dir, sock: filepath.Join(dir, "c.sock"), ctr: filepath.Join(tools, "ctr"), ns: "kiwitest"}
	conf := containerdConfig(ctrdConfig{Root: filepath.Join(dir, "root"), State: filepath.Join(dir, "state"),
		Sock: c.sock, ShimDir: filepath.Join(dir, "s"), CNIDir: filepath.Join(dir, "cni")})
	confPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	cni := bridgeConflist(criNetName, criBridge, criSubnet, filepath.Join(dir, "ipam"))
	os.MkdirAll(filepath.Join(dir, "cni"), 0o755)
	if err := os.WriteFile(filepath.Join(dir, "cni", "10-kiwi.conflist"), []byte(cni), 0o644); err != nil {
		t.Fatal(err)
	}
	netnsBefore := netnsList()
	logf, _ := os.Create(filepath.Join(dir, "containerd.log"))
	cmd := exec.Command(filepath.Join(tools, "containerd"), "--config", confPath)
	cmd.Env = append(os.Environ(), "PATH="+tools+":"+bin+":"+os.Getenv("PATH"))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Tasks and containers first, then containerd itself.
		for _, ns := range []string{c.ns, criNS} {
			for _, id := range strings.Fields(c.runNS(ns, "", "containers", "ls", "-q").stdout) {
				c.runNS(ns, "", "task", "kill", "-s", "SIGKILL", id)
				time.Sleep(500 * time.Millisecond)
				c.runNS(ns, "", "task", "delete", "-f", id)
				c.runNS(ns, "", "containers", "rm", id)
			}
		}
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		logf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "containerd.log"))
			t.Logf("containerd log tail:\n%s", tailLines(string(b), 400))
		}
		// root and state are not mount points themselves, so umount -R
		// of them does nothing: unmount what a failed test left below
		// dir (CRI's sandbox shm, rootfs overlays), deepest first.
		for _, m := range mountsUnder(dir) {
			if err := exec.Command("umount", m).Run(); err == nil {
				t.Logf("unmounted a leftover mount %s", m)
			}
		}
		os.RemoveAll(dir)
		// The CNI bridge outlives the pods (the bridge plugin never
		// removes it).
		exec.Command("ip", "link", "del", criBridge).Run()
		if left := slices.DeleteFunc(netnsList(), func(n string) bool { return slices.Contains(netnsBefore, n) }); len(left) > 0 {
			t.Errorf("network namespaces left: %v", left)
		}
		for _, ns := range []string{c.ns, criNS} {
			// kiwi-shim's per-namespace root below the shim's state
			// root: its container directories are gone (checked by the
			// tests), the empty directories go too.
			root := filepath.Join("/run/kiwi-shim/containerd", ns)
			for _, d := range []string{filepath.Join(root, "containers"), filepath.Join(root, "runc"), root} {
				if err := os.Remove(d); err != nil && !os.IsNotExist(err) {
					t.Errorf("kiwi-shim state left: %v", err)
				}
			}
			// runc's cgroups of the namespace's containers are gone;
			// their empty parent goes too.
			parents, _ := filepath.Glob("/sys/fs/cgroup/*/" + ns)
			if _, err := os.Stat("/sys/fs/cgroup/" + ns); err == nil {
				parents = append(parents, "/sys/fs/cgroup/"+ns) // v2
			}
			for _, p := range parents {
				if err := os.Remove(p); err != nil {
					t.Errorf("cgroup left: %v", err)
				}
			}
		}
	})
	eventually(t, 30*time.Second, "containerd listening", func() bool {
		return c.run("", "version").code == 0
	})
	c.importImage()
	return c
}

// netnsList lists the named network namespaces (ip netns).
func netnsList() []string {
	entries, _ := os.ReadDir("/run/netns")
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// run runs ctr against the private containerd in the test namespace.
func (c *containerd) run(stdin string, args ...string) result {
	c.t.Helper()
	return c.runNS(c.ns, stdin, args...)
}

// runNS runs ctr against the private containerd in namespace ns.
func (c *containerd) runNS(ns, stdin string, args ...string) result {
	c.t.Helper()
	return runCmd(c.t, exec.Command(c.ctr, append([]string{"--address", c.sock, "--namespace", ns}, args...)...), stdin)
}

func (c *containerd) must(args ...string) string {
	c.t.Helper()
	r := c.run("", args...)
	if r.code != 0 {
		c.t.Fatalf("ctr %s: exit %d\n%s%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// importImage makes a busybox image the way a user would: podman import
// of a rootfs, podman save as an OCI archive, ctr images import.
func (c *containerd) importImage() {
	t := c.t
	t.Helper()
	rootfs := busyboxRootfs(t)
	name := fmt.Sprintf("localhost/kiwi-test-busybox:%d", os.Getpid())
	archive := filepath.Join(c.dir, "busybox.oci.tar")
	script := fmt.Sprintf("tar -C %q -c . | podman import -q --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' - %s >/dev/null && podman save -q --format oci-archive -o %q %s && podman rmi -f %s >/dev/null",
		rootfs, name, archive, name, name)
	mustRun(t, nil, "bash", "-c", script)
	c.must("images", "import", archive)
	c.image, c.archive = name, archive
}

// TestContainerdRun: ctr run with io.containerd.kiwi.v2 runs the command
// in the VM (the guest's kernel) and passes its exit status; the same in
// container mode.
func TestContainerdRun(t *testing.T) {
	rel := guestRelease(t)
	noVMLeft(t)
	leaveClean(t, "")
	c := startContainerd(t)
	r := c.run("", "run", "--rm", "--runtime", "io.containerd.kiwi.v2", c.image, "vm1", "sh", "-c", "uname -r; exit 3")
	if r.code != 3 || strings.TrimSpace(r.stdout) != rel {
		t.Fatalf("VM mode: exit %d, stdout %q, stderr %q; want 3 and %s", r.code, r.stdout, r.stderr, rel)
	}
	var uts syscall.Utsname
	syscall.Uname(&uts)
	r = c.run("", "run", "--rm", "--runtime", "io.containerd.kiwi.v2", "--annotation", "io.kiwi-shim.mode=container",
		c.image, "ct1", "sh", "-c", "uname -r; exit 3")
	if r.code != 3 || strings.TrimSpace(r.stdout) == rel || r.stdout == "" {
		t.Fatalf("container mode: exit %d, stdout %q, stderr %q; want 3 and the host's release", r.code, r.stdout, r.stderr)
	}
}

// TestContainerdTask: a detached VM task through exec, ps, metrics,
// kill and delete.
func TestContainerdTask(t *testing.T) {
	guestRelease(t)
	noVMLeft(t)
	leaveClean(t, "")
	c := startContainerd(t)
	// The task is PID 1 of its PID namespace, as under runc: only a
	// signal it handles reaches it, so it traps the TERM of task kill.
	c.must("run", "-d", "--runtime", "io.containerd.kiwi.v2", c.image, "vm2", "sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait")
	if out := c.must("task", "exec", "--exec-id", "e1", "vm2", "sh", "-c", "echo from exec; exit 0"); out != "from exec\n" {
		t.Fatalf("exec printed %q", out)
	}
	if r := c.run("", "task", "exec", "--exec-id", "e2", "vm2", "sh", "-c", "exit 5"); r.code != 5 {
		t.Fatalf("exec exit status %d, want 5 (%s)", r.code, r.stderr)
	}
	if out := c.must("task", "ps", "vm2"); !strings.Contains(out, "PID") || len(strings.Split(strings.TrimSpace(out), "\n")) < 2 {
		t.Fatalf("task ps:\n%s", out)
	}
	if out := c.must("task", "metrics", "vm2"); !strings.Contains(out, "memory") {
		t.Fatalf("task metrics:\n%s", out)
	}
	// pause and resume through the shim: the VM's vCPUs stop and go on.
	c.must("task", "pause", "vm2")
	if out := c.must("task", "ls"); !strings.Contains(out, "PAUSED") {
		t.Fatalf("task ls after pause:\n%s", out)
	}
	c.must("task", "resume", "vm2")
	if out := c.must("task", "exec", "--exec-id", "e3", "vm2", "echo", "resumed"); out != "resumed\n" {
		t.Fatalf("exec after resume printed %q", out)
	}
	c.must("task", "kill", "vm2")
	eventually(t, 60*time.Second, "task stopped", func() bool {
		return strings.Contains(c.must("task", "ls"), "STOPPED")
	})
	c.must("task", "delete", "vm2")
	c.must("containers", "rm", "vm2")
	if out := c.must("task", "ls"); strings.Contains(out, "vm2") {
		t.Fatalf("task left: %s", out)
	}
}

// TestContainerdShimKilled: kill -9 of the shim mid-run: containerd
// reports the task gone, delete cleans up, and no VM is left.
func TestContainerdShimKilled(t *testing.T) {
	guestRelease(t)
	noVMLeft(t)
	leaveClean(t, "")
	c := startContainerd(t)
	c.must("run", "-d", "--runtime", "io.containerd.kiwi.v2", c.image, "vm3", "sleep", "600")
	// The long-lived shim is kiwi-shim started as "-namespace NS -id ID".
	killProc(t, "-namespace", "vm3")
	eventually(t, 60*time.Second, "task reported stopped or gone", func() bool {
		out := c.must("task", "ls")
		return !strings.Contains(out, "RUNNING")
	})
	c.run("", "task", "delete", "-f", "vm3")
	c.must("containers", "rm", "vm3")
	// containerd cleans up after a dead shim by running the shim's
	// `delete`, which runs `kiwi-shim delete --force`: the VM and the
	// state go, asynchronously.
	eventually(t, 30*time.Second, "kiwi-shim state removed", func() bool {
		states, _ := filepath.Glob("/run/kiwi-shim/containerd/kiwitest/containers/*")
		return len(states) == 0
	})
}

// BenchmarkContainerdRun: `ctr run --rm` of a trivial command with
// io.containerd.kiwi.v2 (VM mode) against io.containerd.runc.v2, five
// rounds interleaved, medians.
func BenchmarkContainerdRun(b *testing.B) {
	guestRelease(b)
	noVMLeft(b)
	c := startContainerd(b)
	const rounds = 5
	var kiwi, runcD []time.Duration
	for i := range rounds {
		for _, rt := range []string{"io.containerd.kiwi.v2", "io.containerd.runc.v2"} {
			start := time.Now()
			c.must("run", "--rm", "--runtime", rt, c.image, fmt.Sprintf("bench%d%s", i, rt[14:18]), "true")
			if rt == "io.containerd.kiwi.v2" {
				kiwi = append(kiwi, time.Since(start))
			} else {
				runcD = append(runcD, time.Since(start))
			}
		}
	}
	mk, mr := median(kiwi), median(runcD)
	b.ReportMetric(float64(mk.Milliseconds()), "kiwi-ms")
	b.ReportMetric(float64(mr.Milliseconds()), "runc-ms")
	b.ReportMetric(float64(mk)/float64(mr), "ratio")
}

// mountsUnder lists the mount points below dir, deepest first.
func mountsUnder(dir string) []string {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			out = append(out, f[4])
		}
	}
	slices.SortFunc(out, func(a, b string) int { return len(b) - len(a) })
	return out
}
