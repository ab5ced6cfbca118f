package sharefs

import (
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/rootless"
)

// caller is a FUSE header from uid and gid 1000.
func caller(node uint64) *fuse.InHeader {
	return &fuse.InHeader{NodeId: node, Caller: fuse.Caller{Owner: fuse.Owner{Uid: 1000, Gid: 1000}}}
}

// hostAttr is the host's view of name in the export: its stat and its
// mapping attribute ("" without one).
func hostAttr(t *testing.T, j *jail, name string) (unix.Stat_t, string) {
	t.Helper()
	var st unix.Stat_t
	p := filepath.Join(j.export, name)
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	attr := mapAttrRoot
	if !realRoot() {
		attr = mapAttrRootless
	}
	buf := make([]byte, 64)
	k, err := unix.Lgetxattr(p, attr, buf)
	if err != nil {
		return st, ""
	}
	return st, string(buf[:k])
}

// TestMappedNodes: in a mapped export, device nodes, FIFOs and sockets
// are plain 0600 files of the daemon's on the host, and what the client
// asked for in every reply; chmod and chown change only the mapping;
// rename and link keep it.
func TestMappedNodes(t *testing.T) {
	j := newJail(t, Options{Mapped: true, Xattr: true})
	for _, c := range []struct {
		name       string
		mode, rdev uint32
	}{
		{"chr", unix.S_IFCHR | 0o644, uint32(unix.Mkdev(1, 3))},
		{"blk", unix.S_IFBLK | 0o660, uint32(unix.Mkdev(7, 300))},
		{"fifo", unix.S_IFIFO | 0o600, 0},
		{"sock", unix.S_IFSOCK | 0o755, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			check := func(what string, a fuse.Attr, mode, uid uint32) {
				t.Helper()
				if a.Mode != mode || a.Rdev != c.rdev || a.Uid != uid || a.Size != 0 {
					t.Errorf("%s: mode %#o rdev %#x uid %d size %d, want %#o %#x %d 0", what, a.Mode, a.Rdev, a.Uid, a.Size, mode, c.rdev, uid)
				}
			}
			hostPlain := func() {
				t.Helper()
				st, attr := hostAttr(t, j, c.name)
				if st.Mode != unix.S_IFREG|0o600 || st.Size != 0 || st.Uid != uint32(os.Geteuid()) || attr == "" {
					t.Errorf("host: mode %#o size %d uid %d, mapping %q; want a plain 0600 file of the daemon's with a mapping", st.Mode, st.Size, st.Uid, attr)
				}
			}
			var eo fuse.EntryOut
			if st := j.raw.Mknod(nil, &fuse.MknodIn{InHeader: *caller(1), Mode: c.mode, Rdev: c.rdev}, c.name, &eo); st != fuse.OK {
				t.Fatal(st)
			}
			want := uint32(1000)
			if os.Geteuid() != 0 {
				want = uint32(os.Geteuid()) // Squash is implied
			}
			check("mknod", eo.Attr, c.mode, want)
			hostPlain()
			id := eo.NodeId
			var ao fuse.AttrOut
			if st := j.raw.GetAttr(nil, &fuse.GetAttrIn{InHeader: *hdr(id)}, &ao); st != fuse.OK {
				t.Fatal(st)
			}
			check("getattr", ao.Attr, c.mode, want)
			var oo fuse.OpenOut
			if st := j.raw.Open(nil, &fuse.OpenIn{InHeader: *hdr(id), Flags: uint32(os.O_RDWR)}, &oo); st == fuse.OK {
				t.Error("opened the file behind a mapped node")
			}
			// chmod and chown: the mapping changes, the host file does not.
			in := &fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{InHeader: *hdr(id), Valid: fuse.FATTR_MODE, Mode: 0o4711}}
			if st := j.raw.SetAttr(nil, in, &ao); st != fuse.OK {
				t.Fatal(st)
			}
			mode := c.mode&unix.S_IFMT | 0o4711
			check("chmod", ao.Attr, mode, want)
			if os.Geteuid() == 0 {
				in = &fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{InHeader: *hdr(id), Valid: fuse.FATTR_UID | fuse.FATTR_GID, Owner: fuse.Owner{Uid: 42, Gid: 43}}}
				if st := j.raw.SetAttr(nil, in, &ao); st != fuse.OK {
					t.Fatal(st)
				}
				want = 42
				check("chown", ao.Attr, mode, want)
			}
			hostPlain()
			// rename and link: the node is the file, mapping included.
			if st := j.raw.Rename(nil, &fuse.RenameIn{InHeader: *hdr(1), Newdir: 1}, c.name, c.name+"2"); st != fuse.OK {
				t.Fatal(st)
			}
			if st := j.raw.Link(nil, &fuse.LinkIn{InHeader: *hdr(1), Oldnodeid: id}, c.name, &eo); st != fuse.OK {
				t.Fatal(st)
			}
			check("link", eo.Attr, mode, want)
			if eo.Attr.Nlink != 2 {
				t.Errorf("nlink %d after link", eo.Attr.Nlink)
			}
			hostPlain()
			if st := j.raw.Lookup(nil, hdr(1), c.name+"2", &eo); st != fuse.OK {
				t.Fatal(st)
			}
			check("lookup after rename", eo.Attr, mode, want)
			if st := j.raw.Unlink(nil, hdr(1), c.name+"2"); st != fuse.OK {
				t.Fatal(st)
			}
		})
	}
	// Listings give the mapped type.
	types := map[string]uint32{}
	for _, e := range readDir(t, j, 1) {
		types[e.name] = e.typ
	}
	for name, want := range map[string]uint32{"chr": unix.DT_CHR, "blk": unix.DT_BLK, "fifo": unix.DT_FIFO, "sock": unix.DT_SOCK, "file": unix.DT_REG, "dir": unix.DT_DIR} {
		if types[name] != want {
			t.Errorf("readdir type of %s: %d, want %d", name, types[name], want)
		}
	}
	// No special file ever reached the host.
	ents, _ := os.ReadDir(j.export)
	for _, e := range ents {
		if e.Type()&(os.ModeDevice|os.ModeNamedPipe|os.ModeSocket|os.ModeSetuid|os.ModeSetgid) != 0 {
			t.Errorf("host has %s of mode %v", e.Name(), e.Type())
		}
	}
}

type dirent struct {
	name string
	typ  uint32
}

// readDir lists directory node id with READDIR.
func readDir(t *testing.T, j *jail, id uint64) []dirent {
	t.Helper()
	var oo fuse.OpenOut
	if st := j.raw.OpenDir(nil, &fuse.OpenIn{InHeader: *hdr(id)}, &oo); st != fuse.OK {
		t.Fatal(st)
	}
	defer j.raw.ReleaseDir(&fuse.ReleaseIn{InHeader: *hdr(id), Fh: oo.Fh})
	var out []dirent
	var off uint64
	for {
		buf := make([]byte, 4096)
		l := fuse.NewDirEntryList(buf, off)
		if st := j.raw.ReadDir(nil, &fuse.ReadIn{InHeader: *hdr(id), Fh: oo.Fh, Offset: off, Size: uint32(len(buf))}, l); st != fuse.OK {
			t.Fatal(st)
		}
		b := l.Bytes()
		if len(b) == 0 {
			return out
		}
		// struct fuse_dirent: ino, off, namelen, type, name, padded to 8.
		for len(b) >= 24 {
			off = binary.LittleEndian.Uint64(b[8:])
			nl := int(binary.LittleEndian.Uint32(b[16:]))
			out = append(out, dirent{string(b[24 : 24+nl]), binary.LittleEndian.Uint32(b[20:])})
			b = b[(24+nl+7)&^7:]
		}
	}
}

// TestMappedSetID: set-id bits the client gives a regular file live in
// the mapping, never on the host file; the client sees them.
func TestMappedSetID(t *testing.T) {
	j := newJail(t, Options{Mapped: true})
	var co fuse.CreateOut
	if st := j.raw.Create(nil, &fuse.CreateIn{InHeader: *hdr(1), Flags: uint32(os.O_WRONLY), Mode: 0o4755}, "suid", &co); st != fuse.OK {
		t.Fatal(st)
	}
	j.raw.Release(nil, &fuse.ReleaseIn{InHeader: *hdr(co.NodeId), Fh: co.Fh})
	var eo fuse.EntryOut
	if st := j.raw.Mknod(nil, &fuse.MknodIn{InHeader: *hdr(1), Mode: unix.S_IFREG | 0o2750}, "sgid", &eo); st != fuse.OK {
		t.Fatal(st)
	}
	id, _ := j.lookup(t, 1, "file")
	var ao fuse.AttrOut
	if st := j.raw.SetAttr(nil, &fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{InHeader: *hdr(id), Valid: fuse.FATTR_MODE, Mode: 0o6755}}, &ao); st != fuse.OK {
		t.Fatal(st)
	}
	for _, c := range []struct {
		name         string
		seen         uint32
		host         uint32
		mappingThere bool
	}{{"suid", 0o4755, 0o755, true}, {"sgid", 0o2750, 0o750, true}, {"file", 0o6755, 0o755, true}} {
		if st := j.raw.Lookup(nil, hdr(1), c.name, &eo); st != fuse.OK {
			t.Fatal(st)
		}
		st, attr := hostAttr(t, j, c.name)
		if eo.Attr.Mode != unix.S_IFREG|c.seen || st.Mode != unix.S_IFREG|c.host || (attr != "") != c.mappingThere {
			t.Errorf("%s: client sees %#o, host has %#o and mapping %q; want %#o, %#o", c.name, eo.Attr.Mode, st.Mode, attr, c.seen, c.host)
		}
	}
	// Dropping the bits drops the mapping.
	if st := j.raw.SetAttr(nil, &fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{InHeader: *hdr(id), Valid: fuse.FATTR_MODE, Mode: 0o700}}, &ao); st != fuse.OK {
		t.Fatal(st)
	}
	if st, attr := hostAttr(t, j, "file"); ao.Attr.Mode != unix.S_IFREG|0o700 || st.Mode != unix.S_IFREG|0o700 || attr != "" {
		t.Errorf("after chmod 0700: client sees %#o, host %#o, mapping %q", ao.Attr.Mode, st.Mode, attr)
	}
}

// TestMapAttrHidden: clients can neither read, list, set nor remove the
// mapping attributes, in mapped exports and others.
func TestMapAttrHidden(t *testing.T) {
	for _, mapped := range []bool{true, false} {
		j := newJail(t, Options{Mapped: mapped, Xattr: true})
		var eo fuse.EntryOut
		if st := j.raw.Mknod(nil, &fuse.MknodIn{InHeader: *hdr(1), Mode: unix.S_IFIFO | 0o644}, "fifo", &eo); st != fuse.OK {
			t.Fatal(st)
		}
		id, _ := j.lookup(t, 1, "file")
		if err := unix.Setxattr(filepath.Join(j.export, "file"), "user.other", []byte("x"), 0); err != nil {
			t.Fatal(err)
		}
		for _, attr := range []string{mapAttrRoot, mapAttrRootless, "user.kiwi-sharefs.other"} {
			if st := j.raw.SetXAttr(nil, &fuse.SetXAttrIn{InHeader: *hdr(id), Size: 6}, attr, []byte("20644 1 3 0 0")); st != fuse.EPERM {
				t.Errorf("mapped %v: setxattr %s: %v, want EPERM", mapped, attr, st)
			}
			if st := j.raw.RemoveXAttr(nil, hdr(eo.NodeId), attr); st != fuse.EPERM {
				t.Errorf("mapped %v: removexattr %s: %v, want EPERM", mapped, attr, st)
			}
			if _, st := j.raw.GetXAttr(nil, hdr(eo.NodeId), attr, make([]byte, 64)); st != fuse.ENOATTR {
				t.Errorf("mapped %v: getxattr %s: %v, want ENODATA", mapped, attr, st)
			}
		}
		for _, node := range []uint64{id, eo.NodeId} {
			buf := make([]byte, 256)
			k, st := j.raw.ListXAttr(nil, hdr(node), buf)
			if st != fuse.OK || strings.Contains(string(buf[:k]), "kiwi-sharefs") {
				t.Errorf("mapped %v: listxattr: %q %v", mapped, buf[:k], st)
			}
			if size, st := j.raw.ListXAttr(nil, hdr(node), nil); st != fuse.OK || size != k {
				t.Errorf("mapped %v: listxattr size %d %v, want %d", mapped, size, st, k)
			}
		}
	}
}

// TestCreateExisting: CREATE of a name that exists (made on the host
// after the client's lookup, or sent by a hostile client) opens the file
// as it is: no new owner, no set-id mapping, never a special file, and
// EEXIST when the client asked for O_EXCL.
func TestCreateExisting(t *testing.T) {
	j := newJail(t, Options{Mapped: true})
	var eo fuse.EntryOut
	if st := j.raw.Mknod(nil, &fuse.MknodIn{InHeader: *hdr(1), Mode: unix.S_IFCHR | 0o666, Rdev: uint32(unix.Mkdev(1, 3))}, "chr", &eo); st != fuse.OK {
		t.Fatal(st)
	}
	unix.Mkfifo(filepath.Join(j.export, "fifo"), 0o666)
	before, _ := hostAttr(t, j, "file")
	for _, c := range []struct {
		name  string
		flags int
		want  fuse.Status
	}{
		{"file", os.O_RDWR, fuse.OK},
		{"file", os.O_RDWR | os.O_EXCL, fuse.Status(syscall.EEXIST)},
		{"chr", os.O_RDWR, fuse.EACCES},
		{"fifo", os.O_WRONLY, fuse.EACCES},
	} {
		var co fuse.CreateOut
		st := j.raw.Create(nil, &fuse.CreateIn{InHeader: *caller(1), Flags: uint32(c.flags), Mode: 0o4777}, c.name, &co)
		if st == fuse.OK {
			j.raw.Release(nil, &fuse.ReleaseIn{InHeader: *hdr(co.NodeId), Fh: co.Fh})
		}
		if st != c.want {
			t.Errorf("create %s (flags %#o): %v, want %v", c.name, c.flags, st, c.want)
		}
	}
	after, attr := hostAttr(t, j, "file")
	if after.Uid != before.Uid || after.Mode != before.Mode || attr != "" {
		t.Errorf("existing file changed: uid %d->%d, mode %#o->%#o, mapping %q", before.Uid, after.Uid, before.Mode, after.Mode, attr)
	}
}

// TestMappedCapabilities: file capabilities a client gives a file of a
// mapped export are kept under the mapping prefix, never as the host's
// security.capability; the client reads, lists and removes them as its
// own.
func TestMappedCapabilities(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for security.* and trusted.* attributes")
	}
	j := newJail(t, Options{Mapped: true, Xattr: true})
	id, _ := j.lookup(t, 1, "file")
	p := filepath.Join(j.export, "file")
	// struct vfs_cap_data, revision 2: cap_net_raw permitted, effective.
	caps := []byte{1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	if st := j.raw.SetXAttr(nil, &fuse.SetXAttrIn{InHeader: *hdr(id), Size: uint32(len(caps))}, fileCaps, caps); st != fuse.OK {
		t.Fatal(st)
	}
	if _, err := unix.Getxattr(p, fileCaps, make([]byte, 64)); err != unix.ENODATA {
		t.Errorf("host file capabilities: %v, want none", err)
	}
	buf := make([]byte, 64)
	if k, err := unix.Getxattr(p, "trusted.kiwi-sharefs."+fileCaps, buf); err != nil || string(buf[:k]) != string(caps) {
		t.Errorf("mapped capabilities on the host: %x %v", buf[:k], err)
	}
	if k, st := j.raw.GetXAttr(nil, hdr(id), fileCaps, buf); st != fuse.OK || string(buf[:k]) != string(caps) {
		t.Errorf("client reads %x %v", buf[:k], st)
	}
	if k, st := j.raw.ListXAttr(nil, hdr(id), buf); st != fuse.OK || string(buf[:k]) != fileCaps+"\x00" {
		t.Errorf("client lists %q %v", buf[:k], st)
	}
	if st := j.raw.RemoveXAttr(nil, hdr(id), fileCaps); st != fuse.OK {
		t.Fatal(st)
	}
	if _, st := j.raw.GetXAttr(nil, hdr(id), fileCaps, buf); st != fuse.ENOATTR {
		t.Errorf("after removal: %v, want ENODATA", st)
	}
}

// TestMappedInUserNamespace: a daemon that is root of a user namespace
// mapping 65536 ids (rootless podman's kiwi-sharefs: it may chown, so
// ownership is not squashed) cannot use trusted.* attributes; mapped
// mode must still work there, with user.kiwi-sharefs.mode. It used to
// take trusted.* because its uid is 0: every mknod of a device node and
// every chmod to a set-id mode failed with EPERM (dpkg installing a
// set-user-ID program, debootstrap making /dev/null).
func TestMappedInUserNamespace(t *testing.T) {
	if os.Getenv("SHAREFS_TEST_USERNS") == "1" {
		mappedNodeAndSetID(t)
		return
	}
	if !realRoot() {
		t.Skip("needs real root to map 65536 ids into a user namespace")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestMappedInUserNamespace$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), "SHAREFS_TEST_USERNS=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  syscall.CLONE_NEWUSER,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: 0, Size: 65536}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: 0, Size: 65536}},
	}
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestMappedInUserNamespace") {
		t.Fatalf("in a user namespace: %v\n%s", err, out)
	}
}

// mappedNodeAndSetID makes a character device and gives a file the
// set-user-ID bit through a mapped export as the VM's bind mounts are
// served in this process's situation (ownership squashed only if this
// process cannot chown), and checks what client and host see.
func mappedNodeAndSetID(t *testing.T) {
	if realRoot() {
		t.Fatal("expected to run in a user namespace")
	}
	j := newJail(t, Options{Mapped: true, Xattr: true, Squash: !rootless.CanChown()})
	var eo fuse.EntryOut
	null := uint32(unix.Mkdev(1, 3))
	if st := j.raw.Mknod(nil, &fuse.MknodIn{InHeader: *hdr(1), Mode: unix.S_IFCHR | 0o666, Rdev: null}, "null", &eo); st != fuse.OK {
		t.Fatalf("mknod of a character device: %v", st)
	}
	if eo.Attr.Mode != unix.S_IFCHR|0o666 || eo.Attr.Rdev != null {
		t.Errorf("mknod: client sees mode %#o rdev %#x", eo.Attr.Mode, eo.Attr.Rdev)
	}
	if st, attr := hostAttr(t, j, "null"); st.Mode != unix.S_IFREG|0o600 || attr == "" {
		t.Errorf("host: mode %#o, mapping %q; want a 0600 file with a mapping", st.Mode, attr)
	}
	id, _ := j.lookup(t, 1, "file")
	var ao fuse.AttrOut
	if st := j.raw.SetAttr(nil, &fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{InHeader: *hdr(id), Valid: fuse.FATTR_MODE, Mode: 0o4755}}, &ao); st != fuse.OK {
		t.Fatalf("chmod 4755: %v", st)
	}
	if st, attr := hostAttr(t, j, "file"); ao.Attr.Mode != unix.S_IFREG|0o4755 || st.Mode != unix.S_IFREG|0o755 || attr == "" {
		t.Errorf("chmod 4755: client sees %#o, host has %#o and mapping %q", ao.Attr.Mode, st.Mode, attr)
	}
}

// TestHostSetIDWritten: a set-id program the host put into a mapped
// export loses its host set-id bits when a client opens it for writing
// or truncates it, as the kernel strips them at an ordinary user's
// write (set-user-ID always, set-group-ID with group execute). The
// daemon, root with CAP_FSETID, would keep them, so a guest could
// otherwise put its own code into a host set-user-ID-root program, the
// thing mapped mode keeps it from making. Opening for reading leaves
// the bits; an unmapped export, where a client may set them anyway,
// does not strip them.
func TestHostSetIDWritten(t *testing.T) {
	for _, mapped := range []bool{true, false} {
		j := newJail(t, Options{Mapped: mapped})
		cases := []struct {
			name       string
			host       uint32
			flags      int    // open flags, or -1: SETATTR of the size
			wantMapped uint32 // the host's mode afterwards, mapped
		}{
			{"suid-read", 0o4755, os.O_RDONLY, 0o4755},
			{"suid-write", 0o4755, os.O_WRONLY, 0o755},
			{"suid-rdwr", 0o4711, os.O_RDWR, 0o711},
			{"both-trunc", 0o6755, os.O_RDONLY | os.O_TRUNC, 0o755},
			{"sgid-write", 0o2755, os.O_WRONLY, 0o755},
			{"sgid-noexec-write", 0o2745, os.O_WRONLY, 0o2745}, // not set-group-ID for exec
			{"suid-truncate", 0o4755, -1, 0o755},
		}
		for _, c := range cases {
			p := filepath.Join(j.export, c.name)
			if err := os.WriteFile(p, []byte("#!/bin/sh\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := unix.Chmod(p, c.host); err != nil {
				t.Fatal(err)
			}
			id, st := j.lookup(t, 1, c.name)
			if st != fuse.OK {
				t.Fatal(st)
			}
			if c.flags < 0 {
				var ao fuse.AttrOut
				if st := j.raw.SetAttr(nil, &fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{InHeader: *hdr(id), Valid: fuse.FATTR_SIZE}}, &ao); st != fuse.OK {
					t.Fatalf("%s: truncate: %v", c.name, st)
				}
			} else {
				var oo fuse.OpenOut
				if st := j.raw.Open(nil, &fuse.OpenIn{InHeader: *hdr(id), Flags: uint32(c.flags)}, &oo); st != fuse.OK {
					t.Fatalf("%s: open: %v", c.name, st)
				}
				j.raw.Release(nil, &fuse.ReleaseIn{InHeader: *hdr(id), Fh: oo.Fh})
			}
			want := c.host
			if mapped {
				want = c.wantMapped
			}
			if got, _ := hostAttr(t, j, c.name); got.Mode&07777 != want {
				t.Errorf("mapped %v, %s: host mode %#o afterwards, want %#o", mapped, c.name, got.Mode&07777, want)
			}
		}
	}
}
