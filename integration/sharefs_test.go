package integration

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// sharefsMount mounts src with `kiwi-sharefs mount` and unmounts it (and
// checks it is gone) when the test ends.
func sharefsMount(t testing.TB, src string, args ...string) string {
	t.Helper()
	mnt := t.TempDir()
	var stderr bytes.Buffer
	cmd := exec.Command(filepath.Join(bin, "kiwi-sharefs"), append([]string{"mount", "--source", src, "--mountpoint", mnt}, args...)...)
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("kiwi-sharefs mount: %v\n%s", err, stderr.String())
			}
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			t.Errorf("kiwi-sharefs mount did not stop on SIGINT\n%s", stderr.String())
		}
		if isMounted(mnt) {
			t.Errorf("%s still mounted", mnt)
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for !isMounted(mnt) {
		if time.Now().After(deadline) {
			t.Fatalf("kiwi-sharefs mount did not mount %s\n%s", mnt, stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return mnt
}

func isMounted(dir string) bool {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) > 4 && fields[4] == dir {
			return true
		}
	}
	return false
}

// runSuite runs posixsuite on dir and returns its verdict lines.
func runSuite(t testing.TB, dir string) []string {
	t.Helper()
	out, err := exec.Command(posixsuite, dir).CombinedOutput()
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if err != nil {
		t.Errorf("posixsuite %s: %v\n%s", dir, err, out)
	}
	return lines
}

// TestShareFSPosix: the POSIX suite gives the same verdicts natively and
// on a kiwi-sharefs mount of the same kind of directory.
func TestShareFSPosix(t *testing.T) {
	leaveClean(t, "")
	native := runSuite(t, t.TempDir())
	src := t.TempDir()
	mounted := runSuite(t, sharefsMount(t, src, "--xattr"))
	if strings.Join(native, "\n") != strings.Join(mounted, "\n") {
		t.Fatalf("verdicts differ\nnative:\n%s\nkiwi-sharefs:\n%s", strings.Join(native, "\n"), strings.Join(mounted, "\n"))
	}
	if left, _ := os.ReadDir(src); len(left) != 0 {
		t.Fatalf("the suite left %d entries in the export", len(left))
	}
}

// TestShareFSReadOnly: a read-only mount refuses writes with EROFS.
func TestShareFSReadOnly(t *testing.T) {
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "f"), []byte("x"), 0o644)
	mnt := sharefsMount(t, src, "--read-only")
	if b, err := os.ReadFile(filepath.Join(mnt, "f")); err != nil || string(b) != "x" {
		t.Fatalf("read: %q %v", b, err)
	}
	for name, err := range map[string]error{
		"write":  os.WriteFile(filepath.Join(mnt, "f"), []byte("y"), 0o644),
		"create": os.WriteFile(filepath.Join(mnt, "g"), nil, 0o644),
		"mkdir":  os.Mkdir(filepath.Join(mnt, "d"), 0o755),
		"remove": os.Remove(filepath.Join(mnt, "f")),
		"chmod":  os.Chmod(filepath.Join(mnt, "f"), 0o600),
	} {
		if err == nil || !strings.Contains(err.Error(), "read-only file system") {
			t.Errorf("%s: %v, want EROFS", name, err)
		}
	}
}

// TestShareFSRenameRace: while the host swaps a directory of the export
// with a symlink pointing out of it, reads through the mount never return
// the canary outside the export. The symlink is relative, so that the
// mount's own kernel, resolving it on the client side, finds nothing;
// only a daemon that followed it would reach the canary.
func TestShareFSRenameRace(t *testing.T) {
	base := t.TempDir()
	src, canary := filepath.Join(base, "export"), filepath.Join(base, "outside")
	os.MkdirAll(filepath.Join(src, "real"), 0o755)
	os.MkdirAll(canary, 0o755)
	os.WriteFile(filepath.Join(src, "real", "secret"), []byte("inside"), 0o644)
	os.WriteFile(filepath.Join(canary, "secret"), []byte("CANARY"), 0o644)
	os.Symlink("../outside", filepath.Join(src, "link"))
	mnt := sharefsMount(t, src, "--cache", "never")

	stop := make(chan struct{})
	swapped := make(chan int)
	go func() {
		n := 0
		a, b := filepath.Join(src, "d"), filepath.Join(src, "link")
		os.Rename(filepath.Join(src, "real"), a)
		for {
			select {
			case <-stop:
				swapped <- n
				return
			default:
			}
			// Exchange the directory and the symlink atomically.
			if unix.Renameat2(unix.AT_FDCWD, a, unix.AT_FDCWD, b, unix.RENAME_EXCHANGE) == nil {
				n++
			}
		}
	}()
	deadline := time.Now().Add(5 * time.Second)
	reads, hits := 0, 0
	for time.Now().Before(deadline) {
		b, err := os.ReadFile(filepath.Join(mnt, "d", "secret"))
		reads++
		if err == nil && string(b) == "CANARY" {
			hits++
		}
	}
	close(stop)
	n := <-swapped
	t.Logf("%d reads during %d swaps", reads, n)
	if hits > 0 {
		t.Fatalf("%d reads returned the canary outside the export", hits)
	}
	if n < 10 {
		t.Fatalf("only %d swaps: the race did not run", n)
	}
}
