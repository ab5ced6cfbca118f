package integration

import (
	"archive/tar"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// requestLine matches a request go-fuse's trace logs as it receives it:
// "rx UNIQUE: OPCODE nNODE ..." (FORGETs, which the client sends without
// waiting, are logged as "doBatchForget: rx ..." and do not match).
var requestLine = regexp.MustCompile(`\brx \d+: ([A-Z_0-9]+) n\d+`)

// TestShareRequestsPerFile counts the FUSE requests the guest's kernel
// sends to kiwi-sharefs for each file tar unpacks onto the box's root (a
// virtio-fs export), the cost that bounds unpacking on a share: every
// request is a round trip through emulated virtio. It unpacks 200 files
// of 2 KiB with the box's tar as root (which, like dpkg and rpm, also
// sets each file's owner and mode) and, in a second box, none, with
// kiwi-shim --debug (kiwi-sharefs --trace), and divides the difference of
// the two traces by 200. It prints one file's requests and the counts by
// kind.
//
// It checks what the daemon decides: no FLUSH (files are opened with
// FOPEN_NOFLUSH), no OPEN after a CREATE (the create opens), and no more
// requests a file than measured on Linux 6.12 when this test was written
// (perFileLimit), so that a change that adds one shows.
func TestShareRequestsPerFile(t *testing.T) {
	const files = 200
	// Linux 6.12, busybox tar as root: LOOKUP (tar's unlink of the
	// name), LOOKUP again (O_EXCL revalidates the negative entry),
	// CREATE, WRITE, RELEASE, GETATTR of the parent (a
	// create invalidates its attributes), GETXATTR security.capability
	// (the VFS asks before a chown), GETATTR (the client refreshes the
	// mode to clear set-id bits itself), SETATTR owner, SETATTR mode,
	// SETATTR times; then a LOOKUP of the directory (tar's mkdir of each
	// file's parent). Linux 6.1 sends the same.
	const perFileLimit = 12
	rel := guestRelease(t)
	noVMLeft(t)
	counts := func(n int) map[string]int {
		dir := t.TempDir()
		leaveClean(t, dir)
		bundle := busyboxBundle(t, dir, `"sh", "-c", "mkdir /out && tar -xf /files.tar -C /out && echo unpacked"`, `{}`, true)
		writeTar(t, filepath.Join(bundle, "rootfs", "files.tar"), n)
		var trace []byte
		out := runVMBundle(t, dir, bundle, fmt.Sprintf("sharereq-%d", n), func(stateDir string) {
			var err error
			if trace, err = os.ReadFile(filepath.Join(stateDir, "sharefs.log")); err != nil {
				t.Fatal(err)
			}
		})
		if !strings.Contains(out, "unpacked") {
			t.Fatalf("the box did not unpack the files:\n%s", out)
		}
		c := map[string]int{}
		var seq []string // the requests from the first mention of one file to the next file's
		inFile := 0
		for _, l := range strings.Split(string(trace), "\n") {
			m := requestLine.FindStringSubmatch(l)
			if m == nil {
				continue
			}
			c[m[1]]++
			if n > 100 && strings.Contains(l, "f0100") && inFile == 0 {
				inFile = 1
			}
			if strings.Contains(l, "f0101") && inFile == 1 {
				inFile = 2
			}
			if inFile == 1 {
				_, req, _ := strings.Cut(l, "msg=")
				seq = append(seq, req)
			}
		}
		if len(seq) > 0 {
			t.Logf("the requests for one file (f0100):\n%s", strings.Join(seq, "\n"))
		}
		if len(c) == 0 {
			t.Fatalf("no request in kiwi-sharefs's trace:\n%.2000s", trace)
		}
		return c
	}
	base, full := counts(0), counts(files)
	var ops []string
	for op := range full {
		ops = append(ops, op)
	}
	slices.Sort(ops)
	var b strings.Builder
	total := 0.0
	perFile := map[string]float64{}
	for _, op := range ops {
		d := float64(full[op]-base[op]) / files
		if d < 0.05 {
			continue // the box's own start, not the files
		}
		perFile[op] = d
		total += d
		fmt.Fprintf(&b, " %s %.2f", op, d)
	}
	t.Logf("guest kernel %s: %.2f requests per unpacked file:%s", rel, total, b.String())
	for _, op := range []string{"FLUSH", "OPEN"} {
		if perFile[op] > 0 {
			t.Errorf("%.2f %s per file: the daemon's answers should have made them unnecessary", perFile[op], op)
		}
	}
	if total > perFileLimit+0.5 {
		t.Errorf("%.2f requests per file, more than %d", total, perFileLimit)
	}
}

// writeTar writes a tar of n files of 2 KiB in one directory.
func writeTar(t testing.TB, path string, n int) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := tar.NewWriter(f)
	data := []byte(strings.Repeat("kiwi-shim ", 205)[:2048])
	mtime := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	w.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: "d/", Mode: 0o755, ModTime: mtime})
	for i := range n {
		h := &tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("d/f%04d", i), Mode: 0o644, Size: int64(len(data)), ModTime: mtime}
		if err := w.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(data); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}
