package sharefs

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/rootless"
)

// Mapped mode (Options.Mapped), like 9p's security_model=mapped-xattr:
// what the host must never get from a client is kept in an extended
// attribute of a harmless file instead.
//
//   - A device node, FIFO or socket the client makes is an empty regular
//     file on the host, mode 0600, owned by the daemon; its type, mode,
//     device number and owner are in the attribute, and the client sees
//     the node it asked for. chmod and chown change the attribute;
//     rename, link and unlink work on the file. The client's kernel
//     handles special files itself (it never sends OPEN for one), so a
//     guest opening such a node reaches its own device, and the host has
//     no device node to open.
//   - Set-user-ID and set-group-ID bits the client gives a regular file
//     are kept in the attribute, never on the host file; the host's own
//     permission bits and owner stay authoritative for everything else,
//     so that access through the share is never wider than on the host.
//
// The attribute is trusted.kiwi-sharefs.mode when the daemon is root:
// only a process with CAP_SYS_ADMIN on the host can read or set a
// trusted.* attribute, so no host user can forge a device node or a
// set-user-ID bit that the client would honour (with user.*, anyone who
// may write a file of the export could), and the copies ordinary users
// make do not carry it. A daemon that is not real root (an ordinary
// user, or root of a user namespace, as under rootless podman) cannot
// use trusted.* and takes user.kiwi-sharefs.mode: its files all belong
// to its user (or the user's subordinate ids), who could write them
// anyway. Clients can neither read nor set either
// name (exports without Mapped included): a client that could set it
// would make itself set-user-ID files.
//
// File capabilities (security.capability) work like a set-user-ID bit,
// so a mapped export keeps the client's under the same prefix
// (trusted.kiwi-sharefs.security.capability); the client reads, lists
// and removes them as security.capability, and still sees capabilities
// the host gave a file when it set none itself.
//
// The value is text: "MODE MAJOR MINOR UID GID", MODE in octal with the
// file type bits, UID and GID host ids (the client sees them through
// the id maps).
const (
	mapAttrRoot     = "trusted.kiwi-sharefs.mode"
	mapAttrRootless = "user.kiwi-sharefs.mode"
	mapAttrPrefixes = "trusted.kiwi-sharefs.\x00user.kiwi-sharefs."
)

// fileCaps is the attribute of file capabilities.
const fileCaps = "security.capability"

// capAttr is the host name of a mapped export's file capabilities.
func (ex *export) capAttr() string {
	return strings.TrimSuffix(ex.mapAttr(), "mode") + fileCaps
}

// mapsCaps reports whether the client's attribute attr is file
// capabilities that the export keeps under capAttr.
func (ex *export) mapsCaps(attr string) bool { return ex.opts.Mapped && attr == fileCaps }

// setID are the bits mapped mode keeps off host files.
const setID = unix.S_ISUID | unix.S_ISGID

// mapping is the value of the mapping attribute.
type mapping struct {
	mode     uint32 // type and permission bits
	rdev     uint32 // as FUSE and stat encode it
	uid, gid uint32 // host ids
}

func (m mapping) String() string {
	return fmt.Sprintf("%o %d %d %d %d", m.mode, unix.Major(uint64(m.rdev)), unix.Minor(uint64(m.rdev)), m.uid, m.gid)
}

// special reports whether m stands for a node other than a regular file.
func (m mapping) special() bool {
	switch m.mode & unix.S_IFMT {
	case unix.S_IFCHR, unix.S_IFBLK, unix.S_IFIFO, unix.S_IFSOCK:
		return true
	}
	return false
}

func parseMapping(b []byte) (mapping, bool) {
	f := strings.Fields(string(b))
	if len(f) != 5 {
		return mapping{}, false
	}
	var v [5]uint64
	for i, s := range f {
		base := 10
		if i == 0 {
			base = 8
		}
		n, err := strconv.ParseUint(s, base, 32)
		if err != nil {
			return mapping{}, false
		}
		v[i] = n
	}
	m := mapping{mode: uint32(v[0]), uid: uint32(v[3]), gid: uint32(v[4])}
	rdev := unix.Mkdev(uint32(v[1]), uint32(v[2]))
	if rdev > 0xffffffff || m.mode&^(unix.S_IFMT|07777) != 0 {
		return mapping{}, false
	}
	m.rdev = uint32(rdev)
	if !m.special() && m.mode&unix.S_IFMT != unix.S_IFREG {
		return mapping{}, false
	}
	return m, true
}

// mapAttr is the name of the export's mapping attribute.
func (ex *export) mapAttr() string {
	if ex.opts.Squash || !realRoot() {
		return mapAttrRootless
	}
	return mapAttrRoot
}

// realRoot reports whether the daemon may use trusted.* attributes:
// whether it is root of the initial user namespace. Root of another
// user namespace (rootless podman runs kiwi-sharefs as root of its own)
// may not: the kernel wants CAP_SYS_ADMIN in the initial namespace for
// trusted.*, and answers EPERM to every set and ENODATA to every get.
var realRoot = sync.OnceValue(func() bool { return !rootless.Detect() })

// isMapAttr reports whether a client's attribute name is one of the
// mapping attributes, which clients may not touch.
func isMapAttr(name string) bool {
	for _, p := range strings.Split(mapAttrPrefixes, "\x00") {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// readMapping returns the mapping of the regular file behind descriptor
// fd (any kind, O_PATH included), if the export is mapped and it has one.
func (ex *export) readMapping(fd int) (mapping, bool) {
	if !ex.opts.Mapped {
		return mapping{}, false
	}
	var buf [64]byte
	k, err := unix.Getxattr(procPath(fd), ex.mapAttr(), buf[:])
	if err != nil {
		return mapping{}, false
	}
	return parseMapping(buf[:k])
}

// writeMapping stores m as the mapping of the file behind fd.
func (ex *export) writeMapping(fd int, m mapping) syscall.Errno {
	return fs.ToErrno(unix.Setxattr(procPath(fd), ex.mapAttr(), []byte(m.String()), 0))
}

// removeMapping drops the mapping of the file behind fd, if any.
func (ex *export) removeMapping(fd int) syscall.Errno {
	err := unix.Removexattr(procPath(fd), ex.mapAttr())
	if err == unix.ENODATA {
		return 0
	}
	return fs.ToErrno(err)
}

// overlay turns st, the host's stat of the inode behind fd, into what
// the client sees: for a mapped special file the mapping's type, mode,
// device and owner; for a regular file the host's, plus the set-id bits
// of its mapping. It returns the mapping, if any.
func (ex *export) overlay(fd int, st *unix.Stat_t) (mapping, bool) {
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return mapping{}, false
	}
	m, ok := ex.readMapping(fd)
	if !ok {
		return m, false
	}
	if m.special() {
		st.Mode = m.mode
		st.Rdev = uint64(m.rdev)
		st.Uid, st.Gid = m.uid, m.gid
		st.Size, st.Blocks = 0, 0
	} else {
		st.Mode |= m.mode & setID
	}
	return m, true
}

// mknodMapped makes a special file of a mapped export: an empty regular
// file of mode 0600 that belongs to the daemon, and its mapping.
func (n *node) mknodMapped(ctx context.Context, name string, mode, dev uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	uid, gid, e := n.owner(ctx)
	if e != 0 {
		return nil, e
	}
	fd, err := unix.Openat(n.fd, name, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fs.ToErrno(err)
	}
	st, e := fstat(fd)
	if e == 0 {
		// Without an owner of the client's: the daemon's, or the group a
		// set-group-ID directory gave the file.
		m := mapping{mode: mode&unix.S_IFMT | mode&07777, rdev: dev, uid: st.Uid, gid: st.Gid}
		if uid >= 0 {
			m.uid = uint32(uid)
		}
		if gid >= 0 {
			m.gid = uint32(gid)
		}
		e = n.ex.writeMapping(fd, m)
	}
	unix.Close(fd)
	if e != 0 {
		unix.Unlinkat(n.fd, name, 0)
		return nil, e
	}
	cfd, e := n.openChild(name)
	if e != 0 {
		return nil, e
	}
	return n.newChild(ctx, cfd, out)
}

// mapSetID keeps the set-id bits of mode, given to the new regular file
// behind fd, in its mapping; the host file was made without them.
func (n *node) mapSetID(fd int, mode uint32) syscall.Errno {
	if mode&setID == 0 {
		return 0
	}
	st, e := fstat(fd)
	if e != 0 {
		return e
	}
	return n.ex.writeMapping(fd, mapping{mode: unix.S_IFREG | mode&07777, uid: st.Uid, gid: st.Gid})
}

// killSetID strips the host's set-id bits from the regular file open as
// fd when a client of a mapped export opened it with flags that let it
// change the contents (write access or O_TRUNC), as the kernel strips
// them when an ordinary user writes or truncates the file: set-user-ID
// always, set-group-ID with group execute (without it the bit marks
// mandatory locking, not a program). The daemon is root with CAP_FSETID,
// for which the kernel keeps them, so a client could otherwise put its
// own code into a set-user-ID-root program that the host keeps in the
// export. It happens at the open, before any write, and a client opening
// for writing without writing loses the bits too. Set-id bits in a
// file's mapping are the client's own and stay. Exports that are not
// mapped let a client set real set-id bits anyway and keep them.
func (ex *export) killSetID(fd, flags int) syscall.Errno {
	if !ex.opts.Mapped || flags&unix.O_ACCMODE == unix.O_RDONLY && flags&unix.O_TRUNC == 0 {
		return 0
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fs.ToErrno(err)
	}
	kill := st.Mode & unix.S_ISUID
	if st.Mode&(unix.S_ISGID|unix.S_IXGRP) == unix.S_ISGID|unix.S_IXGRP {
		kill |= unix.S_ISGID
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || kill == 0 {
		return 0
	}
	err := unix.Fchmod(fd, st.Mode&07777&^kill)
	if err == unix.EPERM {
		// A daemon that may not chmod the file (not its owner, no
		// CAP_FOWNER over it: a rootless one) has no CAP_FSETID over it
		// either, and the kernel strips the bits at its first write.
		return 0
	}
	return fs.ToErrno(err)
}

// hostMode is the mode a new inode of the client's gets on the host: a
// mapped export's regular files never get set-id bits.
func (ex *export) hostMode(mode uint32) uint32 {
	if ex.opts.Mapped && (mode&unix.S_IFMT == unix.S_IFREG || mode&unix.S_IFMT == 0) {
		return mode &^ setID
	}
	return mode
}

// mappedDir is a directory handle of a mapped export: its entries of
// mapped special files are listed with their mapped type.
type mappedDir struct {
	fs.DirStream
	ex *export
	fd int // O_PATH descriptor of the directory, owned
}

var (
	_ fs.FileReaddirenter = (*mappedDir)(nil)
	_ fs.FileSeekdirer    = (*mappedDir)(nil)
	_ fs.FileReleasedirer = (*mappedDir)(nil)
	_ fs.FileFsyncdirer   = (*mappedDir)(nil)
)

func (d *mappedDir) Readdirent(ctx context.Context) (*fuse.DirEntry, syscall.Errno) {
	de, e := d.DirStream.(fs.FileReaddirenter).Readdirent(ctx)
	if de != nil && de.Mode&unix.S_IFMT == unix.S_IFREG && checkName(de.Name) == 0 {
		var buf [64]byte
		// The entry's own name below the directory's descriptor: not
		// followed if it became a symlink meanwhile.
		if k, err := unix.Lgetxattr(procPath(d.fd)+"/"+de.Name, d.ex.mapAttr(), buf[:]); err == nil {
			if m, ok := parseMapping(buf[:k]); ok && m.special() {
				de.Mode = m.mode & unix.S_IFMT
			}
		}
	}
	return de, e
}

func (d *mappedDir) Seekdir(ctx context.Context, off uint64) syscall.Errno {
	return d.DirStream.(fs.FileSeekdirer).Seekdir(ctx, off)
}

func (d *mappedDir) Fsyncdir(ctx context.Context, flags uint32) syscall.Errno {
	return d.DirStream.(fs.FileFsyncdirer).Fsyncdir(ctx, flags)
}

func (d *mappedDir) Releasedir(ctx context.Context, flags uint32) {
	d.DirStream.Close()
	unix.Close(d.fd)
}
