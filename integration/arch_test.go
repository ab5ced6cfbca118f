package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestVMArm64: an arm64 busybox root file system (Debian's
// busybox-static:arm64) runs in an aarch64 guest on this x86_64 host
// (qemu-system-aarch64 under TCG, Debian's arm64 kernel, the embedded
// arm64 kiwi-box-init) without any annotation: the architecture comes from
// the ELF header of the entrypoint. The exit status passes through and a
// bind mount works both ways.
func TestVMArm64(t *testing.T) {
	p := newPodman(t, 2, "")
	noVMLeft(t)
	leaveClean(t, "")
	rootfs := busyboxRootfsArch(t, "arm64")
	share := t.TempDir()
	os.WriteFile(filepath.Join(share, "in.txt"), []byte("from host\n"), 0o644)
	start := time.Now()
	r := p.run("", "run", "--rm", "-v", share+":/share", "--rootfs", rootfs, "sh", "-c",
		"uname -m; cat /share/in.txt; echo made in aarch64 > /share/out.txt; exit 5")
	t.Logf("aarch64 container ran in %s", time.Since(start).Round(time.Millisecond))
	if r.code != 5 || r.stdout != "aarch64\nfrom host\n" {
		t.Fatalf("exit %d, stdout %q, stderr %q; want 5 and aarch64", r.code, r.stdout, r.stderr)
	}
	if b, err := os.ReadFile(filepath.Join(share, "out.txt")); err != nil || string(b) != "made in aarch64\n" {
		t.Fatalf("bind mount write: %q, %v", b, err)
	}
	// The annotation wins over the ELF header: an aarch64 guest cannot run
	// this x86_64 root file system, and says so.
	host := busyboxRootfs(t)
	r = p.run("", "run", "--rm", "--annotation", "io.kiwi-shim.vm.arch=arm64", "--rootfs", host, "uname", "-m")
	if r.code == 0 || !strings.Contains(strings.ToLower(r.stdout+r.stderr), "exec format error") {
		t.Fatalf("x86_64 rootfs in an aarch64 guest: exit %d, stdout %q, stderr %q; want exec format error", r.code, r.stdout, r.stderr)
	}
}

// BenchmarkVMArch: start latency (podman run --rm to exit of `true`) and a
// CPU-bound workload (64 MiB through gzip -1 and sha256sum in the guest)
// for an x86_64 guest and an aarch64 guest on this host, both under TCG,
// three rounds interleaved, medians.
func BenchmarkVMArch(b *testing.B) {
	p := benchPodman(b)
	roots := map[string]string{"x86_64": busyboxRootfs(b), "aarch64": busyboxRootfsArch(b, "arm64")}
	const work = "dd if=/dev/zero bs=1M count=64 2>/dev/null | gzip -1 | sha256sum >/dev/null"
	times := map[string][]time.Duration{}
	for range 3 {
		for _, arch := range []string{"x86_64", "aarch64"} {
			for _, kind := range []string{"start", "work"} {
				cmd := "true"
				if kind == "work" {
					cmd = work
				}
				start := time.Now()
				if r := p.run("", "run", "--rm", "--rootfs", roots[arch], "sh", "-c", cmd); r.code != 0 {
					b.Fatalf("%s %s: exit %d: %s", arch, kind, r.code, r.stderr)
				}
				times[arch+"-"+kind] = append(times[arch+"-"+kind], time.Since(start))
			}
		}
	}
	for _, k := range []string{"x86_64-start", "aarch64-start", "x86_64-work", "aarch64-work"} {
		b.ReportMetric(float64(median(times[k]).Milliseconds()), k+"-ms")
	}
	// The workload's own time: the run minus the start of the same arch.
	for _, arch := range []string{"x86_64", "aarch64"} {
		b.ReportMetric(float64((median(times[arch+"-work"]) - median(times[arch+"-start"])).Milliseconds()), arch+"-cpu-ms")
	}
}
