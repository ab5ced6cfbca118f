package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// fsbenchRows are the rows fsbench prints, in order.
var fsbenchRows = []string{"seq-write", "seq-read", "rand-read", "untar", "find-stat"}

// parseFsbench reads fsbench's "NAME SECONDS" lines.
func parseFsbench(b *testing.B, target, out string) map[string]float64 {
	b.Helper()
	m := map[string]float64{}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(l)
		if len(f) == 2 {
			if v, err := strconv.ParseFloat(f[1], 64); err == nil {
				m[f[0]] = v
			}
		}
	}
	for _, r := range fsbenchRows {
		if _, ok := m[r]; !ok {
			b.Fatalf("%s: no %s row in fsbench output:\n%s", target, r, out)
		}
	}
	return m
}

// BenchmarkShareFS runs one fsbench workload (1 GiB sequential write and
// read, 4 KiB random reads, untar of a 10k-file tree, find+stat of it)
// through (a) virtio-fs served by kiwi-sharefs in a VM, (b) QEMU's 9p
// (msize 512K) in the same VM size and accelerator, (c) a kiwi-sharefs
// mount on the host, (d) go-fuse's loopback example on the host, (e) the
// native directory, and (f) tmpfs inside the VM, the limit; it prints the
// table and the ratios a/b, a/f and c/d.
func BenchmarkShareFS(b *testing.B) {
	guestRelease(b)
	tools := b.TempDir()
	fsbench := filepath.Join(tools, "fsbench")
	loopback := filepath.Join(tools, "loopback")
	for _, bl := range []struct{ out, pkg string }{{fsbench, "./fsbench"}, {loopback, "github.com/hanwen/go-fuse/v2/example/loopback"}} {
		cmd := exec.Command("go", "build", "-o", bl.out, bl.pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("build %s: %v\n%s", bl.pkg, err, out)
		}
	}
	// podman's leak checks run last (cleanups run in reverse): the host
	// mounts below are gone by then.
	p := newPodman(b, 2, "")
	noVMLeft(b)
	results := map[string]map[string]float64{}
	host := func(name, dir string) {
		out, err := exec.Command(fsbench, "-drop", dir).CombinedOutput()
		if err != nil {
			b.Fatalf("%s: %v\n%s", name, err, out)
		}
		results[name] = parseFsbench(b, name, string(out))
	}
	host("e native", b.TempDir())
	host("c kiwi-sharefs mount", sharefsMount(b, b.TempDir()))
	// go-fuse's loopback example, as its README runs it.
	orig, mnt := b.TempDir(), b.TempDir()
	lb := exec.Command(loopback, mnt, orig)
	if err := lb.Start(); err != nil {
		b.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !isMounted(mnt) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	host("d go-fuse loopback", mnt)
	exec.Command("umount", mnt).Run()
	lb.Wait()

	rootfs := busyboxRootfs(b)
	copyFile(b, fsbench, filepath.Join(rootfs, "fsbench"))
	os.Chmod(filepath.Join(rootfs, "fsbench"), 0o755)
	guest := func(name string, args ...string) {
		start := time.Now()
		r := p.run("", append(append([]string{"run", "--rm", "--annotation", "io.kiwi-shim.vm.memory=3G"}, args...), "--rootfs", rootfs, "/fsbench", "-drop", "/data")...)
		if r.code != 0 {
			b.Fatalf("%s: exit %d\n%s\n%s", name, r.code, r.stdout, r.stderr)
		}
		results[name] = parseFsbench(b, name, r.stdout)
		b.Logf("%s: %s", name, time.Since(start).Round(time.Second))
	}
	guest("a virtio-fs (kiwi-sharefs)", "--annotation", "io.kiwi-shim.share=virtiofs", "-v", b.TempDir()+":/data")
	guest("b 9p (QEMU)", "--annotation", "io.kiwi-shim.share=9p", "-v", b.TempDir()+":/data")
	guest("f guest tmpfs", "--tmpfs", "/data:rw,size=2g")

	names := []string{"a virtio-fs (kiwi-sharefs)", "b 9p (QEMU)", "c kiwi-sharefs mount", "d go-fuse loopback", "e native", "f guest tmpfs"}
	fmt.Printf("\n%-12s", "seconds")
	for _, n := range names {
		fmt.Printf(" %12s", strings.Fields(n)[0]+" "+strings.Fields(n)[1])
	}
	fmt.Printf(" %8s %8s %8s\n", "a/b", "a/f", "c/d")
	for _, r := range fsbenchRows {
		fmt.Printf("%-12s", r)
		for _, n := range names {
			fmt.Printf(" %12.3f", results[n][r])
		}
		a, bb, c, d, f := results[names[0]][r], results[names[1]][r], results[names[2]][r], results[names[3]][r], results[names[5]][r]
		fmt.Printf(" %8.2f %8.2f %8.2f\n", a/bb, a/f, c/d)
		b.ReportMetric(a/bb, r+"-a/b")
	}
	fmt.Println("(a..f as above; the VM rows under the same accelerator and a 3G guest; ratios < 1 mean a or c is faster)")
}
