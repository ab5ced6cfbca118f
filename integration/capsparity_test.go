package integration

import (
	"path/filepath"
	"strconv"
	"strings"
	"testing"
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

	b := runVMBundle(t, dir, bundle, "caps-vm", nil)
	got, want := capSets(b), capSets(ref.stdout)
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
