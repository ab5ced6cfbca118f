//go:build treeshare

package integration

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestKiwiTreeOnShare builds the oem description twice in VM mode with
// `kiwi-shim boxbuild`: once with KIWI's tree on the guest's scratch disk
// (the default), once with `--scratch 0`, KIWI's target directory (and
// so its image root, where debootstrap and dpkg make device nodes and
// set-user-ID programs) on the bind-mounted host directory, served by
// kiwi-sharefs in mapped mode. Both images must pass checkImage, list
// the same packages and hold the same root file system: every path with
// its type, mode, owner, size, link count, content hash, symlink target,
// device number and extended attributes, but for buildVaries. The host
// side of the share build must hold no device node, FIFO, socket or
// set-id file: those are plain files with their mapping. Prints both
// build times and KIWI's phases (docs/benchmarks.md).
func TestKiwiTreeOnShare(t *testing.T) {
	ensureBox(t)
	guestRelease(t)
	desc := renderDescription(t, "bookworm-oem", nil)
	dir := t.TempDir()
	variants := []struct {
		name, out string
		args      []string
		took      time.Duration
	}{
		// The share first: it is the build that can fail, and its
		// failure should not wait for the scratch build.
		{name: "share", args: []string{"--scratch", "0"}},
		{name: "scratch"},
	}
	for i := range variants {
		v := &variants[i]
		v.out = filepath.Join(dir, v.name)
		start := time.Now()
		r := boxbuild(t, append(v.args, "--box-memory", "4G", "--", "--description", desc, "--target-dir", v.out)...)
		v.took = time.Since(start)
		log, _ := os.ReadFile(filepath.Join(v.out, "build", "image-root.log"))
		if r.code != 0 {
			t.Fatalf("build with the tree on the %s: exit %d\n%s\n%s\nKIWI log tail:\n%s", v.name, r.code, tailLines(r.stdout, 20), tailLines(r.stderr, 20), tailLines(string(log), 40))
		}
		checkImage(t, v.out)
		phases := kiwiPhaseTimes(string(log))
		var ph []string
		for _, p := range kiwiPhases[:len(kiwiPhases)-1] {
			ph = append(ph, fmt.Sprintf("%s %.0f s", p.name, phases[p.name]))
		}
		t.Logf("tree on the %s: %s (%s)", v.name, v.took.Round(time.Second), strings.Join(ph, ", "))
	}
	share, scratch := variants[0].out, variants[1].out

	if _, err := os.Stat(filepath.Join(scratch, "build", "image-root")); err == nil {
		t.Error("scratch build: KIWI's image root crossed the share")
	}
	checkMappedTree(t, filepath.Join(share, "build", "image-root"))

	pkgs := func(out string) string {
		lists, _ := filepath.Glob(filepath.Join(out, "*.packages"))
		if len(lists) != 1 {
			t.Fatalf("package lists in %s: %v", out, lists)
		}
		b, err := os.ReadFile(lists[0])
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if a, b := pkgs(scratch), pkgs(share); a != b {
		t.Errorf("the builds installed different packages:\nscratch:\n%s\nshare:\n%s", a, b)
	}

	ta, tb := imageTree(t, scratch), imageTree(t, share)
	diffs := treeDiff(ta, tb, "scratch", "share", buildVaries)
	if len(diffs) > 0 {
		t.Errorf("the root file systems differ in %d of %d/%d paths:\n%s", len(diffs), len(ta), len(tb), strings.Join(diffs, "\n"))
	} else {
		t.Logf("root file systems: the same %d paths, all identical but the contents of %s", len(ta), describeExclusions(buildVaries))
	}
	t.Logf("build time: tree on the share %s, on the scratch disk %s (ratio %.2f)",
		variants[0].took.Round(time.Second), variants[1].took.Round(time.Second), variants[0].took.Seconds()/variants[1].took.Seconds())
}

// checkMappedTree checks KIWI's image root as the host has it after a
// build on a mapped share: no device node, FIFO, socket, set-id bit or
// file capability anywhere, and the guest's /dev/null is a plain file of
// mode 0600 whose mapping says character device 1:3.
func checkMappedTree(t *testing.T, root string) {
	t.Helper()
	if _, err := os.Stat(root); err != nil {
		t.Fatalf("share build: KIWI's image root is not in the target directory: %v", err)
	}
	attr := "trusted.kiwi-sharefs.mode"
	mapped, setID := 0, 0
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFCHR, unix.S_IFBLK, unix.S_IFIFO, unix.S_IFSOCK:
			t.Errorf("%s: a %c node on the host", p, fileType(st.Mode))
		case unix.S_IFREG:
			if st.Mode&(unix.S_ISUID|unix.S_ISGID) != 0 {
				t.Errorf("%s: mode %#o on the host", p, st.Mode)
			}
			if _, err := unix.Lgetxattr(p, "security.capability", nil); err == nil {
				t.Errorf("%s: file capabilities on the host", p)
			}
			buf := make([]byte, 64)
			if k, err := unix.Lgetxattr(p, attr, buf); err == nil {
				mapped++
				if m := strings.Fields(string(buf[:k])); len(m) == 5 {
					if mode, err := strconv.ParseUint(m[0], 8, 32); err == nil && mode&unix.S_IFMT == unix.S_IFREG {
						setID++ // a regular file's mapping: its set-id bits
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	null := filepath.Join(root, "dev", "null")
	var st unix.Stat_t
	buf := make([]byte, 64)
	k, err := unix.Lgetxattr(null, attr, buf)
	if err2 := unix.Lstat(null, &st); err2 != nil || err != nil || st.Mode != unix.S_IFREG|0o600 || string(buf[:max(k, 0)]) != "20666 1 3 0 0" {
		t.Errorf("%s on the host: mode %#o (%v), mapping %q (%v); want a 0600 file mapped as \"20666 1 3 0 0\"", null, st.Mode, err2, buf[:max(k, 0)], err)
	}
	t.Logf("share build: %d mapped files in the image root on the host (%d of them set-id programs), no special file or set-id bit", mapped, setID)
}
