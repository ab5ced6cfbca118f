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

// BenchmarkVMNetwork: TCP throughput from a VM-mode container (tap + tc
// mirred) to a server container on the same podman network, against the
// same transfer from a plain runc container (kiwi-shim's container mode),
// 256 MiB each, timed by the receiver.
func BenchmarkVMNetwork(b *testing.B) {
	guestRelease(b)
	tcpbench := filepath.Join(b.TempDir(), "tcpbench")
	build := exec.Command("go", "build", "-o", tcpbench, "./tcpbench")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("build tcpbench: %v\n%s", err, out)
	}
	// Server and runc sender each lease loop devices in container mode.
	p := newPodman(b, 4, "")
	noVMLeft(b)
	network := testNetwork(b, p, "203.0.113.0/24")
	rootfs := busyboxRootfs(b)
	copyFile(b, tcpbench, filepath.Join(rootfs, "tcpbench"))
	os.Chmod(filepath.Join(rootfs, "tcpbench"), 0o755)
	server := p.must("run", "-d", "--network", network, "--annotation", "io.kiwi-shim.mode=container", "--rootfs", rootfs, "/tcpbench", "-listen", ":5001")
	ip := inspectIP(b, p, server, network)
	send := func(mode string) float64 {
		before := strings.Count(p.run("", "logs", server).stdout, "MiB/s")
		r := p.run("", "run", "--rm", "--network", network, "--annotation", "io.kiwi-shim.mode="+mode, "--rootfs", rootfs, "/tcpbench", "-send", ip+":5001", "-mib", "256")
		if r.code != 0 {
			b.Fatalf("%s sender: exit %d %s", mode, r.code, r.stderr)
		}
		var line string
		eventually(b, 30*time.Second, "the server measured", func() bool {
			lines := strings.Split(strings.TrimSpace(p.run("", "logs", server).stdout), "\n")
			if strings.Count(strings.Join(lines, "\n"), "MiB/s") <= before {
				return false
			}
			line = lines[len(lines)-1]
			return true
		})
		f := strings.Fields(line)
		v, _ := strconv.ParseFloat(f[len(f)-2], 64)
		fmt.Printf("%-28s %s\n", mode+" -> container:", line)
		return v
	}
	vm := send("vm")
	runc := send("container")
	b.ReportMetric(vm, "vm-MiB/s")
	b.ReportMetric(runc, "runc-MiB/s")
	b.ReportMetric(vm/runc, "ratio")
}
