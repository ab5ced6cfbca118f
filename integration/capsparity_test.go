package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestVMRuncSpecCapabilities runs the configuration `runc spec` writes
// (ambient capabilities without inheritable ones, which the kernel will
// not raise) with runc and in a VM: both run it, and the process has the
// same inheritable and ambient sets in both (none), and in the VM at least
// runc's others.
func TestVMRuncSpecCapabilities(t *testing.T) {
	guestRelease(t)
	noVMLeft(t)
	dir := t.TempDir()
	leaveClean(t, dir)
	bundle := busyboxBundle(t, dir, `"sh", "-c", "grep ^Cap /proc/self/status"`, `{}`, false)

	runcRoot := filepath.Join(dir, "runc-root")
	ref := run(t, nil, "runc", "--root", runcRoot, "run", "--bundle", bundle, "caps-runc")
	if ref.code != 0 {
		t.Fatalf("runc run: exit %d: %s", ref.code, ref.stderr)
	}

	root := filepath.Join(dir, "root")
	k := func(args ...string) result {
		return run(t, nil, shim(), append([]string{"--root", root}, args...)...)
	}
	out, err := os.Create(filepath.Join(dir, "out"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	create := exec.Command(shim(), "--root", root, "create", "--bundle", bundle, "caps-vm")
	create.Stdout, create.Stderr = out, out
	if err := create.Run(); err != nil {
		b, _ := os.ReadFile(out.Name())
		t.Fatalf("create: %v\n%s", err, b)
	}
	t.Cleanup(func() { k("delete", "--force", "caps-vm") })
	if r := k("start", "caps-vm"); r.code != 0 {
		t.Fatalf("start: %s", r.stderr)
	}
	eventually(t, 60*time.Second, "caps-vm stopped", func() bool { return strings.Contains(k("state", "caps-vm").stdout, `"status": "stopped"`) })
	if r := k("delete", "caps-vm"); r.code != 0 {
		t.Fatalf("delete: %s", r.stderr)
	}
	b, _ := os.ReadFile(out.Name())
	got, want := capSets(string(b)), capSets(ref.stdout)
	// A box also has KIWI's capabilities (oci.KIWICapabilities) in its
	// bounding, effective and permitted sets; the inheritable and ambient
	// sets are the spec's, as runc makes them.
	for _, set := range []string{"CapInh", "CapAmb"} {
		if got[set] != want[set] {
			t.Errorf("%s in the VM %#x, with runc %#x", set, got[set], want[set])
		}
	}
	for _, set := range []string{"CapPrm", "CapEff", "CapBnd"} {
		if got[set]&want[set] != want[set] {
			t.Errorf("%s in the VM %#x lacks some of runc's %#x", set, got[set], want[set])
		}
	}
	if t.Failed() {
		t.Logf("the box's output:\n%s\nrunc's:\n%s", b, ref.stdout)
	}
}

// capSets reads the capability sets from /proc/PID/status lines.
func capSets(status string) map[string]uint64 {
	m := map[string]uint64{}
	for _, l := range strings.Split(status, "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok || !strings.HasPrefix(k, "Cap") {
			continue
		}
		if n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64); err == nil {
			m[k] = n
		}
	}
	return m
}
