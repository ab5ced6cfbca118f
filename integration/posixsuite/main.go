// Command posixsuite checks POSIX file-system behaviour in a directory.
// The integration tests run the same static binary against a native
// directory, a `kiwi-sharefs mount` and a virtio-fs share inside a VM, and
// compare: every difference from native is a failure unless documented.
//
// usage: posixsuite [-skip NAME,...] DIR
//
//	posixsuite -map FILE...
//
// It prints one line per check ("ok NAME" or "FAIL NAME: why") and exits
// 1 when a check failed. It only touches DIR/posixsuite.*, which it
// removes at the end. Run as root, it also checks what an unprivileged
// caller (uid and gid 65534) may do: it runs itself again as that user
// (-probe, below), relative to a directory descriptor it passes, so that
// the directories above DIR need not be open to that user.
//
// With -map it checks no directory: it maps each FILE, opened read-only,
// MAP_SHARED and PROT_READ, and prints "FILE SIZE SHA256" of the mapped
// bytes, or "FILE: error" and exits 1.
package main

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

type check struct {
	name string
	fn   func(dir string) error
}

var checks = []check{
	{"create-read-write", createReadWrite},
	{"truncate", truncate},
	{"append", appendWrite},
	{"rename-file", renameFile},
	{"rename-over-existing", renameOver},
	{"rename-dir-across", renameDirAcross},
	{"rename-noreplace", renameNoReplace},
	{"hardlink", hardlink},
	{"symlink-readlink", symlink},
	{"chmod", chmod},
	{"chown", chown},
	{"utimes", utimes},
	{"mkdir-rmdir", mkdirRmdir},
	{"mknod-fifo", fifo},
	{"sparse-4g", sparse},
	{"xattr", xattr},
	{"readdir-10k", readdir10k},
	{"fsync", fsync},
	{"o-direct-read", odirect},
	{"mmap-private", mmapPrivate},
	{"mmap-shared-write", mmapSharedWrite},
	{"mmap-shared-read", mmapSharedRead},
	{"unlink-open-file", unlinkOpen},
	{"statfs", statfs},
	{"mode-0000", modeZero},
	{"access-unprivileged", accessUnprivileged},
	{"name-max", nameMax},
	{"mknod-devices", mknodDevices},
}

func main() {
	skip := flag.String("skip", "", "comma-separated checks not to run")
	probe := flag.Bool("probe", false, "internal: run the probes OP:NAME... relative to descriptor 3 and print one errno a line")
	mapShared := flag.Bool("map", false, "map each FILE read-only MAP_SHARED and print its size and SHA-256")
	flag.Parse()
	if *probe {
		runProbes(flag.Args())
		return
	}
	if *mapShared {
		failed := false
		for _, p := range flag.Args() {
			if err := printMapped(p); err != nil {
				fmt.Printf("%s: %v\n", p, err)
				failed = true
			}
		}
		if failed {
			os.Exit(1)
		}
		return
	}
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: posixsuite [-skip NAME,...] DIR")
		os.Exit(2)
	}
	base, err := os.MkdirTemp(flag.Arg(0), "posixsuite.")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	defer os.RemoveAll(base)
	skipped := strings.Split(*skip, ",")
	failed := 0
	for _, c := range checks {
		if slices.Contains(skipped, c.name) {
			fmt.Printf("skip %s\n", c.name)
			continue
		}
		dir := filepath.Join(base, c.name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			fmt.Printf("FAIL %s: %v\n", c.name, err)
			failed++
			continue
		}
		if err := c.fn(dir); err != nil {
			fmt.Printf("FAIL %s: %v\n", c.name, err)
			failed++
		} else {
			fmt.Printf("ok %s\n", c.name)
		}
	}
	if failed > 0 {
		os.RemoveAll(base)
		os.Exit(1)
	}
}

func expect(got, want any, what string) error {
	if fmt.Sprint(got) != fmt.Sprint(want) {
		return fmt.Errorf("%s: got %v, want %v", what, got, want)
	}
	return nil
}

func createReadWrite(dir string) error {
	p := filepath.Join(dir, "f")
	if err := os.WriteFile(p, []byte("hello world"), 0o640); err != nil {
		return err
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte("HELLO"), 0); err != nil {
		return err
	}
	buf := make([]byte, 64)
	n, err := f.ReadAt(buf, 6)
	if err != nil && !errors.Is(err, os.ErrClosed) && n == 0 {
		return fmt.Errorf("read at 6: %v", err)
	}
	if err := expect(string(buf[:n]), "world", "read at 6"); err != nil {
		return err
	}
	b, _ := os.ReadFile(p)
	if err := expect(string(b), "HELLO world", "content"); err != nil {
		return err
	}
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	if err := expect(fi.Mode().Perm(), os.FileMode(0o640), "mode"); err != nil {
		return err
	}
	if _, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644); !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("O_EXCL on an existing file: %v, want EEXIST", err)
	}
	if _, err := os.Open(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("open missing: %v, want ENOENT", err)
	}
	return nil
}

func truncate(dir string) error {
	p := filepath.Join(dir, "f")
	os.WriteFile(p, []byte("0123456789"), 0o644)
	if err := os.Truncate(p, 4); err != nil {
		return err
	}
	if b, _ := os.ReadFile(p); string(b) != "0123" {
		return fmt.Errorf("after truncate to 4: %q", b)
	}
	if err := os.Truncate(p, 8); err != nil {
		return err
	}
	if b, _ := os.ReadFile(p); !bytes.Equal(b, []byte("0123\x00\x00\x00\x00")) {
		return fmt.Errorf("after extending to 8: %q", b)
	}
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	f.Close()
	fi, _ := os.Stat(p)
	return expect(fi.Size(), 0, "size after O_TRUNC")
}

func appendWrite(dir string) error {
	p := filepath.Join(dir, "f")
	os.WriteFile(p, []byte("a"), 0o644)
	for _, s := range []string{"b", "c"} {
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			return err
		}
		f.WriteAt([]byte("ignored"), 0) // Go refuses WriteAt on O_APPEND
		if _, err := f.Write([]byte(s)); err != nil {
			return err
		}
		f.Close()
	}
	b, _ := os.ReadFile(p)
	return expect(string(b), "abc", "content")
}

func renameFile(dir string) error {
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	os.WriteFile(a, []byte("x"), 0o644)
	if err := os.Rename(a, b); err != nil {
		return err
	}
	if _, err := os.Stat(a); !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("old name still there: %v", err)
	}
	c, _ := os.ReadFile(b)
	return expect(string(c), "x", "renamed content")
}

func renameOver(dir string) error {
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	os.WriteFile(a, []byte("new"), 0o644)
	os.WriteFile(b, []byte("old"), 0o644)
	if err := os.Rename(a, b); err != nil {
		return err
	}
	c, _ := os.ReadFile(b)
	if err := expect(string(c), "new", "content"); err != nil {
		return err
	}
	// A directory over a non-empty directory fails.
	os.MkdirAll(filepath.Join(dir, "d1"), 0o755)
	os.MkdirAll(filepath.Join(dir, "d2", "x"), 0o755)
	if err := os.Rename(filepath.Join(dir, "d1"), filepath.Join(dir, "d2")); !errors.Is(err, unix.ENOTEMPTY) && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("dir over non-empty dir: %v, want ENOTEMPTY", err)
	}
	return nil
}

func renameDirAcross(dir string) error {
	src := filepath.Join(dir, "from", "tree")
	os.MkdirAll(filepath.Join(src, "sub"), 0o755)
	os.WriteFile(filepath.Join(src, "sub", "f"), []byte("deep"), 0o644)
	os.Mkdir(filepath.Join(dir, "to"), 0o755)
	dst := filepath.Join(dir, "to", "tree")
	if err := os.Rename(src, dst); err != nil {
		return err
	}
	c, err := os.ReadFile(filepath.Join(dst, "sub", "f"))
	if err != nil {
		return err
	}
	if err := expect(string(c), "deep", "content after moving its directory"); err != nil {
		return err
	}
	// A directory cannot move below itself.
	if err := os.Rename(dst, filepath.Join(dst, "sub", "x")); !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("rename into own subtree: %v, want EINVAL", err)
	}
	return nil
}

func renameNoReplace(dir string) error {
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	os.WriteFile(a, []byte("a"), 0o644)
	os.WriteFile(b, []byte("b"), 0o644)
	if err := unix.Renameat2(unix.AT_FDCWD, a, unix.AT_FDCWD, b, unix.RENAME_NOREPLACE); !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("RENAME_NOREPLACE over existing: %v, want EEXIST", err)
	}
	if err := unix.Renameat2(unix.AT_FDCWD, a, unix.AT_FDCWD, b, unix.RENAME_EXCHANGE); err != nil {
		return fmt.Errorf("RENAME_EXCHANGE: %v", err)
	}
	c, _ := os.ReadFile(a)
	return expect(string(c), "b", "a after exchange")
}

func hardlink(dir string) error {
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	os.WriteFile(a, []byte("one"), 0o644)
	if err := os.Link(a, b); err != nil {
		return err
	}
	os.WriteFile(b, []byte("two"), 0o644)
	c, _ := os.ReadFile(a)
	if err := expect(string(c), "two", "content through the other link"); err != nil {
		return err
	}
	var sa, sb unix.Stat_t
	unix.Stat(a, &sa)
	unix.Stat(b, &sb)
	if sa.Ino != sb.Ino || sa.Nlink != 2 {
		return fmt.Errorf("links: inodes %d/%d, nlink %d", sa.Ino, sb.Ino, sa.Nlink)
	}
	os.Remove(a)
	unix.Stat(b, &sb)
	return expect(sb.Nlink, 1, "nlink after removing one link")
}

func symlink(dir string) error {
	os.WriteFile(filepath.Join(dir, "target"), []byte("t"), 0o644)
	l := filepath.Join(dir, "link")
	if err := os.Symlink("target", l); err != nil {
		return err
	}
	if t, err := os.Readlink(l); err != nil || t != "target" {
		return fmt.Errorf("readlink: %q %v", t, err)
	}
	c, err := os.ReadFile(l)
	if err != nil || string(c) != "t" {
		return fmt.Errorf("read through link: %q %v", c, err)
	}
	fi, _ := os.Lstat(l)
	if fi.Mode()&os.ModeSymlink == 0 {
		return fmt.Errorf("lstat mode %v", fi.Mode())
	}
	dangling := filepath.Join(dir, "dangling")
	os.Symlink("nowhere", dangling)
	if _, err := os.Stat(dangling); !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("stat dangling link: %v, want ENOENT", err)
	}
	long := strings.Repeat("x/", 1000)
	if err := os.Symlink(long, filepath.Join(dir, "long")); err != nil {
		return fmt.Errorf("2000-byte target: %v", err)
	}
	t, _ := os.Readlink(filepath.Join(dir, "long"))
	return expect(len(t), len(long), "long target length")
}

func chmod(dir string) error {
	p := filepath.Join(dir, "f")
	os.WriteFile(p, nil, 0o644)
	for _, m := range []os.FileMode{0o600, 0o755, 0o4755, 0o1777 | os.ModeSticky} {
		if err := os.Chmod(p, m); err != nil {
			return err
		}
	}
	if err := unix.Chmod(p, 0o2751); err != nil {
		return err
	}
	var st unix.Stat_t
	unix.Stat(p, &st)
	return expect(fmt.Sprintf("%o", st.Mode&07777), "2751", "mode")
}

func chown(dir string) error {
	p := filepath.Join(dir, "f")
	os.WriteFile(p, nil, 0o644)
	if os.Geteuid() != 0 {
		return nil
	}
	if err := os.Lchown(p, 1234, 5678); err != nil {
		return err
	}
	var st unix.Stat_t
	unix.Stat(p, &st)
	if err := expect(fmt.Sprint(st.Uid, ":", st.Gid), "1234:5678", "owner"); err != nil {
		return err
	}
	l := filepath.Join(dir, "l")
	os.Symlink("f", l)
	if err := os.Lchown(l, 42, 43); err != nil {
		return fmt.Errorf("lchown symlink: %v", err)
	}
	unix.Lstat(l, &st)
	return expect(fmt.Sprint(st.Uid, ":", st.Gid), "42:43", "symlink owner")
}

func utimes(dir string) error {
	p := filepath.Join(dir, "f")
	os.WriteFile(p, nil, 0o644)
	at := time.Date(2001, 2, 3, 4, 5, 6, 7000, time.UTC)
	mt := time.Date(2011, 12, 13, 14, 15, 16, 17000, time.UTC)
	if err := os.Chtimes(p, at, mt); err != nil {
		return err
	}
	var st unix.Stat_t
	unix.Stat(p, &st)
	if err := expect(time.Unix(st.Mtim.Unix()).UTC(), mt, "mtime"); err != nil {
		return err
	}
	if err := expect(time.Unix(st.Atim.Unix()).UTC(), at, "atime"); err != nil {
		return err
	}
	before := time.Now().Add(-2 * time.Second)
	if err := unix.UtimesNano(p, []unix.Timespec{{Nsec: unix.UTIME_NOW}, {Nsec: unix.UTIME_OMIT}}); err != nil {
		return err
	}
	unix.Stat(p, &st)
	if time.Unix(st.Atim.Unix()).Before(before) {
		return fmt.Errorf("UTIME_NOW atime %v", time.Unix(st.Atim.Unix()))
	}
	return expect(time.Unix(st.Mtim.Unix()).UTC(), mt, "mtime after UTIME_OMIT")
}

func mkdirRmdir(dir string) error {
	d := filepath.Join(dir, "d")
	if err := os.Mkdir(d, 0o750); err != nil {
		return err
	}
	if err := os.Mkdir(d, 0o750); !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("mkdir existing: %v, want EEXIST", err)
	}
	os.WriteFile(filepath.Join(d, "f"), nil, 0o644)
	if err := unix.Rmdir(d); !errors.Is(err, unix.ENOTEMPTY) {
		return fmt.Errorf("rmdir non-empty: %v, want ENOTEMPTY", err)
	}
	if err := unix.Rmdir(filepath.Join(d, "f")); !errors.Is(err, unix.ENOTDIR) {
		return fmt.Errorf("rmdir file: %v, want ENOTDIR", err)
	}
	os.Remove(filepath.Join(d, "f"))
	if err := unix.Rmdir(d); err != nil {
		return err
	}
	var st unix.Stat_t
	unix.Stat(dir, &st)
	return expect(st.Nlink, 2, "parent nlink after rmdir")
}

func fifo(dir string) error {
	p := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(p, 0o600); err != nil {
		return err
	}
	fi, err := os.Lstat(p)
	if err != nil {
		return err
	}
	if fi.Mode()&os.ModeNamedPipe == 0 {
		return fmt.Errorf("mode %v, want a named pipe", fi.Mode())
	}
	done := make(chan error, 1)
	go func() {
		f, err := os.OpenFile(p, os.O_WRONLY, 0)
		if err == nil {
			_, err = f.Write([]byte("through the pipe"))
			f.Close()
		}
		done <- err
	}()
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	b := make([]byte, 64)
	n, _ := f.Read(b)
	f.Close()
	if err := <-done; err != nil {
		return err
	}
	return expect(string(b[:n]), "through the pipe", "fifo data")
}

func sparse(dir string) error {
	p := filepath.Join(dir, "sparse")
	f, err := os.Create(p)
	if err != nil {
		return err
	}
	defer f.Close()
	off := int64(5) << 30
	if _, err := f.WriteAt([]byte("far"), off); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	b := make([]byte, 3)
	if _, err := f.ReadAt(b, off); err != nil || string(b) != "far" {
		return fmt.Errorf("read at 5 GiB: %q %v", b, err)
	}
	fi, _ := f.Stat()
	if err := expect(fi.Size(), off+3, "size"); err != nil {
		return err
	}
	var st unix.Stat_t
	unix.Stat(p, &st)
	if st.Blocks*512 > 1<<20 {
		return fmt.Errorf("%d bytes allocated for a 5 GiB sparse file", st.Blocks*512)
	}
	hole, err := unix.Seek(int(f.Fd()), 0, unix.SEEK_DATA)
	if err != nil {
		return fmt.Errorf("SEEK_DATA: %v", err)
	}
	if hole < off-(1<<20) {
		return fmt.Errorf("SEEK_DATA found data at %d, before the written block", hole)
	}
	return nil
}

func xattr(dir string) error {
	p := filepath.Join(dir, "f")
	os.WriteFile(p, nil, 0o644)
	if err := unix.Setxattr(p, "user.kiwi", []byte("box"), 0); err != nil {
		return err
	}
	b := make([]byte, 64)
	n, err := unix.Getxattr(p, "user.kiwi", b)
	if err != nil || string(b[:n]) != "box" {
		return fmt.Errorf("getxattr: %q %v", b[:n], err)
	}
	n, err = unix.Listxattr(p, b)
	if err != nil || !slices.Contains(strings.Split(string(b[:n]), "\x00"), "user.kiwi") {
		return fmt.Errorf("listxattr: %q %v", b[:n], err)
	}
	if err := unix.Setxattr(p, "user.kiwi", []byte("x"), unix.XATTR_CREATE); !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("XATTR_CREATE on existing: %v, want EEXIST", err)
	}
	if err := unix.Removexattr(p, "user.kiwi"); err != nil {
		return err
	}
	if _, err := unix.Getxattr(p, "user.kiwi", b); !errors.Is(err, unix.ENODATA) {
		return fmt.Errorf("get removed: %v, want ENODATA", err)
	}
	return nil
}

func readdir10k(dir string) error {
	const n = 10000
	for i := 0; i < n; i++ {
		f, err := os.OpenFile(filepath.Join(dir, "entry-"+strconv.Itoa(i)), os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			return err
		}
		f.Close()
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	if err := expect(len(ents), n, "entries"); err != nil {
		return err
	}
	seen := map[string]bool{}
	for _, e := range ents {
		if seen[e.Name()] {
			return fmt.Errorf("entry %s listed twice", e.Name())
		}
		seen[e.Name()] = true
	}
	return nil
}

func fsync(dir string) error {
	f, err := os.Create(filepath.Join(dir, "f"))
	if err != nil {
		return err
	}
	defer f.Close()
	f.Write([]byte("durable"))
	if err := f.Sync(); err != nil {
		return err
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func odirect(dir string) error {
	p := filepath.Join(dir, "f")
	data := bytes.Repeat([]byte("0123456789abcdef"), 4096) // 64 KiB
	if err := os.WriteFile(p, data, 0o644); err != nil {
		return err
	}
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return fmt.Errorf("open O_DIRECT: %v", err)
	}
	defer unix.Close(fd)
	// O_DIRECT wants aligned buffers: take an aligned slice of a mapping.
	buf, err := unix.Mmap(-1, 0, len(data), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return err
	}
	defer unix.Munmap(buf)
	n, err := unix.Pread(fd, buf, 0)
	if err != nil {
		return fmt.Errorf("O_DIRECT read: %v", err)
	}
	if n != len(data) || !bytes.Equal(buf[:n], data) {
		return fmt.Errorf("O_DIRECT read %d bytes, content equal %v", n, bytes.Equal(buf[:n], data))
	}
	return nil
}

// mapFile maps the first len(want) bytes of p, opened with flags, and
// compares them with want; then it runs fn on the mapping.
func mapFile(p string, flags, prot, share int, want []byte, fn func(m []byte) error) error {
	fd, err := unix.Open(p, flags, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	m, err := unix.Mmap(fd, 0, len(want), prot, share)
	if err != nil {
		return fmt.Errorf("mmap: %v", err)
	}
	defer unix.Munmap(m)
	if !bytes.Equal(m, want) {
		return errors.New("mapped content differs from the file")
	}
	if fn != nil {
		return fn(m)
	}
	return nil
}

// printMapped maps all of p, opened read-only, MAP_SHARED and PROT_READ,
// and prints its name, size and the SHA-256 of the mapped bytes.
func printMapped(p string) error {
	fd, err := unix.Open(p, unix.O_RDONLY, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Size == 0 {
		return errors.New("empty file, nothing to map")
	}
	m, err := unix.Mmap(fd, 0, int(st.Size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("mmap: %v", err)
	}
	defer unix.Munmap(m)
	fmt.Printf("%s %d %x\n", p, len(m), sha256.Sum256(m))
	return nil
}

// mmapPrivate: a private read mapping, as the dynamic loader makes of
// every library.
func mmapPrivate(dir string) error { return mapRead(dir, unix.MAP_PRIVATE) }

// mmapSharedRead: a shared read-only mapping of a file opened read-only.
func mmapSharedRead(dir string) error { return mapRead(dir, unix.MAP_SHARED) }

// mapRead writes a file and maps it read-only with share.
func mapRead(dir string, share int) error {
	p := filepath.Join(dir, "f")
	data := bytes.Repeat([]byte("mapped.."), 1024)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		return err
	}
	return mapFile(p, unix.O_RDONLY, unix.PROT_READ, share, data, nil)
}

// mmapSharedWrite: a shared writable mapping of a file opened read-write,
// as databases make: what is stored through it is in the file.
func mmapSharedWrite(dir string) error {
	p := filepath.Join(dir, "f")
	data := bytes.Repeat([]byte("shared.."), 1024)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		return err
	}
	err := mapFile(p, unix.O_RDWR, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED, data, func(m []byte) error {
		copy(m, "STORED")
		return unix.Msync(m, unix.MS_SYNC)
	})
	if err != nil {
		return err
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return err
	}
	return expect(string(b[:8]), "STORED..", "file after storing through the mapping")
}

func unlinkOpen(dir string) error {
	p := filepath.Join(dir, "f")
	f, err := os.Create(p)
	if err != nil {
		return err
	}
	defer f.Close()
	f.Write([]byte("still here"))
	if err := os.Remove(p); err != nil {
		return err
	}
	b := make([]byte, 32)
	n, err := f.ReadAt(b, 0)
	if n == 0 {
		return fmt.Errorf("read after unlink: %v", err)
	}
	return expect(string(b[:n]), "still here", "content after unlink")
}

func statfs(dir string) error {
	var s unix.Statfs_t
	if err := unix.Statfs(dir, &s); err != nil {
		return err
	}
	if s.Blocks == 0 || s.Bsize == 0 {
		return fmt.Errorf("statfs blocks %d bsize %d", s.Blocks, s.Bsize)
	}
	return nil
}

// modeZero: a file and a directory of mode 0000 show 0000, and root may
// still read the file and list and traverse the directory (root bypasses
// permission bits, except that executing needs an x bit somewhere).
func modeZero(dir string) error {
	f, d := filepath.Join(dir, "f0"), filepath.Join(dir, "d0")
	w, err := os.OpenFile(f, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = w.Write([]byte("zero"))
	w.Close()
	if err != nil {
		return fmt.Errorf("write through the creating open: %v", err)
	}
	if err := unix.Mkdir(d, 0); err != nil {
		return err
	}
	// Before unprivileged readers can stop the suite's own cleanup.
	defer os.Chmod(d, 0o700)
	g := filepath.Join(dir, "g")
	os.WriteFile(g, nil, 0o644)
	if err := os.Chmod(g, 0); err != nil {
		return err
	}
	for _, p := range []string{f, d, g} {
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		if err := expect(fmt.Sprintf("%o", st.Mode&07777), "0", filepath.Base(p)+" mode"); err != nil {
			return err
		}
	}
	if os.Geteuid() != 0 {
		return nil
	}
	if b, err := os.ReadFile(f); err != nil || string(b) != "zero" {
		return fmt.Errorf("root reading a mode-0000 file: %q %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(d, "x"), []byte("in"), 0o644); err != nil {
		return fmt.Errorf("root creating in a mode-0000 directory: %v", err)
	}
	ents, err := os.ReadDir(d)
	if err != nil || len(ents) != 1 {
		return fmt.Errorf("root listing a mode-0000 directory: %v %v", ents, err)
	}
	if err := unix.Access(f, unix.X_OK); !errors.Is(err, unix.EACCES) {
		return fmt.Errorf("root may execute a mode-0000 file: %v, want EACCES", err)
	}
	if err := unix.Access(d, unix.X_OK); err != nil {
		return fmt.Errorf("root may not search a mode-0000 directory: %v", err)
	}
	return nil
}

// unprivileged is the caller accessUnprivileged probes as: nobody.
const unprivileged = 65534

// accessUnprivileged: an unprivileged caller gets EACCES for what the
// permission bits deny it (mode-0000 and root-owned 0600 files, a
// mode-0000 directory's listing and entries) and gets the rest, so that
// access through a share is never wider (or narrower) than natively.
func accessUnprivileged(dir string) error {
	if os.Geteuid() != 0 {
		return nil // cannot become another user
	}
	for name, mode := range map[string]os.FileMode{"pub": 0o644, "f0": 0, "f600": 0o600} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("data"), 0o600); err != nil {
			return err
		}
		if err := os.Chmod(p, mode); err != nil {
			return err
		}
	}
	for name, mode := range map[string]os.FileMode{"dpub": 0o755, "d0": 0} {
		p := filepath.Join(dir, name)
		if err := os.Mkdir(p, 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(p, "x"), []byte("data"), 0o644); err != nil {
			return err
		}
		if err := os.Chmod(p, mode); err != nil {
			return err
		}
	}
	defer os.Chmod(filepath.Join(dir, "d0"), 0o755)
	want := []struct{ probe, result string }{
		// What the caller may do, lest EACCES come from elsewhere.
		{"read:pub", "ok"}, {"list:dpub", "ok"}, {"read:dpub/x", "ok"}, {"stat:d0", "ok"}, {"stat:f0", "ok"},
		{"read:f0", "EACCES"}, {"write:f0", "EACCES"}, {"read:f600", "EACCES"}, {"write:pub", "EACCES"},
		{"list:d0", "EACCES"}, {"stat:d0/x", "EACCES"}, {"read:d0/x", "EACCES"}, {"create:d0/new", "EACCES"},
		{"create:new", "EACCES"},
	}
	var probes []string
	for _, w := range want {
		probes = append(probes, w.probe)
	}
	got, err := probeAs(dir, unprivileged, probes)
	if err != nil {
		return err
	}
	var bad []string
	for i, w := range want {
		if got[i] != w.result {
			bad = append(bad, fmt.Sprintf("%s: %s, want %s", w.probe, got[i], w.result))
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("as uid %d: %s", unprivileged, strings.Join(bad, "; "))
	}
	return nil
}

// probeAs runs the probes (see runProbes) relative to dir as uid and gid
// id, in a new process, and returns one result per probe.
func probeAs(dir string, id uint32, probes []string) ([]string, error) {
	d, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	// /proc/self/exe names this program to the child as well, even when
	// the directory it lies in is closed to the user it becomes.
	cmd := exec.Command("/proc/self/exe", append([]string{"-probe"}, probes...)...)
	cmd.ExtraFiles = []*os.File{d}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: id, Gid: id, Groups: []uint32{}}}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("probes as uid %d: %v %s", id, err, stderr.String())
	}
	got := strings.Fields(string(out))
	if len(got) != len(probes) {
		return nil, fmt.Errorf("probes as uid %d: %d results for %d probes: %q", id, len(got), len(probes), out)
	}
	return got, nil
}

// runProbes runs each probe OP:NAME, NAME relative to descriptor 3, and
// prints "ok" or the error's name (EACCES, ...). OP is read (open and
// read a byte), write (open for writing), create (O_CREAT|O_EXCL), list
// (open a directory and read its entries) or stat.
func runProbes(probes []string) {
	const dir = 3
	for _, p := range probes {
		op, name, _ := strings.Cut(p, ":")
		var err error
		switch op {
		case "read", "write", "create", "list":
			flags := map[string]int{"read": unix.O_RDONLY, "write": unix.O_WRONLY, "create": unix.O_WRONLY | unix.O_CREAT | unix.O_EXCL, "list": unix.O_RDONLY | unix.O_DIRECTORY}[op]
			var fd int
			if fd, err = unix.Openat(dir, name, flags|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0o644); err == nil {
				buf := make([]byte, 4096)
				switch op {
				case "read":
					_, err = unix.Read(fd, buf)
				case "list":
					_, err = unix.Getdents(fd, buf)
				}
				unix.Close(fd)
			}
		case "stat":
			var st unix.Stat_t
			err = unix.Fstatat(dir, name, &st, unix.AT_SYMLINK_NOFOLLOW)
		default:
			err = fmt.Errorf("unknown probe %q", p)
		}
		fmt.Println(errName(err))
	}
}

// errName is "ok" for nil and the errno's name (EACCES) otherwise.
func errName(err error) string {
	var e unix.Errno
	switch {
	case err == nil:
		return "ok"
	case errors.As(err, &e) && unix.ErrnoName(e) != "":
		return unix.ErrnoName(e)
	}
	return strings.ReplaceAll(err.Error(), " ", "_")
}

// nameMax: a name of NAME_MAX (255) bytes works in every call that takes
// a name; a name of 256 bytes is ENAMETOOLONG in each.
func nameMax(dir string) error {
	os.WriteFile(filepath.Join(dir, "f"), []byte("f"), 0o644)
	os.Mkdir(filepath.Join(dir, "d"), 0o755)
	var bad []string
	for _, n := range []int{255, 256} {
		want := "ok"
		if n > 255 {
			want = "ENAMETOOLONG"
		}
		// A name per call, of n bytes, in dir.
		name := func(c byte) string { return filepath.Join(dir, strings.Repeat(string(c), n)) }
		var st unix.Stat_t
		for _, c := range []struct {
			op string
			fn func() error
		}{
			{"creat", func() error {
				fd, err := unix.Creat(name('c'), 0o644)
				if err == nil {
					unix.Close(fd)
				}
				return err
			}},
			{"stat", func() error { return unix.Lstat(name('c'), &st) }},
			{"open", func() error {
				fd, err := unix.Open(name('c'), unix.O_RDONLY, 0)
				if err == nil {
					unix.Close(fd)
				}
				return err
			}},
			{"mkdir", func() error { return unix.Mkdir(name('m'), 0o755) }},
			{"mknod-fifo", func() error { return unix.Mknod(name('p'), unix.S_IFIFO|0o644, 0) }},
			{"symlink", func() error { return unix.Symlink("f", name('s')) }},
			{"link", func() error { return unix.Link(filepath.Join(dir, "f"), name('l')) }},
			{"rename-to", func() error { return unix.Rename(name('l'), name('r')) }},
			{"rename-from-old", func() error {
				if n > 255 {
					return unix.Rename(name('x'), filepath.Join(dir, "moved"))
				}
				return unix.Rename(name('r'), filepath.Join(dir, "moved"))
			}},
			{"rename-to-new", func() error { return unix.Rename(filepath.Join(dir, "f"), name('n')) }},
			{"rename-back", func() error { return unix.Rename(name('n'), filepath.Join(dir, "f")) }},
			{"unlink", func() error { return unix.Unlink(name('c')) }},
			{"rmdir", func() error { return unix.Rmdir(name('m')) }},
		} {
			err := c.fn()
			if n > 255 && c.op == "rename-back" {
				// f stayed f: nothing to move back.
				continue
			}
			if got := errName(err); got != want {
				bad = append(bad, fmt.Sprintf("%s of a %d-byte name: %s, want %s", c.op, n, got, want))
			}
		}
	}
	if len(bad) > 0 {
		return errors.New(strings.Join(bad, "; "))
	}
	return nil
}

// mknodDevices: as root, character and block devices, FIFOs and sockets
// can be made and show their type, mode and device number; rename, link,
// chmod, chown and unlink work on them; opening the character device
// reaches the caller's own /dev/null (1:3), unless the file system is
// mounted nodev, where it is EACCES. (A kiwi-sharefs share does this in
// mapped mode, keeping plain files on the host.)
func mknodDevices(dir string) error {
	if os.Geteuid() != 0 {
		return nil // no CAP_MKNOD
	}
	nodes := []struct {
		name string
		mode uint32
		dev  int
	}{
		{"chr", unix.S_IFCHR | 0o644, int(unix.Mkdev(1, 3))},
		{"blk", unix.S_IFBLK | 0o640, int(unix.Mkdev(7, 300))},
		{"fifo", unix.S_IFIFO | 0o600, 0},
		{"sock", unix.S_IFSOCK | 0o755, 0},
	}
	// stat checks name's mode, device, owner and link count.
	stat := func(name string, mode uint32, dev int, owner string, nlink int) error {
		var st unix.Stat_t
		if err := unix.Lstat(filepath.Join(dir, name), &st); err != nil {
			return err
		}
		got := fmt.Sprintf("mode %o dev %d:%d owner %d:%d nlink %d", st.Mode, unix.Major(st.Rdev), unix.Minor(st.Rdev), st.Uid, st.Gid, st.Nlink)
		return expect(got, fmt.Sprintf("mode %o dev %d:%d owner %s nlink %d", mode, unix.Major(uint64(dev)), unix.Minor(uint64(dev)), owner, nlink), name)
	}
	for _, n := range nodes {
		if err := unix.Mknod(filepath.Join(dir, n.name), n.mode, n.dev); err != nil {
			return fmt.Errorf("mknod %s: %v", n.name, err)
		}
		if err := stat(n.name, n.mode, n.dev, "0:0", 1); err != nil {
			return err
		}
		a, b, c := filepath.Join(dir, n.name), filepath.Join(dir, n.name+"-renamed"), filepath.Join(dir, n.name+"-link")
		if err := os.Rename(a, b); err != nil {
			return err
		}
		if err := os.Link(b, c); err != nil {
			return err
		}
		// chown first: it drops set-user-ID bits.
		if err := os.Lchown(b, 1234, 5678); err != nil {
			return err
		}
		if err := unix.Chmod(c, 0o4710); err != nil {
			return err
		}
		mode := n.mode&unix.S_IFMT | 0o4710
		if err := stat(n.name+"-link", mode, n.dev, "1234:5678", 2); err != nil {
			return err
		}
		if err := os.Remove(b); err != nil {
			return err
		}
		if err := stat(n.name+"-link", mode, n.dev, "1234:5678", 1); err != nil {
			return err
		}
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); err != nil {
		return err
	}
	os.Chmod(filepath.Join(dir, "chr-link"), 0o666)
	f, err := os.OpenFile(filepath.Join(dir, "chr-link"), os.O_WRONLY, 0)
	if sfs.Flags&unix.ST_NODEV != 0 {
		if err == nil {
			f.Close()
			return errors.New("opened a device node on a nodev file system")
		}
		if !errors.Is(err, unix.EACCES) {
			return fmt.Errorf("open a device node on a nodev file system: %v, want EACCES", err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("open the character device: %v", err)
	}
	defer f.Close()
	if _, err := f.Write([]byte("into the null device")); err != nil {
		return fmt.Errorf("write to the character device: %v", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return err
	}
	return expect(st.Size, 0, "size after writing to the null device")
}
