package integration

import (
	"bufio"
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
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

// runSuite runs posixsuite on dir (after its flags, if any) and returns
// its verdict lines.
func runSuite(t testing.TB, dir string, flags ...string) []string {
	t.Helper()
	out, err := exec.Command(posixsuite, append(flags, dir)...).CombinedOutput()
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if err != nil {
		t.Errorf("posixsuite %s: %v\n%s", dir, err, out)
	}
	return lines
}

// TestShareFSPosix: the POSIX suite gives the same verdicts natively and
// on a kiwi-sharefs mount of the same kind of directory, in mapped mode
// (device nodes) and without it (where mknod of a device is EPERM by
// design, so that check is skipped).
func TestShareFSPosix(t *testing.T) {
	leaveClean(t, "")
	native := runSuite(t, t.TempDir())
	for _, c := range []struct {
		name string
		args []string
		skip string
	}{
		{"mapped", []string{"--xattr", "--mapped"}, ""},
		{"unmapped", []string{"--xattr"}, "mknod-devices"},
	} {
		t.Run(c.name, func(t *testing.T) {
			want := native
			var flags []string
			if c.skip != "" {
				flags = []string{"-skip", c.skip}
				want = slices.Clone(native)
				for i, l := range want {
					if strings.HasSuffix(l, " "+c.skip) || strings.Contains(l, " "+c.skip+":") {
						want[i] = "skip " + c.skip
					}
				}
			}
			src := t.TempDir()
			mounted := runSuite(t, sharefsMount(t, src, c.args...), flags...)
			if strings.Join(want, "\n") != strings.Join(mounted, "\n") {
				t.Fatalf("verdicts differ\nnative:\n%s\nkiwi-sharefs:\n%s", strings.Join(want, "\n"), strings.Join(mounted, "\n"))
			}
			if left, _ := os.ReadDir(src); len(left) != 0 {
				t.Fatalf("the suite left %d entries in the export", len(left))
			}
		})
	}
}

// TestShareFSMapped: through a --mapped mount, device nodes, FIFOs and
// set-user-ID bits are what the client made, while the export holds
// plain files without set-id bits; the device cannot be opened on the
// host (the mount is nodev).
func TestShareFSMapped(t *testing.T) {
	src := t.TempDir()
	mnt := sharefsMount(t, src, "--mapped")
	if err := unix.Mknod(filepath.Join(mnt, "sda"), unix.S_IFBLK|0o644, int(unix.Mkdev(8, 0))); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mkfifo(filepath.Join(mnt, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "su"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(mnt, "su"), 0o4755|os.ModeSetuid); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]uint32{"sda": unix.S_IFBLK | 0o644, "fifo": unix.S_IFIFO | 0o644, "su": unix.S_IFREG | 0o4755} {
		var seen, host unix.Stat_t
		if err := unix.Lstat(filepath.Join(mnt, name), &seen); err != nil {
			t.Fatal(err)
		}
		if err := unix.Lstat(filepath.Join(src, name), &host); err != nil {
			t.Fatal(err)
		}
		if seen.Mode != want {
			t.Errorf("%s: mount shows mode %#o, want %#o", name, seen.Mode, want)
		}
		if host.Mode&unix.S_IFMT != unix.S_IFREG || host.Mode&(unix.S_ISUID|unix.S_ISGID) != 0 {
			t.Errorf("%s: the export holds mode %#o, want a plain file", name, host.Mode)
		}
	}
	var st unix.Stat_t
	unix.Lstat(filepath.Join(mnt, "sda"), &st)
	if st.Rdev != unix.Mkdev(8, 0) {
		t.Errorf("sda: device %d:%d, want 8:0", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	if f, err := os.Open(filepath.Join(mnt, "sda")); err == nil {
		f.Close()
		t.Fatal("opened a mapped block device on the host")
	}
	// Without --mapped, the mapping is a plain file's attribute, and
	// device nodes are refused.
	plain := sharefsMount(t, src)
	unix.Lstat(filepath.Join(plain, "sda"), &st)
	if st.Mode != unix.S_IFREG|0o600 {
		t.Errorf("sda without --mapped: mode %#o, want a plain 0600 file", st.Mode)
	}
	if err := unix.Mknod(filepath.Join(plain, "sdb"), unix.S_IFBLK|0o666, int(unix.Mkdev(8, 16))); !errors.Is(err, unix.EPERM) {
		t.Errorf("mknod of a block device without --mapped: %v, want EPERM", err)
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
