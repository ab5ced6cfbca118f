package sharefs

import (
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// jail is an export next to a canary directory that no request may reach.
type jail struct {
	export, canary string
	raw            fuse.RawFileSystem
	root           fs.InodeEmbedder
}

func newJail(t *testing.T, o Options) *jail {
	t.Helper()
	base := t.TempDir()
	j := &jail{export: filepath.Join(base, "export"), canary: filepath.Join(base, "canary")}
	for _, d := range []string{j.export, j.canary} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(j.canary, "secret"), []byte("canary"), 0o644)
	os.WriteFile(filepath.Join(j.export, "file"), []byte("inside"), 0o644)
	os.Mkdir(filepath.Join(j.export, "dir"), 0o755)
	os.Symlink("../canary", filepath.Join(j.export, "rel"))
	os.Symlink(j.canary, filepath.Join(j.export, "abs"))
	var err error
	if j.root, err = Root(j.export, o); err != nil {
		t.Fatal(err)
	}
	opts, _ := FSOptions(o)
	j.raw = fs.NewNodeFS(j.root, opts)
	return j
}

func hdr(node uint64) *fuse.InHeader {
	return &fuse.InHeader{NodeId: node, Caller: fuse.Caller{Owner: fuse.Owner{Uid: 0, Gid: 0}}}
}

func (j *jail) lookup(t *testing.T, parent uint64, name string) (uint64, fuse.Status) {
	t.Helper()
	var out fuse.EntryOut
	st := j.raw.Lookup(nil, hdr(parent), name, &out)
	return out.NodeId, st
}

// TestNamesConfined: names that are not one directory entry never reach
// the host, whatever the operation.
func TestNamesConfined(t *testing.T) {
	j := newJail(t, Options{})
	bad := []string{"..", "../canary", "../canary/secret", "dir/../../canary", "/etc", "a/b", "x\x00y", strings.Repeat("n", 256)}
	for _, name := range bad {
		if _, st := j.lookup(t, 1, name); st == fuse.OK {
			t.Errorf("lookup %q succeeded", name)
		}
		var eo fuse.EntryOut
		if st := j.raw.Mkdir(nil, &fuse.MkdirIn{InHeader: *hdr(1), Mode: 0o755}, name, &eo); st == fuse.OK {
			t.Errorf("mkdir %q succeeded", name)
		}
		var co fuse.CreateOut
		if st := j.raw.Create(nil, &fuse.CreateIn{InHeader: *hdr(1), Flags: uint32(os.O_WRONLY), Mode: 0o644}, name, &co); st == fuse.OK {
			t.Errorf("create %q succeeded", name)
		}
		if st := j.raw.Symlink(nil, hdr(1), "x", name, &eo); st == fuse.OK {
			t.Errorf("symlink %q succeeded", name)
		}
		if st := j.raw.Rename(nil, &fuse.RenameIn{InHeader: *hdr(1), Newdir: 1}, "file", name); st == fuse.OK {
			t.Errorf("rename to %q succeeded", name)
		}
		if st := j.raw.Unlink(nil, hdr(1), name); st == fuse.OK {
			t.Errorf("unlink %q succeeded", name)
		}
	}
	if _, err := os.Stat(filepath.Join(j.canary, "secret")); err != nil {
		t.Fatalf("canary damaged: %v", err)
	}
	ents, _ := os.ReadDir(filepath.Dir(j.export))
	if len(ents) != 2 {
		t.Fatalf("something was created next to the export: %v", ents)
	}
}

// TestSymlinksNotFollowed: symlinks are returned, never followed: a
// lookup below one fails, opening one fails.
func TestSymlinksNotFollowed(t *testing.T) {
	j := newJail(t, Options{})
	for _, l := range []string{"rel", "abs"} {
		id, st := j.lookup(t, 1, l)
		if st != fuse.OK {
			t.Fatalf("lookup %s: %v", l, st)
		}
		if _, st := j.lookup(t, id, "secret"); st == fuse.OK {
			t.Errorf("lookup %s/secret went through the symlink", l)
		}
		var oo fuse.OpenOut
		if st := j.raw.Open(nil, &fuse.OpenIn{InHeader: *hdr(id), Flags: uint32(os.O_RDONLY)}, &oo); st == fuse.OK {
			t.Errorf("open %s succeeded", l)
		}
		var eo fuse.EntryOut
		if st := j.raw.Mkdir(nil, &fuse.MkdirIn{InHeader: *hdr(id), Mode: 0o755}, "x", &eo); st == fuse.OK {
			t.Errorf("mkdir below symlink %s succeeded", l)
		}
		target, st := j.raw.Readlink(nil, hdr(id))
		if st != fuse.OK || !strings.Contains(string(target), "canary") {
			t.Errorf("readlink %s: %q %v", l, target, st)
		}
	}
	if _, err := os.Stat(filepath.Join(j.canary, "x")); err == nil {
		t.Fatal("created inside the canary directory")
	}
}

// TestReadOnly: every change is EROFS.
func TestReadOnly(t *testing.T) {
	j := newJail(t, Options{ReadOnly: true, Xattr: true})
	id, st := j.lookup(t, 1, "file")
	if st != fuse.OK {
		t.Fatal(st)
	}
	erofs := fuse.Status(syscall.EROFS)
	var eo fuse.EntryOut
	var co fuse.CreateOut
	var oo fuse.OpenOut
	var ao fuse.AttrOut
	checks := map[string]fuse.Status{
		"mkdir":    j.raw.Mkdir(nil, &fuse.MkdirIn{InHeader: *hdr(1), Mode: 0o755}, "new", &eo),
		"create":   j.raw.Create(nil, &fuse.CreateIn{InHeader: *hdr(1), Flags: uint32(os.O_WRONLY), Mode: 0o644}, "new", &co),
		"open rw":  j.raw.Open(nil, &fuse.OpenIn{InHeader: *hdr(id), Flags: uint32(os.O_RDWR)}, &oo),
		"truncate": j.raw.Open(nil, &fuse.OpenIn{InHeader: *hdr(id), Flags: uint32(os.O_RDONLY | os.O_TRUNC)}, &oo),
		"unlink":   j.raw.Unlink(nil, hdr(1), "file"),
		"rmdir":    j.raw.Rmdir(nil, hdr(1), "dir"),
		"rename":   j.raw.Rename(nil, &fuse.RenameIn{InHeader: *hdr(1), Newdir: 1}, "file", "moved"),
		"symlink":  j.raw.Symlink(nil, hdr(1), "x", "new", &eo),
		"chmod":    j.raw.SetAttr(nil, &fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{InHeader: *hdr(id), Valid: fuse.FATTR_MODE, Mode: 0o600}}, &ao),
		"setxattr": j.raw.SetXAttr(nil, &fuse.SetXAttrIn{InHeader: *hdr(id)}, "user.x", []byte("y")),
		"link":     j.raw.Link(nil, &fuse.LinkIn{InHeader: *hdr(1), Oldnodeid: id}, "hard", &eo),
	}
	for name, st := range checks {
		if st != erofs {
			t.Errorf("%s: %v, want EROFS", name, st)
		}
	}
	if st := j.raw.Open(nil, &fuse.OpenIn{InHeader: *hdr(id), Flags: uint32(os.O_RDONLY)}, &oo); st != fuse.OK {
		t.Errorf("read-only open: %v", st)
	}
}

// TestNoDevices: device nodes are neither created nor opened.
func TestNoDevices(t *testing.T) {
	j := newJail(t, Options{})
	var eo fuse.EntryOut
	for _, mode := range []uint32{unix.S_IFBLK | 0o666, unix.S_IFCHR | 0o666} {
		if st := j.raw.Mknod(nil, &fuse.MknodIn{InHeader: *hdr(1), Mode: mode, Rdev: uint32(unix.Mkdev(7, 0))}, "dev", &eo); st != fuse.EPERM {
			t.Errorf("mknod %o: %v, want EPERM", mode, st)
		}
	}
	if os.Geteuid() != 0 {
		t.Log("not root: existing device nodes not checked")
		return
	}
	if err := unix.Mknod(filepath.Join(j.export, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))); err != nil {
		t.Fatal(err)
	}
	id, st := j.lookup(t, 1, "null")
	if st != fuse.OK {
		t.Fatal(st)
	}
	var oo fuse.OpenOut
	if st := j.raw.Open(nil, &fuse.OpenIn{InHeader: *hdr(id), Flags: uint32(os.O_RDWR)}, &oo); st == fuse.OK {
		t.Fatal("opened a device node")
	}
}

// TestRenamedBehindBack: a non-directory renamed on the host is ESTALE,
// never a different inode.
func TestRenamedBehindBack(t *testing.T) {
	j := newJail(t, Options{})
	id, st := j.lookup(t, 1, "file")
	if st != fuse.OK {
		t.Fatal(st)
	}
	os.Rename(filepath.Join(j.export, "file"), filepath.Join(j.export, "elsewhere"))
	os.WriteFile(filepath.Join(j.export, "file"), []byte("impostor"), 0o644)
	var ao fuse.AttrOut
	if st := j.raw.GetAttr(nil, &fuse.GetAttrIn{InHeader: *hdr(id)}, &ao); st != fuse.Status(syscall.ESTALE) {
		t.Fatalf("getattr after replacement: %v, want ESTALE", st)
	}
}

func TestOwnership(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create files for other users")
	}
	for _, tc := range []struct {
		name     string
		o        Options
		wantUID  uint32
		wantSeen uint32
	}{
		{"identity", Options{}, 1000, 1000},
		{"mapped", Options{UIDMap: []IDMap{{Client: 0, Host: 100000, Size: 65536}}, GIDMap: []IDMap{{Client: 0, Host: 100000, Size: 65536}}}, 101000, 1000},
		{"squash", Options{Squash: true}, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			j := newJail(t, tc.o)
			var co fuse.CreateOut
			in := &fuse.CreateIn{InHeader: *hdr(1), Flags: uint32(os.O_WRONLY), Mode: 0o644}
			in.Uid, in.Gid = 1000, 1000
			if st := j.raw.Create(nil, in, "owned", &co); st != fuse.OK {
				t.Fatal(st)
			}
			j.raw.Release(nil, &fuse.ReleaseIn{InHeader: *hdr(co.NodeId), Fh: co.Fh})
			var st unix.Stat_t
			unix.Stat(filepath.Join(j.export, "owned"), &st)
			if st.Uid != tc.wantUID || co.Attr.Uid != tc.wantSeen {
				t.Fatalf("host uid %d (want %d), client sees %d (want %d)", st.Uid, tc.wantUID, co.Attr.Uid, tc.wantSeen)
			}
		})
	}
}

func TestOpenFlags(t *testing.T) {
	const direct, keep, noflush = fuse.FOPEN_DIRECT_IO, fuse.FOPEN_KEEP_CACHE, fuse.FOPEN_NOFLUSH
	for _, c := range []struct {
		cache       string
		passthrough bool
		flags       int
		want        uint32
	}{
		{CacheAuto, false, unix.O_RDONLY, noflush},
		{CacheAuto, false, unix.O_RDWR, noflush},
		{CacheAuto, false, unix.O_WRONLY, noflush | direct},
		{CacheAlways, false, unix.O_RDONLY, noflush | keep},
		{CacheAlways, false, unix.O_WRONLY | unix.O_TRUNC, noflush | direct},
		{CacheMetadata, false, unix.O_RDONLY, noflush | direct},
		{CacheMetadata, false, unix.O_WRONLY, noflush | direct},
		{CacheMetadata, false, unix.O_RDWR, noflush},
		{CacheNever, false, unix.O_RDWR, noflush | direct},
		{CacheAuto, true, unix.O_WRONLY, noflush},
		{CacheMetadata, true, unix.O_RDONLY, noflush},
		{CacheAlways, true, unix.O_RDONLY, noflush | keep},
		{CacheNever, true, unix.O_RDONLY, noflush | direct},
	} {
		ex := &export{opts: Options{Cache: c.cache, Passthrough: c.passthrough}}
		if got := ex.fopenFlags(c.flags, -1); got != c.want {
			t.Errorf("cache %s, passthrough %v, open flags %#o: FOPEN flags %#x, want %#x", c.cache, c.passthrough, c.flags, got, c.want)
		}
	}
}

// TestOpenELFCached: with CacheMetadata, an ELF file (a program or shared
// library) opened read-only stays in the client's page cache, so that a
// client can map it MAP_SHARED: ldconfig does, from a read-only
// descriptor, and a direct-I/O file cannot be mapped so by a Linux client
// before 6.6 (ENODEV), which left a KIWI image built on a share with an
// empty /etc/ld.so.cache. Other files opened read-only stay direct I/O.
func TestOpenELFCached(t *testing.T) {
	j := newJail(t, Options{Cache: CacheMetadata})
	os.WriteFile(filepath.Join(j.export, "lib.so"), append([]byte("\x7fELF\x02\x01\x01"), make([]byte, 4096)...), 0o644)
	os.WriteFile(filepath.Join(j.export, "short"), []byte("\x7fEL"), 0o644)
	for _, c := range []struct {
		name  string
		flags int
		want  uint32
	}{
		{"lib.so", os.O_RDONLY, fuse.FOPEN_NOFLUSH},
		{"lib.so", os.O_WRONLY, fuse.FOPEN_NOFLUSH | fuse.FOPEN_DIRECT_IO},
		{"lib.so", os.O_RDWR, fuse.FOPEN_NOFLUSH},
		{"file", os.O_RDONLY, fuse.FOPEN_NOFLUSH | fuse.FOPEN_DIRECT_IO},
		{"short", os.O_RDONLY, fuse.FOPEN_NOFLUSH | fuse.FOPEN_DIRECT_IO},
	} {
		id, st := j.lookup(t, 1, c.name)
		if st != fuse.OK {
			t.Fatal(st)
		}
		var oo fuse.OpenOut
		if st := j.raw.Open(nil, &fuse.OpenIn{InHeader: *hdr(id), Flags: uint32(c.flags)}, &oo); st != fuse.OK {
			t.Fatalf("open %s: %v", c.name, st)
		}
		j.raw.Release(nil, &fuse.ReleaseIn{InHeader: *hdr(id), Fh: oo.Fh})
		if oo.OpenFlags != c.want {
			t.Errorf("open %s with flags %#o: FOPEN flags %#x, want %#x", c.name, c.flags, oo.OpenFlags, c.want)
		}
	}
}

// TestNullModes: an inode whose permission bits are 0000 is reported as
// 0000 by every reply that carries attributes (lookup, getattr, create,
// mkdir, mknod, setattr), never as a default: the client's kernel checks
// access against the reported mode, and the daemon (root) would then open
// what the caller may not (issue 24).
func TestNullModes(t *testing.T) {
	j := newJail(t, Options{})
	os.WriteFile(filepath.Join(j.export, "zero"), []byte("secret"), 0o600)
	os.Chmod(filepath.Join(j.export, "zero"), 0)
	os.Mkdir(filepath.Join(j.export, "zerodir"), 0)
	os.Chmod(filepath.Join(j.export, "zerodir"), 0)
	unix.Mkfifo(filepath.Join(j.export, "zerofifo"), 0)
	// mode of a reply; each case makes or finds an inode of type typ.
	for _, c := range []struct {
		name string
		typ  uint32
		do   func(t *testing.T) (fuse.Attr, fuse.Status)
	}{
		{"lookup file", unix.S_IFREG, func(t *testing.T) (fuse.Attr, fuse.Status) {
			var eo fuse.EntryOut
			st := j.raw.Lookup(nil, hdr(1), "zero", &eo)
			return eo.Attr, st
		}},
		{"lookup dir", unix.S_IFDIR, func(t *testing.T) (fuse.Attr, fuse.Status) {
			var eo fuse.EntryOut
			st := j.raw.Lookup(nil, hdr(1), "zerodir", &eo)
			return eo.Attr, st
		}},
		{"lookup fifo", unix.S_IFIFO, func(t *testing.T) (fuse.Attr, fuse.Status) {
			var eo fuse.EntryOut
			st := j.raw.Lookup(nil, hdr(1), "zerofifo", &eo)
			return eo.Attr, st
		}},
		{"getattr file", unix.S_IFREG, func(t *testing.T) (fuse.Attr, fuse.Status) {
			id, _ := j.lookup(t, 1, "zero")
			var ao fuse.AttrOut
			st := j.raw.GetAttr(nil, &fuse.GetAttrIn{InHeader: *hdr(id)}, &ao)
			return ao.Attr, st
		}},
		{"getattr dir", unix.S_IFDIR, func(t *testing.T) (fuse.Attr, fuse.Status) {
			id, _ := j.lookup(t, 1, "zerodir")
			var ao fuse.AttrOut
			st := j.raw.GetAttr(nil, &fuse.GetAttrIn{InHeader: *hdr(id)}, &ao)
			return ao.Attr, st
		}},
		{"create", unix.S_IFREG, func(t *testing.T) (fuse.Attr, fuse.Status) {
			var co fuse.CreateOut
			st := j.raw.Create(nil, &fuse.CreateIn{InHeader: *hdr(1), Flags: uint32(os.O_WRONLY), Mode: 0}, "created", &co)
			if st == fuse.OK {
				j.raw.Release(nil, &fuse.ReleaseIn{InHeader: *hdr(co.NodeId), Fh: co.Fh})
			}
			return co.Attr, st
		}},
		{"mkdir", unix.S_IFDIR, func(t *testing.T) (fuse.Attr, fuse.Status) {
			var eo fuse.EntryOut
			st := j.raw.Mkdir(nil, &fuse.MkdirIn{InHeader: *hdr(1), Mode: 0}, "made", &eo)
			return eo.Attr, st
		}},
		{"mknod fifo", unix.S_IFIFO, func(t *testing.T) (fuse.Attr, fuse.Status) {
			var eo fuse.EntryOut
			st := j.raw.Mknod(nil, &fuse.MknodIn{InHeader: *hdr(1), Mode: unix.S_IFIFO}, "fifo", &eo)
			return eo.Attr, st
		}},
		{"chmod file", unix.S_IFREG, func(t *testing.T) (fuse.Attr, fuse.Status) {
			id, _ := j.lookup(t, 1, "file")
			var ao fuse.AttrOut
			st := j.raw.SetAttr(nil, &fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{InHeader: *hdr(id), Valid: fuse.FATTR_MODE, Mode: 0}}, &ao)
			return ao.Attr, st
		}},
		{"chmod dir", unix.S_IFDIR, func(t *testing.T) (fuse.Attr, fuse.Status) {
			id, _ := j.lookup(t, 1, "dir")
			var ao fuse.AttrOut
			st := j.raw.SetAttr(nil, &fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{InHeader: *hdr(id), Valid: fuse.FATTR_MODE, Mode: 0}}, &ao)
			return ao.Attr, st
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			a, st := c.do(t)
			if st != fuse.OK {
				t.Fatal(st)
			}
			if a.Mode != c.typ {
				t.Errorf("reported mode %#o, want %#o (type only, permissions 0000)", a.Mode, c.typ)
			}
		})
	}
}

// TestNameLength: a name of 255 bytes (NAME_MAX) works in every call that
// takes one; a longer one is ENAMETOOLONG, as on the host, not EINVAL.
func TestNameLength(t *testing.T) {
	enametoolong := fuse.Status(syscall.ENAMETOOLONG)
	j := newJail(t, Options{})
	fileID, st := j.lookup(t, 1, "file")
	if st != fuse.OK {
		t.Fatal(st)
	}
	hostFile := func(name string) { os.WriteFile(filepath.Join(j.export, name), nil, 0o644) }
	hostDir := func(name string) { os.Mkdir(filepath.Join(j.export, name), 0o755) }
	var eo fuse.EntryOut
	for i, c := range []struct {
		op    string
		setup func(name string) // makes what the call needs, on the host
		call  func(name string) fuse.Status
	}{
		{"lookup", hostFile, func(name string) fuse.Status { return j.raw.Lookup(nil, hdr(1), name, &eo) }},
		{"create", nil, func(name string) fuse.Status {
			var co fuse.CreateOut
			st := j.raw.Create(nil, &fuse.CreateIn{InHeader: *hdr(1), Flags: uint32(os.O_WRONLY), Mode: 0o644}, name, &co)
			if st == fuse.OK {
				j.raw.Release(nil, &fuse.ReleaseIn{InHeader: *hdr(co.NodeId), Fh: co.Fh})
			}
			return st
		}},
		{"mkdir", nil, func(name string) fuse.Status {
			return j.raw.Mkdir(nil, &fuse.MkdirIn{InHeader: *hdr(1), Mode: 0o755}, name, &eo)
		}},
		{"mknod", nil, func(name string) fuse.Status {
			return j.raw.Mknod(nil, &fuse.MknodIn{InHeader: *hdr(1), Mode: unix.S_IFIFO | 0o644}, name, &eo)
		}},
		{"symlink", nil, func(name string) fuse.Status { return j.raw.Symlink(nil, hdr(1), "file", name, &eo) }},
		{"link", nil, func(name string) fuse.Status {
			return j.raw.Link(nil, &fuse.LinkIn{InHeader: *hdr(1), Oldnodeid: fileID}, name, &eo)
		}},
		{"rename from", hostFile, func(name string) fuse.Status {
			return j.raw.Rename(nil, &fuse.RenameIn{InHeader: *hdr(1), Newdir: 1}, name, "renamed-"+strconv.Itoa(len(name)))
		}},
		{"rename to", nil, func(name string) fuse.Status {
			src := "src-" + strconv.Itoa(len(name))
			hostFile(src)
			return j.raw.Rename(nil, &fuse.RenameIn{InHeader: *hdr(1), Newdir: 1}, src, name)
		}},
		{"unlink", hostFile, func(name string) fuse.Status { return j.raw.Unlink(nil, hdr(1), name) }},
		{"rmdir", hostDir, func(name string) fuse.Status { return j.raw.Rmdir(nil, hdr(1), name) }},
	} {
		for _, l := range []struct {
			n    int
			want fuse.Status
		}{{255, fuse.OK}, {256, enametoolong}} {
			t.Run(c.op+"/"+strconv.Itoa(l.n), func(t *testing.T) {
				name := strings.Repeat(string(rune('a'+i)), l.n)
				if c.setup != nil && l.n <= 255 {
					c.setup(name)
				}
				if st := c.call(name); st != l.want {
					t.Errorf("%s of a %d-byte name: %v, want %v", c.op, l.n, st, l.want)
				}
			})
		}
	}
}

// TestIoctlRefused: no ioctl reaches the host, on a file or on a
// directory (go-fuse's directory stream passes any command to the host's
// descriptor: FIFREEZE there would freeze the host's file system).
func TestIoctlRefused(t *testing.T) {
	j := newJail(t, Options{})
	dirID, st := j.lookup(t, 1, "dir")
	if st != fuse.OK {
		t.Fatal(st)
	}
	fileID, st := j.lookup(t, 1, "file")
	if st != fuse.OK {
		t.Fatal(st)
	}
	var oo fuse.OpenOut
	if st := j.raw.OpenDir(nil, &fuse.OpenIn{InHeader: *hdr(dirID)}, &oo); st != fuse.OK {
		t.Fatal(st)
	}
	dirFh := oo.Fh
	defer j.raw.ReleaseDir(&fuse.ReleaseIn{InHeader: *hdr(dirID), Fh: dirFh})
	if st := j.raw.Open(nil, &fuse.OpenIn{InHeader: *hdr(fileID), Flags: uint32(os.O_RDONLY)}, &oo); st != fuse.OK {
		t.Fatal(st)
	}
	defer j.raw.Release(nil, &fuse.ReleaseIn{InHeader: *hdr(fileID), Fh: oo.Fh})
	for _, c := range []struct {
		name     string
		node, fh uint64
	}{{"dir", dirID, dirFh}, {"file", fileID, oo.Fh}, {"root without handle", 1, 0}} {
		var out fuse.IoctlOut
		in := &fuse.IoctlIn{InHeader: *hdr(c.node), Fh: c.fh, Cmd: unix.FS_IOC_GETFLAGS, OutSize: 8}
		if st := j.raw.Ioctl(nil, in, nil, &out, make([]byte, 8)); st != fuse.Status(syscall.ENOTTY) {
			t.Errorf("FS_IOC_GETFLAGS on %s: %v, want ENOTTY", c.name, st)
		}
	}
}

// TestStatxRefused: STATX, which go-fuse would answer from an open file's
// host descriptor past the id mapping, is ENOSYS (the client then sends
// GETATTR), with or without a handle.
func TestStatxRefused(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give a file to another user")
	}
	j := newJail(t, Options{UIDMap: []IDMap{{Client: 0, Host: 100000, Size: 65536}}, GIDMap: []IDMap{{Client: 0, Host: 100000, Size: 65536}}})
	os.Chown(filepath.Join(j.export, "file"), 1000, 1000) // unmapped: 65534 for the client
	id, st := j.lookup(t, 1, "file")
	if st != fuse.OK {
		t.Fatal(st)
	}
	var oo fuse.OpenOut
	if st := j.raw.Open(nil, &fuse.OpenIn{InHeader: *hdr(id), Flags: uint32(os.O_RDONLY)}, &oo); st != fuse.OK {
		t.Fatal(st)
	}
	defer j.raw.Release(nil, &fuse.ReleaseIn{InHeader: *hdr(id), Fh: oo.Fh})
	for _, fh := range []uint64{oo.Fh, 0} {
		var so fuse.StatxOut
		in := &fuse.StatxIn{InHeader: *hdr(id), Fh: fh, SxFlags: unix.AT_EMPTY_PATH, SxMask: unix.STATX_BASIC_STATS}
		if fh != 0 {
			in.GetattrFlags = fuse.FUSE_GETATTR_FH
		}
		if st := j.raw.Statx(nil, in, &so); st != fuse.ENOSYS {
			t.Errorf("STATX (fh %d): %v, uid %d, want ENOSYS", fh, st, so.Uid)
		}
	}
}

// procFDs counts this process's open descriptors.
func procFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestLookupAgainOneDescriptor: looking a directory up again, as a
// client does whenever its entry times out, keeps one descriptor for
// it. go-fuse makes a node for every LOOKUP and drops it without a word
// when it already has one for the inode; each of those nodes held a
// descriptor of its own, so every look-up leaked one (a KIWI build with
// its tree on a share failed with EMFILE in dpkg). Forgetting the
// directory closes its descriptor.
func TestLookupAgainOneDescriptor(t *testing.T) {
	j := newJail(t, Options{})
	before := procFDs(t)
	const n = 300
	var id uint64
	for range n {
		var st fuse.Status
		if id, st = j.lookup(t, 1, "dir"); st != fuse.OK {
			t.Fatal(st)
		}
	}
	if got := OpenDescriptors(j.root); got != 2 {
		t.Errorf("after %d look-ups of one directory the export holds %d descriptors, want 2 (root and dir)", n, got)
	}
	if got := procFDs(t); got > before+1 {
		t.Errorf("after %d look-ups of one directory the process has %d more descriptors", n, got-before)
	}
	// The directory still works through the shared descriptor.
	var eo fuse.EntryOut
	if st := j.raw.Mkdir(nil, &fuse.MkdirIn{InHeader: *hdr(id), Mode: 0o755}, "sub", &eo); st != fuse.OK {
		t.Fatalf("mkdir in the directory: %v", st)
	}
	if _, err := os.Stat(filepath.Join(j.export, "dir", "sub")); err != nil {
		t.Fatal(err)
	}
	// Forgotten by the client, and the dropped nodes collected: closed.
	j.raw.Forget(eo.NodeId, 1)
	j.raw.Forget(id, n)
	deadline := time.Now().Add(10 * time.Second)
	for OpenDescriptors(j.root) != 1 && time.Now().Before(deadline) {
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
	if got := OpenDescriptors(j.root); got != 1 {
		t.Errorf("after the client forgot the directory the export holds %d descriptors, want 1 (root)", got)
	}
	if got := procFDs(t); got > before {
		t.Errorf("after the client forgot the directory the process has %d descriptors, %d before the look-ups", got, before)
	}
}

// TestRenameFlags: rename takes RENAME_NOREPLACE and RENAME_EXCHANGE;
// RENAME_WHITEOUT, which leaves a character device 0:0 in the old name's
// place (overlayfs's whiteout), is refused, mapped or not, so that a
// guest cannot make a device node on the host that way either.
func TestRenameFlags(t *testing.T) {
	for _, mapped := range []bool{false, true} {
		j := newJail(t, Options{Mapped: mapped})
		os.WriteFile(filepath.Join(j.export, "other"), []byte("other"), 0o644)
		for _, c := range []struct {
			name     string
			from, to string
			flags    uint32
			want     fuse.Status
		}{
			{"whiteout", "file", "moved", unix.RENAME_WHITEOUT, fuse.EINVAL},
			{"unknown flag", "file", "moved", 1 << 7, fuse.EINVAL},
			{"noreplace onto a file", "file", "other", unix.RENAME_NOREPLACE, fuse.Status(syscall.EEXIST)},
			{"exchange", "file", "other", unix.RENAME_EXCHANGE, fuse.OK},
		} {
			st := j.raw.Rename(nil, &fuse.RenameIn{InHeader: *hdr(1), Newdir: 1, Flags: c.flags}, c.from, c.to)
			if st != c.want {
				t.Errorf("mapped %v, rename %s: %v, want %v", mapped, c.name, st, c.want)
			}
		}
		err := filepath.WalkDir(j.export, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.Type()&(os.ModeDevice|os.ModeCharDevice) != 0 {
				t.Errorf("mapped %v: a device node on the host: %s", mapped, p)
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(filepath.Join(j.export, "file")); string(b) != "other" {
			t.Errorf("mapped %v: after the exchange file holds %q", mapped, b)
		}
	}
}
