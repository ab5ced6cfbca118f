package integration

import (
	"bufio"
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// busyboxRootfs makes a minimal root filesystem from Debian's
// busybox-static, plus the named host binaries (with the shared libraries
// they need), e.g. util-linux's losetup, which KIWI uses.
func busyboxRootfs(t testing.TB, hostBins ...string) string {
	t.Helper()
	bb, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatal("busybox not found: apt-get install busybox-static (make deps does)")
	}
	return busyboxRootfsFrom(t, bb, bb, hostBins...)
}

// busyboxRootfsArch makes the same root file system for a foreign
// architecture (Debian's name, e.g. arm64) from that architecture's
// busybox-static package, downloaded and unpacked, not installed. The
// applet links come from the host's busybox of the same package.
func busyboxRootfsArch(t testing.TB, debArch string) string {
	t.Helper()
	dl := t.TempDir()
	os.Chmod(dl, 0o755) // apt-get download runs as _apt where it can
	cmd := exec.Command("apt-get", "download", "-q", "busybox-static:"+debArch)
	cmd.Dir = dl
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("apt-get download busybox-static:%s: %v\n%s(make deps adds the dpkg architecture %s)", debArch, err, out, debArch)
	}
	debs, _ := filepath.Glob(filepath.Join(dl, "*.deb"))
	if len(debs) != 1 {
		t.Fatalf("busybox-static:%s: downloaded %v", debArch, debs)
	}
	mustRun(t, nil, "dpkg-deb", "-x", debs[0], filepath.Join(dl, "x"))
	host, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatal("busybox not found: apt-get install busybox-static (make deps does)")
	}
	return busyboxRootfsFrom(t, filepath.Join(dl, "x", "bin", "busybox"), host)
}

// busyboxRootfsFrom makes the root file system around the busybox binary
// bb, with the applet links that lister (a runnable busybox) lists.
func busyboxRootfsFrom(t testing.TB, bb, lister string, hostBins ...string) string {
	t.Helper()
	root := filepath.Join(t.TempDir(), "rootfs")
	for _, d := range []string{"bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "etc", "root", "run", "var/tmp", "mnt"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.Chmod(filepath.Join(root, "tmp"), 0o1777)
	copyFile(t, bb, filepath.Join(root, "bin/busybox"))
	out, err := exec.Command(lister, "--list").Output()
	if err != nil {
		t.Fatalf("busybox --list: %v", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		applet := sc.Text()
		if applet == "" || applet == "busybox" {
			continue
		}
		os.Symlink("busybox", filepath.Join(root, "bin", applet))
	}
	os.WriteFile(filepath.Join(root, "etc/passwd"), []byte("root:x:0:0:root:/root:/bin/sh\nbuild:x:1000:1000:build:/tmp:/bin/sh\n"), 0o644)
	os.WriteFile(filepath.Join(root, "etc/group"), []byte("root:x:0:\nbuild:x:1000:\n"), 0o644)
	for _, b := range hostBins {
		addHostBinary(t, root, b)
	}
	return root
}

// addHostBinary copies a host binary into root at the same path, with the
// shared libraries ldd lists for it. The busybox applet of the same name,
// if any, is shadowed because /usr/sbin comes first in PATH.
func addHostBinary(t testing.TB, root, name string) {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		for _, d := range []string{"/usr/sbin", "/sbin", "/usr/bin"} {
			if _, err := os.Stat(filepath.Join(d, name)); err == nil {
				p = filepath.Join(d, name)
				break
			}
		}
	}
	if p == "" {
		t.Fatalf("%s not found on the host (make deps installs it)", name)
	}
	p, _ = filepath.EvalSymlinks(p)
	dst := filepath.Join(root, "usr/sbin", filepath.Base(name))
	copyFile(t, p, dst)
	out, err := exec.Command("ldd", p).Output()
	if err != nil {
		return // static
	}
	for _, line := range strings.Split(string(out), "\n") {
		for _, f := range strings.Fields(line) {
			if strings.HasPrefix(f, "/") {
				real, err := filepath.EvalSymlinks(f)
				if err != nil {
					continue
				}
				copyFile(t, real, filepath.Join(root, f))
			}
		}
	}
}

func copyFile(t testing.TB, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	fi, _ := in.Stat()
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, fi.Mode().Perm())
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
}
