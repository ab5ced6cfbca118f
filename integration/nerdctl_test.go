package integration

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// nerdctlVersion is the nerdctl the tests drive, built from its module
// source. v2.4.2, the newest the proxy lists, needs
// github.com/moby/moby/v2 v2.0.0-beta.28, which the proxy refuses (403);
// v2.3.5 needs beta.18, which it serves.
const nerdctlVersion = "v2.3.5"

// The CNI network the nerdctl test attaches its containers to: a bridge
// without gateway or masquerading (no host sysctl, no iptables rule), on a
// benchmarking prefix (RFC 2544) that neither the host nor the other tests
// use.
const (
	nerdctlNet    = "kiwi-nerdctl-test"
	nerdctlBridge = "kiwinerd0"
	nerdctlSubnet = "198.18.77.0/24"
)

// nerdctlTool builds nerdctl from the module proxy's source. `go install
// github.com/containerd/nerdctl/v2/cmd/nerdctl@VERSION` is refused: the
// module's go.mod replaces its test framework (mod/tigron) with a
// directory that the module zip leaves out, and the proxy does not serve
// that module either. The build copies the module, gives the replacement
// an empty module, leaves out the one non-test file of the command's
// packages that imports the framework (cmd/nerdctl/helpers/
// testing_linux.go: helpers for nerdctl's own tests, which the command
// never calls) and builds there as the main module.
func nerdctlTool(t testing.TB) string {
	return buildTool(t, "nerdctl-"+nerdctlVersion, func(dir string) error {
		out, err := exec.Command("go", "mod", "download", "-json", "github.com/containerd/nerdctl/v2@"+nerdctlVersion).Output()
		if err != nil {
			return fmt.Errorf("go mod download nerdctl: %w", err)
		}
		var mod struct{ Dir, Error string }
		if err := json.Unmarshal(out, &mod); err != nil || mod.Dir == "" {
			return fmt.Errorf("go mod download nerdctl: %q (%v)", mod.Error, err)
		}
		src := filepath.Join(dir, "src")
		if out, err := exec.Command("cp", "-r", mod.Dir, src).CombinedOutput(); err != nil {
			return fmt.Errorf("copy nerdctl's module: %v: %s", err, out)
		}
		defer os.RemoveAll(src)
		if out, err := exec.Command("chmod", "-R", "u+w", src).CombinedOutput(); err != nil {
			return fmt.Errorf("chmod nerdctl's copy: %v: %s", err, out)
		}
		tigron := filepath.Join(src, "mod", "tigron")
		if err := os.MkdirAll(tigron, 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(tigron, "go.mod"), []byte("module github.com/containerd/nerdctl/mod/tigron\n\ngo 1.24\n"), 0o644); err != nil {
			return err
		}
		if err := os.Remove(filepath.Join(src, "cmd", "nerdctl", "helpers", "testing_linux.go")); err != nil {
			return fmt.Errorf("nerdctl's copy: %w", err)
		}
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, "nerdctl"), "./cmd/nerdctl")
		cmd.Dir = src
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build nerdctl: %v\n%s", err, out)
		}
		return nil
	})
}

// TestNerdctlCNI: `nerdctl run --net <CNI bridge>` with the kiwi runtime
// gives the container its address on the bridge in VM mode as in
// container mode (and as runc does). nerdctl sets up CNI from its
// createRuntime hook in the network namespace of the state's process, and
// writes /etc/hosts there; the box must come up with that interface and
// that file. After the container is gone its address is free again (the
// postStop hook ran) and nothing is left on the host.
func TestNerdctlCNI(t *testing.T) {
	rel := guestRelease(t)
	noVMLeft(t)
	leaveClean(t, "")
	nerdctl := filepath.Join(nerdctlTool(t), "nerdctl")
	c := startContainerd(t)
	dir := t.TempDir()
	netconf := filepath.Join(dir, "cni")
	if err := os.MkdirAll(netconf, 0o755); err != nil {
		t.Fatal(err)
	}
	conf := fmt.Sprintf(`{"cniVersion": "1.0.0", "name": %q, "plugins": [{"type": "bridge", "bridge": %q,
  "isGateway": false, "ipMasq": false, "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "dataDir": %q}}]}`,
		nerdctlNet, nerdctlBridge, nerdctlSubnet, filepath.Join(dir, "ipam"))
	if err := os.WriteFile(filepath.Join(netconf, "10-kiwi-nerdctl.conflist"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	netnsBefore := netnsList()
	t.Cleanup(func() {
		exec.Command("ip", "link", "del", nerdctlBridge).Run()
		if left := slices.DeleteFunc(netnsList(), func(n string) bool { return slices.Contains(netnsBefore, n) }); len(left) > 0 {
			t.Errorf("network namespaces left: %v", left)
		}
	})
	run := func(args ...string) result {
		t.Helper()
		global := []string{"--address", c.sock, "--namespace", c.ns, "--data-root", filepath.Join(dir, "nerdctl"),
			"--cni-path", cniPluginDir, "--cni-netconfpath", netconf, "--cgroup-manager", "cgroupfs"}
		cmd := exec.Command(nerdctl, append(global, args...)...)
		// containerd finds the kiwi shim on its own PATH; nerdctl needs
		// nothing else from it.
		return runCmd(t, cmd, "")
	}
	_, subnet, _ := net.ParseCIDR(nerdctlSubnet)
	for _, tc := range []struct {
		mode string
		args []string
	}{
		{"vm", nil},
		{"container", []string{"--annotation", "io.kiwi-shim.mode=container"}},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			args := append([]string{"run", "--rm", "--runtime", "io.containerd.kiwi.v2", "--net", nerdctlNet, "--name", "nerdctl-" + tc.mode}, tc.args...)
			args = append(args, c.image, "sh", "-c", "uname -r; ip -o -4 addr show; echo hosts; cat /etc/hosts")
			r := run(args...)
			t.Logf("nerdctl run (%s): exit %d\n%s%s", tc.mode, r.code, r.stdout, r.stderr)
			if r.code != 0 {
				t.Fatalf("nerdctl run in %s mode: exit %d", tc.mode, r.code)
			}
			lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
			if inVM := strings.TrimSpace(lines[0]) == rel; inVM != (tc.mode == "vm") {
				t.Errorf("kernel %q in %s mode (guest kernel %s)", lines[0], tc.mode, rel)
			}
			var addr net.IP
			for _, l := range lines {
				f := strings.Fields(l)
				if len(f) >= 4 && f[2] == "inet" {
					ip, _, err := net.ParseCIDR(f[3])
					if err == nil && subnet.Contains(ip) {
						addr = ip
					}
				}
			}
			if addr == nil {
				t.Fatalf("no address on %s in the %s-mode box", nerdctlSubnet, tc.mode)
			}
			hosts := r.stdout[strings.Index(r.stdout, "hosts\n"):]
			if !strings.Contains(hosts, addr.String()) {
				t.Errorf("/etc/hosts in the box does not name its address %s:\n%s", addr, hosts)
			}
			// The postStop hook released the address: host-local keeps
			// one file per reserved address.
			ipam, _ := filepath.Glob(filepath.Join(dir, "ipam", nerdctlNet, "198.*"))
			if len(ipam) != 0 {
				t.Errorf("addresses still reserved after the container is gone: %v", ipam)
			}
		})
	}
	if r := run("ps", "-a", "-q"); strings.TrimSpace(r.stdout) != "" {
		t.Errorf("containers left: %s", r.stdout)
	}
}
