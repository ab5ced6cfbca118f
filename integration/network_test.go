package integration

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// testNetwork creates a podman network on a documentation subnet for the
// test and removes it at the end; it also checks that the test left no
// network namespace behind.
func testNetwork(t testing.TB, p *podman, subnet string) string {
	t.Helper()
	name := fmt.Sprintf("kiwitest%d", os.Getpid())
	nsBefore, _ := os.ReadDir("/run/netns")
	p.must("network", "create", "--subnet", subnet, name)
	t.Cleanup(func() {
		// Containers first (newPodman's cleanup runs after this one).
		ids, _ := p.cmd("ps", "-aq", "--filter", "label="+p.label).Output()
		for _, id := range strings.Fields(string(ids)) {
			p.cmd("rm", "-f", "-t", "0", id).Run()
		}
		p.cmd("network", "rm", "-f", name).Run()
		eventually(t, 10*time.Second, "network namespaces removed", func() bool {
			after, _ := os.ReadDir("/run/netns")
			return len(after) <= len(nsBefore)
		})
		if taps, _ := filepath.Glob("/sys/class/net/kiwitap*"); len(taps) > 0 {
			t.Errorf("taps left in the host's namespace: %v", taps)
		}
	})
	return name
}

// webRootfs is a busybox rootfs with httpd content: index.html and a CGI
// script that prints the client's address.
func webRootfs(t testing.TB) string {
	t.Helper()
	root := busyboxRootfs(t)
	os.MkdirAll(filepath.Join(root, "www", "cgi-bin"), 0o755)
	os.WriteFile(filepath.Join(root, "www", "index.html"), []byte("hello from the web container\n"), 0o644)
	os.WriteFile(filepath.Join(root, "www", "cgi-bin", "addr"), []byte("#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"$REMOTE_ADDR\"\n"), 0o755)
	return root
}

func inspectIP(t testing.TB, p *podman, id, network string) string {
	t.Helper()
	return strings.TrimSpace(p.must("inspect", id, "--format", "{{(index .NetworkSettings.Networks \""+network+"\").IPAddress}}"))
}

// TestVMNetwork: a VM-mode container on a podman network (a documentation
// subnet; 192.0.2.0/24 is these machines' own) fetches from a
// server container by address and by name (podman's DNS), and the server
// sees the address podman gave the VM container.
func TestVMNetwork(t *testing.T) {
	guestRelease(t)
	p := newPodman(t, 2, "")
	noVMLeft(t)
	network := testNetwork(t, p, "198.51.100.0/24")
	web := fmt.Sprintf("web%d", os.Getpid())
	rootfs := webRootfs(t)
	p.must("run", "-d", "--name", web, "--network", network, "--annotation", "io.kiwi-shim.mode=container",
		"--rootfs", rootfs, "httpd", "-f", "-p", "80", "-h", "/www")
	webIP := inspectIP(t, p, web, network)

	script := fmt.Sprintf(`wget -qO- http://%s/index.html; wget -qO- http://%s/cgi-bin/addr; echo done; sleep 600`, webIP, web)
	vmc := p.must("run", "-d", "--network", network, "--rootfs", rootfs, "sh", "-c", script)
	var logs string
	eventually(t, 90*time.Second, "the VM container fetched", func() bool {
		r := p.run("", "logs", vmc)
		logs = r.stdout + r.stderr
		return strings.Contains(logs, "done")
	})
	vmIP := inspectIP(t, p, vmc, network)
	// busybox httpd listens on IPv6 and shows IPv4 peers mapped.
	logs = strings.ReplaceAll(strings.ReplaceAll(logs, "[::ffff:", ""), "]", "")
	want := fmt.Sprintf("hello from the web container\n%s\ndone\n", vmIP)
	if logs != want {
		t.Fatalf("VM container printed %q, want %q (by address %s and by name %s)", logs, want, webIP, web)
	}
	p.must("rm", "-f", "-t", "0", vmc)
}

// TestVMNetworkNone: --network none leaves the guest only loopback.
func TestVMNetworkNone(t *testing.T) {
	guestRelease(t)
	p := newPodman(t, 2, "")
	noVMLeft(t)
	r := p.run("", "run", "--rm", "--network", "none", "--rootfs", busyboxRootfs(t), "ls", "/sys/class/net")
	if r.code != 0 || strings.TrimSpace(r.stdout) != "lo" {
		t.Fatalf("exit %d, interfaces %q (stderr %q); want only lo", r.code, r.stdout, r.stderr)
	}
}

// TestVMHostNetnsByPath: a box given the host's own network namespace by
// path (as CRI gives the containers of a hostNetwork pod their
// sandbox's) gets QEMU's user-mode network, like --network host; the
// host's interfaces and addresses stay where they are (moving them into
// the guest, as for a container's own namespace, took the host's
// network down for as long as the box ran).
func TestVMHostNetnsByPath(t *testing.T) {
	guestRelease(t)
	p := newPodman(t, 2, "")
	noVMLeft(t)
	// A handle on the host's namespace, as `ip netns` makes them.
	handle := filepath.Join(t.TempDir(), "hostnet")
	if err := os.WriteFile(handle, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("/proc/self/ns/net", handle, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(handle, unix.MNT_DETACH) })
	before := hostAddrs(t)
	r := p.run("", "run", "--rm", "--network", "ns:"+handle, "--rootfs", busyboxRootfs(t),
		"sh", "-c", "ip -4 -o addr show; cat /sys/class/net/eth0/address")
	if r.code != 0 || !strings.Contains(r.stdout, "10.0.2.15/24") || !strings.Contains(r.stdout, "52:54:00:12:34:56") {
		t.Fatalf("exit %d, stdout %q, stderr %q; want QEMU's user-mode network (10.0.2.15)", r.code, r.stdout, r.stderr)
	}
	if after := hostAddrs(t); after != before {
		t.Fatalf("the host's addresses changed:\nbefore %s\nafter  %s", before, after)
	}
}

// hostAddrs lists the host's global IPv4 addresses by interface.
func hostAddrs(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "-br", "-4", "addr", "show", "scope", "global").Output()
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// TestVMPublish: -p 127.0.0.1:PORT:80 reaches a server inside the VM.
func TestVMPublish(t *testing.T) {
	guestRelease(t)
	p := newPodman(t, 2, "")
	noVMLeft(t)
	network := testNetwork(t, p, "198.51.100.0/24")
	port := 20000 + os.Getpid()%10000
	id := p.must("run", "-d", "--network", network, "-p", "127.0.0.1:"+strconv.Itoa(port)+":80", "--rootfs", webRootfs(t), "httpd", "-f", "-p", "80", "-h", "/www")
	url := fmt.Sprintf("http://127.0.0.1:%d/index.html", port)
	var body string
	eventually(t, 90*time.Second, "the published port answers", func() bool {
		resp, err := http.Get(url)
		if err != nil {
			time.Sleep(200 * time.Millisecond)
			return false
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		body = string(b)
		return resp.StatusCode == 200
	})
	if body != "hello from the web container\n" {
		t.Fatalf("GET %s: %q", url, body)
	}
	p.must("rm", "-f", "-t", "0", id)
}
