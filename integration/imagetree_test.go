package integration

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// buildVaries lists what two builds of the oem description legitimately
// make differently, whatever KIWI's tree lives on: the file is there on
// both sides with the same type, mode and owner, but its bytes differ.
// Found by comparing container-mode builds (the rest of the 6.8k
// entries were identical, hashes included). There is no /etc/machine-id,
// random seed or ssh host key to exclude: the image has no systemd,
// openssh or random-seed service.
var buildVaries = []treeExclusion{
	{pattern: "/boot/mbrid", why: "KIWI's random MBR disk identifier"},
	{pattern: "/etc/fstab", why: "names the root file system by its UUID, new with every mkfs"},
	{pattern: "/etc/hostname", why: "debootstrap copies the build container's, under podman its id"},
	{pattern: "/var/cache/ldconfig/aux-cache", why: "ldconfig's cache records inode numbers and ctimes"},
	{pattern: "/var/log/*.log", why: "timestamped logs (dpkg, bootstrap, alternatives)"},
	{pattern: "/var/log/apt/*.log", why: "timestamped logs of apt"},
}

// imageTree lists the root file system of the oem image in out: for each
// path (from "/"), its type, permission bits, owner, and what else makes
// the file what it is: a regular file's size, link count and SHA-256, a
// symlink's target, a device's number, and every extended attribute
// (name and SHA-256 of the value). Directories are listed without size
// (a directory's size depends on its history, not its entries) and no
// time is listed. The partition is mounted read-only without replaying
// its journal.
func imageTree(t testing.TB, out string) map[string]string {
	t.Helper()
	dev, detach := attachRoot(t, out)
	defer detach()
	mnt := t.TempDir()
	mustRun(t, nil, "mount", "-t", "ext4", "-o", "ro,noload,nodev,nosuid,noexec", dev, mnt)
	defer func() {
		if r := run(t, nil, "umount", mnt); r.code != 0 {
			t.Errorf("umount %s: %s", mnt, r.stderr)
		}
	}()
	tree := map[string]string{}
	err := filepath.WalkDir(mnt, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel := "/" + strings.TrimPrefix(strings.TrimPrefix(p, mnt), "/")
		if rel == "/lost+found" {
			return filepath.SkipDir // mke2fs's, not the tree's
		}
		e, err := treeEntry(p, normalized[rel])
		if err != nil {
			return err
		}
		tree[rel] = e
		return nil
	})
	if err != nil {
		t.Fatalf("list %s: %v", out, err)
	}
	return tree
}

// normalized lists files whose contents are hashed after a change that
// takes out what differs between builds while keeping the rest compared.
var normalized = map[string]func([]byte) []byte{
	// The day of each account's last password change (days since
	// 1970, UTC): two builds on either side of midnight differ.
	"/etc/shadow":  withoutShadowDays,
	"/etc/shadow-": withoutShadowDays,
}

// withoutShadowDays blanks the third field (lastchg) of shadow lines.
func withoutShadowDays(b []byte) []byte {
	lines := strings.Split(string(b), "\n")
	for i, l := range lines {
		if f := strings.Split(l, ":"); len(f) > 2 {
			f[2] = ""
			lines[i] = strings.Join(f, ":")
		}
	}
	return []byte(strings.Join(lines, "\n"))
}

// treeEntry describes the file at p (not following a symlink); a regular
// file's contents are hashed after norm, if not nil.
func treeEntry(p string, norm func([]byte) []byte) (string, error) {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return "", err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%c %04o %d:%d", fileType(st.Mode), st.Mode&07777, st.Uid, st.Gid)
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		sum, err := fileSHA256(p, norm)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(&b, " size=%d nlink=%d sha256=%s", st.Size, st.Nlink, sum)
	case unix.S_IFLNK:
		target, err := os.Readlink(p)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(&b, " -> %s", target)
	case unix.S_IFCHR, unix.S_IFBLK:
		fmt.Fprintf(&b, " dev=%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	attrs, err := xattrs(p)
	if err != nil {
		return "", err
	}
	for _, a := range attrs {
		b.WriteString(" " + a)
	}
	return b.String(), nil
}

func fileType(mode uint32) byte {
	switch mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return 'd'
	case unix.S_IFREG:
		return 'f'
	case unix.S_IFLNK:
		return 'l'
	case unix.S_IFCHR:
		return 'c'
	case unix.S_IFBLK:
		return 'b'
	case unix.S_IFIFO:
		return 'p'
	case unix.S_IFSOCK:
		return 's'
	}
	return '?'
}

func fileSHA256(p string, norm func([]byte) []byte) (string, error) {
	if norm != nil {
		b, err := os.ReadFile(p)
		if err != nil {
			return "", err
		}
		sum := sha256.Sum256(norm(b))
		return hex.EncodeToString(sum[:]), nil
	}
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// xattrs lists the extended attributes of p (not following a symlink)
// as NAME=SHA-256 prefix of the value, sorted.
func xattrs(p string) ([]string, error) {
	size, err := unix.Llistxattr(p, nil)
	if err != nil || size == 0 {
		return nil, err
	}
	buf := make([]byte, size)
	size, err = unix.Llistxattr(p, buf)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, name := range strings.Split(strings.TrimRight(string(buf[:size]), "\x00"), "\x00") {
		val := make([]byte, 64<<10)
		k, err := unix.Lgetxattr(p, name, val)
		if err != nil {
			return nil, fmt.Errorf("%s: %s: %w", p, name, err)
		}
		sum := sha256.Sum256(val[:k])
		out = append(out, name+"="+hex.EncodeToString(sum[:8]))
	}
	sort.Strings(out)
	return out, nil
}

// treeDiff compares two image trees and returns one line per path that
// differs, sorted. Paths matching an exclusion in varying are compared
// without their size, hash and link count (but with type, mode, owner
// and extended attributes).
func treeDiff(a, b map[string]string, nameA, nameB string, varying []treeExclusion) []string {
	var diffs []string
	seen := map[string]bool{}
	for _, p := range sortedKeys(a, b) {
		if seen[p] {
			continue
		}
		seen[p] = true
		ea, okA := a[p]
		eb, okB := b[p]
		x := exclusionFor(varying, p)
		switch {
		case okA && okB:
			if x != nil {
				ea, eb = withoutContent(ea), withoutContent(eb)
			}
			if ea != eb {
				diffs = append(diffs, fmt.Sprintf("%s: %s %s, %s %s", p, nameA, ea, nameB, eb))
			}
		case okA:
			diffs = append(diffs, fmt.Sprintf("%s: only in %s (%s)", p, nameA, ea))
		default:
			diffs = append(diffs, fmt.Sprintf("%s: only in %s (%s)", p, nameB, eb))
		}
	}
	return diffs
}

// treeExclusion is a path (or a glob of filepath.Match) whose contents
// legitimately differ between two builds of one description.
type treeExclusion struct {
	pattern, why string
}

// describeExclusions says what a comparison ignored, for the log.
func describeExclusions(xs []treeExclusion) string {
	var s []string
	for _, x := range xs {
		s = append(s, x.pattern+" ("+x.why+")")
	}
	return strings.Join(s, "; ")
}

func exclusionFor(xs []treeExclusion, p string) *treeExclusion {
	for i, x := range xs {
		if ok, _ := filepath.Match(x.pattern, p); ok {
			return &xs[i]
		}
	}
	return nil
}

func withoutContent(e string) string {
	var keep []string
	for _, f := range strings.Fields(e) {
		if !strings.HasPrefix(f, "size=") && !strings.HasPrefix(f, "sha256=") && !strings.HasPrefix(f, "nlink=") {
			keep = append(keep, f)
		}
	}
	return strings.Join(keep, " ")
}

func sortedKeys(ms ...map[string]string) []string {
	var keys []string
	for _, m := range ms {
		for k := range m {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	return keys
}
