//go:build k8s

package integration

// A real two-node Kubernetes cluster on this one machine (make test-k8s):
// etcd, kube-apiserver, kube-controller-manager and kube-scheduler, and
// two nodes, each a kubelet with its own containerd whose CRI plugin has
// the runtime handler kiwi (io.containerd.kiwi.v2, as in
// contrib/containerd/config.toml) beside the default runc. The binaries
// come from contrib/k8s/build (KIWI_K8S_BIN), containerd and crictl from
// the same builds as the CRI tests.
//
// Each node lives in its own mount namespace (unshare --mount=FILE, the
// namespace kept by that file's bind mount), shared by its containerd,
// its kubelet, their shims and pods, and the node's device plugin:
//   - /var/lib is a private tmpfs there and /var/lib/kubelet the node's
//     own directory, so the kubelet's fixed device plugin socket directory
//     (/var/lib/kubelet/device-plugins) and CNI's cache are per node; the
//     node's directory on the host is NODE/kubelet.
//   - the six kernel tunables the kubelet insists on (vm.overcommit_memory
//     and friends) read back as the values it wants, from files mounted
//     over /proc/sys/..., so that the kubelet changes no host sysctl.
//
// Everything listens on loopback or on two node addresses of a
// documentation prefix (198.51.100.1 and .2/32 on the bridge kiwik8s0,
// which has no port): the API server reaches the kubelets there, and no
// packet leaves the machine. Pods attach to a CNI bridge per node
// (kiwik8s1, kiwik8s2; distinct subnets, no gateway, no masquerading, so
// no host sysctl or iptables rule changes), and the kubelet is told not
// to make its iptables chains. cgroup v1 (this machine) and v2 both work:
// each kubelet has its own cgroup root (/NODE, e.g. /kiwi-n1), the cgroupfs
// driver, and failCgroupV1 off.
//
// Teardown removes the pods (API, then CRI), stops the kubelets,
// containerds and control plane, and checks that no process is left in a
// node's namespace, no mount under the cluster's directory, no cgroup
// below the node roots, no network namespace, bridge or kiwi-shim state.

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Addresses of the test cluster: a documentation prefix (RFC 5737) that
// neither the host (eth0 has 192.0.2.0/24 here) nor the CRI tests
// (203.0.113.0/24) use. Node addresses are /32 host addresses; each
// node's pods get a /27; services (which nothing routes: no kube-proxy)
// the upper half.
const (
	k8sNodeLink    = "kiwik8s0"
	k8sServiceCIDR = "198.51.100.128/25"
	k8sServiceIP   = "198.51.100.129" // the first: service "kubernetes"
	// k8sNodeLoops is each node's loop capacity (loop.capacity of the
	// node's kiwi-shim configuration), which its device plugin advertises
	// as kiwi-shim.io/loop.
	k8sNodeLoops = 4
)

// k8sNodes are the cluster's nodes: name, address, pod bridge and subnet.
var k8sNodes = []struct{ name, ip, bridge, subnet string }{
	{"kiwi-n1", "198.51.100.1", "kiwik8s1", "198.51.100.32/27"},
	{"kiwi-n2", "198.51.100.2", "kiwik8s2", "198.51.100.64/27"},
}

// kubeletTunables are the kernel tunables the kubelet checks at start
// (pkg/kubelet/cm setupKernelTunables) with the values it wants; it
// writes them when they differ, so each node sees these values instead.
var kubeletTunables = map[string]string{
	"vm/overcommit_memory":      "1",
	"vm/panic_on_oom":           "0",
	"kernel/panic":              "10",
	"kernel/panic_on_oops":      "1",
	"kernel/keys/root_maxkeys":  "1000000",
	"kernel/keys/root_maxbytes": "25000000",
}

// k8sCluster is a running test cluster.
type k8sCluster struct {
	t       testing.TB
	dir     string
	bin     string // Kubernetes and etcd binaries
	pki     *k8sPKI
	server  string // API server URL
	admin   string // admin kubeconfig
	image   string // busybox image present on every node
	control []*k8sProc
	nodes   []*k8sNode
	netns   []string // named network namespaces before the cluster
}

// k8sNode is one node: its mount namespace, containerd and kubelet.
type k8sNode struct {
	c          *k8sCluster
	name, ip   string
	bridge     string
	subnet     string
	dir        string
	mntns      string // file holding the node's mount namespace
	mntnsID    string // its /proc/PID/ns/mnt link text
	cgroupRoot string
	shimConf   string // the node's kiwi-shim configuration: its loop allocator
	ctrd       *containerd
	cri        *cri
	procs      []*k8sProc
}

// k8sProc is a long-running cluster process with its log file.
type k8sProc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

// exited reports whether the process has ended.
func (p *k8sProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop ends the process: SIGTERM, then SIGKILL after grace.
func (p *k8sProc) stop(grace time.Duration) {
	if p.exited() {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// k8sBin returns the directory of the Kubernetes and etcd binaries.
func k8sBin(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("KIWI_K8S_BIN")
	if dir == "" {
		t.Fatal("KIWI_K8S_BIN is not set: run make test-k8s (contrib/k8s/build builds and caches the binaries)")
	}
	for _, b := range []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl"} {
		if _, err := exec.LookPath(filepath.Join(dir, b)); err != nil {
			t.Fatalf("%s: %v (run contrib/k8s/build)", b, err)
		}
	}
	return dir
}

// freePort returns a TCP port free on the loopback address right now.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startK8sCluster starts the control plane and both nodes, waits until
// the nodes are Ready and the default service account exists, creates the
// RuntimeClass kiwi from contrib/kubernetes/runtimeclass.yaml, and tears
// everything down (with the checks above) when the test ends.
func startK8sCluster(t testing.TB) *k8sCluster {
	t.Helper()
	start := time.Now()
	for _, tool := range []string{"unshare", "nsenter", "ip", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found (util-linux, iproute2: make deps)", tool)
		}
	}
	c := &k8sCluster{t: t, bin: k8sBin(t), netns: netnsList()}
	tools := containerdTools(t)
	crictl := crictlTool(t)
	dir, err := os.MkdirTemp("", "kiwi-k8s-")
	if err != nil {
		t.Fatal(err)
	}
	c.dir = dir
	t.Cleanup(c.teardown)
	if c.pki, err = newK8sPKI(filepath.Join(dir, "pki")); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(dir, "logs"), 0o755)

	// The node addresses, on a bridge without ports.
	mustRun(t, nil, "ip", "link", "add", k8sNodeLink, "type", "bridge")
	for _, n := range k8sNodes {
		mustRun(t, nil, "ip", "addr", "add", n.ip+"/32", "dev", k8sNodeLink)
	}
	mustRun(t, nil, "ip", "link", "set", k8sNodeLink, "up")

	c.startControlPlane()
	for _, spec := range k8sNodes {
		c.startNode(spec.name, spec.ip, spec.bridge, spec.subnet, tools, crictl)
	}
	c.waitFor(3*time.Minute, "nodes Ready", func() bool {
		return c.kubectl("wait", "node", "--all", "--for=condition=Ready", "--timeout=5s").code == 0 &&
			len(strings.Fields(c.kubectl("get", "nodes", "-o", "name").stdout)) == len(k8sNodes)
	})
	c.waitFor(time.Minute, "default service account", func() bool {
		return c.kubectl("get", "serviceaccount", "default").code == 0
	})
	rc, err := os.ReadFile("../contrib/kubernetes/runtimeclass.yaml")
	if err != nil {
		t.Fatal(err)
	}
	runtimeClass, _, _ := strings.Cut(string(rc), "\n---")
	c.kubectlIn(runtimeClass, "apply", "-f", "-")
	t.Logf("cluster up in %s: %s", time.Since(start).Round(time.Second), strings.Join(strings.Fields(c.kubectlMust("get", "nodes", "-o", "wide", "--no-headers")), " "))
	return c
}

// startControlPlane starts etcd, the API server, the controller manager
// and the scheduler, and writes the admin kubeconfig.
func (c *k8sCluster) startControlPlane() {
	t := c.t
	t.Helper()
	etcdClient, etcdPeer, apiPort := freePort(t), freePort(t), freePort(t)
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", etcdClient)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", etcdPeer)
	// Loopback only and plain HTTP: etcd is reached by the API server
	// alone. No fsync: the data is thrown away with the cluster.
	c.control = append(c.control, c.start("etcd", "", nil, filepath.Join(c.bin, "etcd"),
		"--name=kiwi", "--data-dir="+filepath.Join(c.dir, "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=kiwi="+peerURL, "--unsafe-no-fsync", "--log-level=warn"))

	pki := c.pki
	serving, servingKey, err := pki.issue("apiserver", "kube-apiserver", nil,
		"127.0.0.1", "localhost", k8sServiceIP, "kubernetes", "kubernetes.default", "kubernetes.default.svc")
	if err != nil {
		t.Fatal(err)
	}
	kubeletClient, kubeletClientKey, err := pki.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", []string{"system:masters"})
	if err != nil {
		t.Fatal(err)
	}
	c.server = fmt.Sprintf("https://127.0.0.1:%d", apiPort)
	c.control = append(c.control, c.start("kube-apiserver", "", nil, filepath.Join(c.bin, "kube-apiserver"),
		"--etcd-servers="+etcdURL,
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", fmt.Sprintf("--secure-port=%d", apiPort),
		"--cert-dir="+filepath.Join(c.dir, "apiserver"),
		"--tls-cert-file="+serving, "--tls-private-key-file="+servingKey,
		"--client-ca-file="+pki.caFile(),
		"--kubelet-client-certificate="+kubeletClient, "--kubelet-client-key="+kubeletClientKey,
		"--kubelet-preferred-address-types=InternalIP",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+pki.saKeyFile(), "--service-account-signing-key-file="+pki.saKeyFile(),
		"--service-cluster-ip-range="+k8sServiceCIDR,
		"--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
		// The API server's address is loopback, which the endpoint
		// reconciler of service "kubernetes" refuses; nothing here routes
		// services anyway (no kube-proxy).
		"--endpoint-reconciler-type=none",
		"--allow-privileged=true", "--profiling=false", "--v=1"))

	c.admin = c.kubeconfig("admin", "kiwi-admin", "system:masters")
	c.waitFor(2*time.Minute, "API server ready", func() bool {
		return c.kubectl("get", "--raw", "/readyz").code == 0
	})

	kcm := c.kubeconfig("controller-manager", "system:kube-controller-manager")
	c.control = append(c.control, c.start("kube-controller-manager", "", nil, filepath.Join(c.bin, "kube-controller-manager"),
		"--kubeconfig="+kcm, "--leader-elect=false", "--secure-port=0",
		"--service-account-private-key-file="+pki.saKeyFile(), "--root-ca-file="+pki.caFile(),
		"--use-service-account-credentials=true", "--allocate-node-cidrs=false",
		"--cluster-name=kiwi", "--profiling=false", "--v=1"))
	sched := c.kubeconfig("scheduler", "system:kube-scheduler")
	c.control = append(c.control, c.start("kube-scheduler", "", nil, filepath.Join(c.bin, "kube-scheduler"),
		"--kubeconfig="+sched, "--leader-elect=false", "--secure-port=0", "--profiling=false", "--v=1"))
}

// kubeconfig issues a client certificate for user cn in groups orgs and
// writes a kubeconfig with it; it returns the kubeconfig's path.
func (c *k8sCluster) kubeconfig(name, cn string, orgs ...string) string {
	c.t.Helper()
	cert, key, err := c.pki.issue(name, cn, orgs)
	if err != nil {
		c.t.Fatal(err)
	}
	path := filepath.Join(c.pki.dir, name+".kubeconfig")
	if err := c.pki.kubeconfig(path, c.server, cert, key); err != nil {
		c.t.Fatal(err)
	}
	return path
}

// start starts a cluster process; with mntns (a namespace file) in that
// mount namespace. Its output goes to logs/NAME.log.
func (c *k8sCluster) start(name, mntns string, env []string, path string, args ...string) *k8sProc {
	c.t.Helper()
	logPath := filepath.Join(c.dir, "logs", name+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		c.t.Fatal(err)
	}
	if mntns != "" {
		args = append([]string{"--mount=" + mntns, "--", path}, args...)
		path = "nsenter"
	}
	cmd := exec.Command(path, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// The cluster dies with the test binary, whatever happens to it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		c.t.Fatalf("start %s: %v", name, err)
	}
	p := &k8sProc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	return p
}

// startNode makes the node's mount namespace and starts its containerd
// (images imported) and kubelet.
func (c *k8sCluster) startNode(name, ip, bridge, subnet, tools, crictl string) {
	t := c.t
	t.Helper()
	n := &k8sNode{c: c, name: name, ip: ip, bridge: bridge, subnet: subnet,
		dir: filepath.Join(c.dir, name), cgroupRoot: "/" + name}
	c.nodes = append(c.nodes, n)
	for _, d := range []string{"kubelet", "sysctl", "logs", "cni"} {
		if err := os.MkdirAll(filepath.Join(n.dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// The node's mount namespace: a private /var/lib with the node's
	// kubelet directory, and the kubelet's tunables as it wants them.
	script := []string{"set -e",
		"mount -t tmpfs -o mode=0755 kiwi-k8s-varlib /var/lib",
		"mkdir /var/lib/kubelet",
		fmt.Sprintf("mount --bind %q /var/lib/kubelet", filepath.Join(n.dir, "kubelet"))}
	for key, val := range kubeletTunables {
		f := filepath.Join(n.dir, "sysctl", strings.ReplaceAll(key, "/", "."))
		if err := os.WriteFile(f, []byte(val+"\n"), 0o444); err != nil {
			t.Fatal(err)
		}
		script = append(script, fmt.Sprintf("mount --bind -o ro %q /proc/sys/%s", f, key))
	}
	n.mntns = filepath.Join(n.dir, "mntns")
	if err := os.WriteFile(n.mntns, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	mustRun(t, nil, "unshare", "--mount="+n.mntns, "--propagation", "private", "sh", "-c", strings.Join(script, "\n"))
	// The node's kiwi-shim configuration: its own loop allocator with
	// k8sNodeLoops devices (the host-wide claims keep the two nodes'
	// allocators off each other's devices). containerd passes
	// KIWI_SHIM_CONFIG on to the shims, the device plugin reads it too.
	n.shimConf = filepath.Join(n.dir, "kiwi-shim.toml")
	shimConf := fmt.Sprintf("[loop]\ndir = %q\ncapacity = %d\n", filepath.Join(n.dir, "loop"), k8sNodeLoops)
	if err := os.WriteFile(n.shimConf, []byte(shimConf), 0o644); err != nil {
		t.Fatal(err)
	}
	// The kubelet wants its cgroup root to exist already.
	if err := makeCgroupRoot(n.cgroupRoot); err != nil {
		t.Fatal(err)
	}

	n.startContainerd(tools, crictl)
	n.startKubelet()
}

// startContainerd starts the node's containerd in the node's namespace:
// CRI with runc as the default handler and kiwi beside it, the node's
// CNI bridge, the pinned pause image; then imports the images.
func (n *k8sNode) startContainerd(tools, crictl string) {
	t := n.c.t
	t.Helper()
	d := n.dir
	sock := filepath.Join(d, "containerd.sock")
	conf := containerdConfig(ctrdConfig{Root: filepath.Join(d, "containerd", "root"), State: filepath.Join(d, "containerd", "state"),
		Sock: sock, ShimDir: filepath.Join(d, "s"), CNIDir: filepath.Join(d, "cni"), RuncRoot: filepath.Join(d, "runc")})
	confPath := filepath.Join(d, "containerd.toml")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	cni := bridgeConflist("kiwi-k8s", n.bridge, n.subnet, filepath.Join(d, "ipam"))
	if err := os.WriteFile(filepath.Join(d, "cni", "10-kiwi.conflist"), []byte(cni), 0o644); err != nil {
		t.Fatal(err)
	}
	env := []string{"PATH=" + tools + ":" + bin + ":" + os.Getenv("PATH"), "KIWI_SHIM_CONFIG=" + n.shimConf}
	p := n.c.start(n.name+"-containerd", n.mntns, env, filepath.Join(tools, "containerd"), "--config", confPath)
	n.procs = append(n.procs, p)
	n.ctrd = &containerd{t: t, dir: d, sock: sock, ctr: filepath.Join(tools, "ctr"), ns: criNS}
	n.cri = &cri{t: t, c: n.ctrd, crictl: crictl}
	n.c.waitFor(30*time.Second, n.name+" containerd listening", func() bool {
		return p.exited() || n.ctrd.run("", "version").code == 0
	})
	if p.exited() {
		n.c.failProc(p)
	}
	link, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", p.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	n.mntnsID = link
	// The busybox image (podman import, save, ctr import) and the pause
	// image, into the CRI namespace.
	n.ctrd.importImage()
	n.ctrd.importCRIImages()
	n.c.image = n.ctrd.image
}

// startKubelet starts the node's kubelet in the node's namespace.
func (n *k8sNode) startKubelet() {
	t := n.c.t
	t.Helper()
	port, healthz := freePort(t), freePort(t)
	kubeconfig := n.c.kubeconfig(n.name, "system:node:"+n.name, "system:nodes")
	// JSON is YAML: the kubelet reads it as its configuration file.
	conf := fmt.Sprintf(`{"kind": "KubeletConfiguration", "apiVersion": "kubelet.config.k8s.io/v1beta1",
  "address": %[1]q, "port": %[2]d, "readOnlyPort": 0,
  "healthzBindAddress": "127.0.0.1", "healthzPort": %[3]d,
  "authentication": {"anonymous": {"enabled": false}, "webhook": {"enabled": false}, "x509": {"clientCAFile": %[4]q}},
  "authorization": {"mode": "AlwaysAllow"},
  "containerRuntimeEndpoint": "unix://%[5]s",
  "cgroupDriver": "cgroupfs", "cgroupRoot": %[6]q, "failCgroupV1": false,
  "failSwapOn": false, "makeIPTablesUtilChains": false, "oomScoreAdj": 0,
  "podLogsDir": %[7]q, "volumePluginDir": %[8]q,
  "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%%", "imagefs.available": "1%%", "nodefs.inodesFree": "1%%"},
  "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
  "maxPods": 20, "registerNode": true, "serializeImagePulls": false}
`, n.ip, port, healthz, n.c.pki.caFile(), n.ctrd.sock, n.cgroupRoot,
		filepath.Join(n.dir, "logs"), filepath.Join(n.dir, "volume-plugins"))
	confPath := filepath.Join(n.dir, "kubelet.yaml")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	p := n.c.start(n.name+"-kubelet", n.mntns, nil, filepath.Join(n.c.bin, "kubelet"),
		"--config="+confPath, "--kubeconfig="+kubeconfig,
		"--hostname-override="+n.name, "--node-ip="+n.ip, "--v=2")
	n.procs = append(n.procs, p)

	// The node's kiwi-shim device plugin (kiwi-shim.io/loop), in the
	// node's namespace, where the kubelet's registration socket is at its
	// default place, once the kubelet serves it.
	n.c.waitFor(time.Minute, n.name+" kubelet's device plugin socket", func() bool {
		_, err := os.Stat(filepath.Join(n.devicePluginDir(), "kubelet.sock"))
		return err == nil
	})
	n.startInNode("device-plugin", nil, shim(), "--config", n.shimConf, "device-plugin")
}

// loopStatus is `kiwi-shim loop status` of the node's allocator.
func (n *k8sNode) loopStatus() loopStatus {
	return status(n.c.t, []string{"KIWI_SHIM_CONFIG=" + n.shimConf})
}

// devicePluginDir is the node's kubelet device plugin directory, as the
// host sees it (/var/lib/kubelet/device-plugins in the node's namespace):
// the kubelet's registration socket kubelet.sock is there, and a device
// plugin puts its own socket beside it.
func (n *k8sNode) devicePluginDir() string {
	return filepath.Join(n.dir, "kubelet", "device-plugins")
}

// startInNode starts a further node process (a device plugin, say) in
// the node's mount namespace; teardown stops it before the kubelet.
func (n *k8sNode) startInNode(name string, env []string, path string, args ...string) *k8sProc {
	p := n.c.start(n.name+"-"+name, n.mntns, env, path, args...)
	n.procs = append(n.procs, p)
	return p
}

// waitFor polls cond until it holds; a cluster process that died on the
// way fails the test with its log.
func (c *k8sCluster) waitFor(timeout time.Duration, what string, cond func() bool) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		for _, p := range c.procs() {
			if p.exited() {
				c.failProc(p)
			}
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s: not reached within %s", what, timeout)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// failProc fails the test for a process that ended, with its log's tail.
func (c *k8sCluster) failProc(p *k8sProc) {
	c.t.Helper()
	b, _ := os.ReadFile(p.log)
	c.t.Fatalf("%s exited (%v):\n%s", p.name, p.cmd.ProcessState, tailLines(string(b), 60))
}

// procs lists every cluster process, control plane first.
func (c *k8sCluster) procs() []*k8sProc {
	out := slices.Clone(c.control)
	for _, n := range c.nodes {
		out = append(out, n.procs...)
	}
	return out
}

// kubectl runs kubectl as the cluster admin.
func (c *k8sCluster) kubectl(args ...string) result {
	c.t.Helper()
	return c.kubectlStdin("", args...)
}

// kubectlStdin is kubectl with standard input.
func (c *k8sCluster) kubectlStdin(stdin string, args ...string) result {
	c.t.Helper()
	cmd := exec.Command(filepath.Join(c.bin, "kubectl"), append([]string{"--kubeconfig", c.admin, "--request-timeout=60s"}, args...)...)
	return runCmd(c.t, cmd, stdin)
}

// kubectlMust is kubectl that fails the test on a non-zero status.
func (c *k8sCluster) kubectlMust(args ...string) string {
	c.t.Helper()
	return c.kubectlIn("", args...)
}

// kubectlIn is kubectlMust with standard input.
func (c *k8sCluster) kubectlIn(stdin string, args ...string) string {
	c.t.Helper()
	r := c.kubectlStdin(stdin, args...)
	if r.code != 0 {
		c.t.Fatalf("kubectl %s: exit %d\n%s%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// teardown stops the cluster and checks that it left nothing behind.
func (c *k8sCluster) teardown() {
	t := c.t
	start := time.Now()
	if t.Failed() {
		for _, p := range c.procs() {
			b, _ := os.ReadFile(p.log)
			t.Logf("%s log tail:\n%s", p.name, tailLines(string(b), 40))
		}
	}
	// Pods first, through the API while the kubelets still run, then
	// whatever sandboxes remain through CRI (which removes their network
	// namespaces).
	if c.admin != "" {
		if r := c.kubectl("delete", "pods", "--all", "--all-namespaces", "--wait", "--timeout=90s"); r.code != 0 {
			t.Logf("deleting the pods: %s%s", r.stdout, r.stderr)
		}
	}
	for _, n := range c.nodes {
		if n.cri == nil {
			continue
		}
		for _, id := range strings.Fields(n.cri.run("pods", "-q").stdout) {
			n.cri.run("stopp", id)
			n.cri.run("rmp", "-f", id)
		}
	}
	// Node processes, newest first (device plugin, kubelet, containerd),
	// with containerd's tasks killed before containerd itself.
	for _, n := range c.nodes {
		for i := len(n.procs) - 1; i >= 0; i-- {
			p := n.procs[i]
			if strings.HasSuffix(p.name, "-containerd") && !p.exited() {
				for _, id := range strings.Fields(n.ctrd.run("", "containers", "ls", "-q").stdout) {
					n.ctrd.run("", "task", "kill", "-s", "SIGKILL", id)
					time.Sleep(500 * time.Millisecond)
					n.ctrd.run("", "task", "delete", "-f", id)
					n.ctrd.run("", "containers", "rm", id)
				}
			}
			p.stop(30 * time.Second)
		}
	}
	for i := len(c.control) - 1; i >= 0; i-- {
		c.control[i].stop(30 * time.Second)
	}
	// Nothing may still run in a node's namespace (shims, pause, QEMU).
	for _, n := range c.nodes {
		if n.mntnsID == "" {
			continue
		}
		var left []string
		for _, pid := range pidsInMountNS(n.mntnsID) {
			cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			left = append(left, fmt.Sprintf("%d %s", pid, strings.ReplaceAll(string(cmdline), "\x00", " ")))
			syscall.Kill(pid, syscall.SIGKILL)
		}
		if len(left) > 0 {
			t.Errorf("processes left in node %s's namespace (killed): %s", n.name, strings.Join(left, "; "))
		}
	}
	// The namespace files are the only mounts the cluster makes on the
	// host; every other mount lived in a node's namespace and is gone
	// with it.
	for _, m := range mountsUnder(c.dir) {
		isNS := slices.ContainsFunc(c.nodes, func(n *k8sNode) bool { return n.mntns == m })
		if err := exec.Command("umount", m).Run(); err != nil {
			t.Errorf("unmount %s: %v", m, err)
		} else if !isNS {
			t.Errorf("a mount was left on the host: %s", m)
		}
	}
	for _, link := range append([]string{k8sNodeLink}, nodeBridges()...) {
		exec.Command("ip", "link", "del", link).Run()
	}
	for _, n := range c.nodes {
		for _, err := range removeCgroupTree(n.cgroupRoot) {
			t.Errorf("node %s: %v", n.name, err)
		}
	}
	// kiwi-shim's state root of the CRI namespace, shared by both nodes'
	// shims: its container directories are gone, the directories go too.
	root := filepath.Join("/run/kiwi-shim/containerd", criNS)
	for _, d := range []string{filepath.Join(root, "containers"), filepath.Join(root, "runc"), root} {
		if err := os.Remove(d); err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("kiwi-shim state left: %v", err)
		}
	}
	// No loop device is still leased from a node's allocator.
	for _, n := range c.nodes {
		if n.shimConf == "" {
			continue
		}
		r := run(t, []string{"KIWI_SHIM_CONFIG=" + n.shimConf}, shim(), "loop", "status")
		if r.code != 0 || !strings.Contains(r.stdout, "leased: 0 ") {
			t.Errorf("node %s: loop status (want none held): exit %d\n%s%s", n.name, r.code, r.stdout, r.stderr)
		}
	}
	if left := slices.DeleteFunc(netnsList(), func(n string) bool { return slices.Contains(c.netns, n) }); len(left) > 0 {
		t.Errorf("network namespaces left: %v", left)
	}
	for _, l := range append([]string{k8sNodeLink}, nodeBridges()...) {
		if exec.Command("ip", "link", "show", l).Run() == nil {
			t.Errorf("link %s left", l)
		}
	}
	if c.dir != "" {
		if err := os.RemoveAll(c.dir); err != nil {
			t.Errorf("remove the cluster directory: %v", err)
		}
	}
	t.Logf("cluster torn down in %s", time.Since(start).Round(time.Second))
}

// nodeBridges lists the nodes' pod bridges.
func nodeBridges() []string {
	var out []string
	for _, n := range k8sNodes {
		out = append(out, n.bridge)
	}
	return out
}

// pidsInMountNS lists the processes in the mount namespace id (the text
// of a /proc/PID/ns/mnt link).
func pidsInMountNS(id string) []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if link, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", pid)); err == nil && link == id {
			out = append(out, pid)
		}
	}
	return out
}

// makeCgroupRoot makes the cgroup root (a path like /kiwi-n1) in every
// hierarchy, with the root cgroup's CPUs and memory nodes on cgroup v1's
// cpuset (a new v1 cpuset cgroup starts empty).
func makeCgroupRoot(root string) error {
	tops := []string{"/sys/fs/cgroup"}
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err != nil {
		tops, _ = filepath.Glob("/sys/fs/cgroup/*/cgroup.procs") // v1 and hybrid
		for i := range tops {
			tops[i] = filepath.Dir(tops[i])
		}
	}
	for _, top := range tops {
		dir := filepath.Join(top, root)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("cgroup root: %w", err)
		}
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			if filepath.Base(top) != "cpuset" {
				break
			}
			b, err := os.ReadFile(filepath.Join(top, f))
			if err == nil {
				err = os.WriteFile(filepath.Join(dir, f), b, 0o644)
			}
			if err != nil {
				return fmt.Errorf("cgroup root %s: %w", f, err)
			}
		}
	}
	return nil
}

// removeCgroupTree removes the cgroup root (a path like /kiwi-n1) and
// everything below it in every hierarchy, deepest first; a cgroup that
// cannot go (a process still in it) is an error.
func removeCgroupTree(root string) []error {
	var errs []error
	tops, _ := filepath.Glob("/sys/fs/cgroup/*" + root)
	if _, err := os.Stat("/sys/fs/cgroup" + root); err == nil {
		tops = append(tops, "/sys/fs/cgroup"+root) // cgroup v2
	}
	for _, top := range tops {
		var dirs []string
		filepath.WalkDir(top, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		slices.SortFunc(dirs, func(a, b string) int { return len(b) - len(a) })
		for _, d := range dirs {
			if err := os.Remove(d); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, fmt.Errorf("cgroup left: %w", err))
			}
		}
	}
	return errs
}
