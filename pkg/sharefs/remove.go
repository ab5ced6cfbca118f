// Package sharefs is the file tree kiwi-sharefs serves: a passthrough of
// one host directory, the export, to an untrusted client (a VM's guest
// over virtio-fs, or anyone using a host FUSE mount), built on go-fuse's
// node API.
//
// Every export is a jail. Nothing in it works on host path names: each
// directory node holds an O_PATH file descriptor of its inode, and every
// operation is a *at system call relative to a directory's descriptor
// with one name component, never following a symlink (O_NOFOLLOW,
// AT_SYMLINK_NOFOLLOW). Other nodes hold no descriptor (a guest that
// walks a large tree would otherwise exhaust the daemon's file limit):
// they are opened from their parent directory's descriptor by their
// current name, and the result must be the same inode (device and inode
// number) or the request fails with ESTALE. Names containing "/" and the names "." and ".."
// are refused. So a request reaches only inodes that are reachable from
// the export's root by real directory entries at the time of the call: a
// symlink (absolute or relative) is returned to the client, never
// followed; ".." does not exist; a concurrent rename that swaps a
// directory for a symlink changes nothing, because the directory's
// descriptor, not its name, is what later requests use. Opening an inode
// again (with read/write flags) goes through /proc/self/fd, which reaches
// exactly the inode the descriptor holds. This is virtiofsd's design; we
// chose it over a private mount namespace with pivot_root because it
// needs no privilege (rootless exports), keeps the daemon in the host's
// namespaces for debugging, and cannot be undone by a mount race.
//
// Device nodes are never opened and never created: a guest that could
// make a block device node in a shared directory would hand every host
// user who can reach the directory the host's disks. A mapped export
// (Options.Mapped, mapped.go) shows the client the nodes it made, kept
// as plain files with an extended attribute. ioctl is refused
// on files and directories; STATX is left to GETATTR. A read-only export
// refuses every change with EROFS.
package sharefs

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// IDMap maps a range of client ids to host ids, like a user namespace's
// uid_map line.
type IDMap struct {
	Client, Host, Size uint32
}

// Options configure an export.
type Options struct {
	// ReadOnly refuses every change with EROFS.
	ReadOnly bool
	// Xattr enables extended attributes; without it they are ENOTSUP.
	Xattr bool
	// Squash makes every file the client creates belong to the daemon's
	// user (no chown), as when the daemon is not root: a rootless build's
	// results belong to the user who ran it. Ownership changes the
	// client asks for are then accepted and ignored.
	Squash bool
	// UIDMap and GIDMap translate ids between client and host (empty:
	// identity). Ids without a mapping are refused with EPERM on the way
	// in and shown as the overflow id 65534 on the way out.
	UIDMap, GIDMap []IDMap
	// Cache is the client's caching: CacheAuto (the default),
	// CacheAlways, CacheMetadata or CacheNever.
	Cache string
	// Passthrough says that the tree is mounted through /dev/fuse, where
	// the kernel may read and write open files on the host itself (FUSE
	// passthrough: Linux 6.9 and later, daemon as root). Direct I/O
	// would override that, so files get it only with CacheNever.
	Passthrough bool
	// Mapped keeps device nodes, FIFOs and sockets the client makes, and
	// the set-id bits it gives regular files, in an extended attribute
	// of a plain file instead of on the host (see mapped.go); without
	// it, device nodes are refused with EPERM.
	Mapped bool
}

// Cache modes, as virtiofsd names them.
const (
	// CacheAuto lets the client cache names and attributes for a second
	// and file data until the file changes.
	CacheAuto = "auto"
	// CacheAlways lets the client cache everything for a day: for
	// exports nobody else changes while they are served.
	CacheAlways = "always"
	// CacheMetadata caches names and attributes as CacheAuto does, but
	// reads and writes go to the export (direct I/O), except on files
	// opened read-write: for shares of data the client streams through
	// once, such as a build's inputs and images.
	CacheMetadata = "metadata"
	// CacheNever makes every access a request (direct I/O).
	CacheNever = "never"
)

// FSOptions returns go-fuse's options for serving an export with o: the
// cache timeouts, 1 MiB writes and modes reported as they are.
func FSOptions(o Options) (*fs.Options, error) {
	var d time.Duration
	switch o.Cache {
	case CacheAuto, CacheMetadata, "":
		d = time.Second
	case CacheAlways:
		d = 24 * time.Hour
	case CacheNever:
	default:
		return nil, fmt.Errorf("cache mode %q: want auto, always, metadata or never", o.Cache)
	}
	// Misses are cached as long as hits when nobody else changes the
	// tree (always); otherwise for at most a second, so that a file the
	// host creates shows up soon.
	neg := d
	if o.Cache != CacheAlways && neg > time.Second {
		neg = time.Second
	}
	opts := &fs.Options{EntryTimeout: &d, AttrTimeout: &d, NegativeTimeout: &neg}
	opts.MaxWrite = 1 << 20
	// Let clients map direct-I/O files shared (Linux 6.6+; go-fuse
	// grants it only when the client offers it): a MAP_SHARED mapping of
	// a file opened read-only on a CacheMetadata export then works, where
	// older clients fail it with ENODEV. The client keeps such a
	// mapping's pages coherent with the direct I/O itself.
	opts.ExtraCapabilities |= fuse.CAP_DIRECT_IO_ALLOW_MMAP
	opts.DisableXAttrs = !o.Xattr
	// Report the permission bits the host has, 0000 included. Without
	// this, go-fuse's node bridge turns a zero permission into 0644 (0755
	// for a directory) in every reply that carries attributes; the
	// client's kernel checks access against what we report
	// (default_permissions: the host mount asks for it, virtio-fs always
	// has it) and the daemon then acts as root, so a mode-0000 file was
	// readable, and a mode-0000 directory listable, by anyone.
	opts.NullPermissions = true
	opts.Name = "kiwi-sharefs"
	return opts, nil
}

// fopenFlags are the FOPEN_* flags an open file gets.
//
// Files opened write-only bypass the client's page cache (direct I/O, as
// 9p's cache=mmap does): images and copies of gigabytes are written once,
// and pushing them through the guest's page cache costs more than the
// transfer (measured under TCG: 256 MiB in 1.08 s direct, 4.1 s through
// the page cache). CacheMetadata extends that to files opened read-only:
// the guest reads straight into the reader's buffer, one request per
// MiB, as 9p does, instead of filling its page cache page by page. The
// price is that a Linux client before 6.6 refuses MAP_SHARED mappings of
// direct-I/O files (ENODEV; apt's caches, for one, map that way; newer
// clients allow them, FSOptions asks for FUSE_DIRECT_IO_ALLOW_MMAP), and
// unmaps a file from everyone when one process maps it privately (which
// makes running programs from such an export slow); files opened
// read-write stay cached, so that shared writable mappings (databases)
// keep working. So do ELF files (programs and shared libraries), which
// are what gets mapped: ldconfig maps each library it looks at
// MAP_SHARED from a read-only descriptor, and with direct I/O it found
// none ("Cannot mmap file"), so that a KIWI image built on a share got
// an empty /etc/ld.so.cache. fd is the opened file, looked at only for
// that (-1: a new, empty file).
//
// No open file needs FLUSH: the client's close would make us close a
// duplicate of the host descriptor, which writes nothing (data goes to
// the host with each WRITE; fsync is its own request) and releases no
// lock (locks stay in the client's kernel: go-fuse's EnableLocks is off).
// NOFLUSH saves that round trip on every close, one of the seven
// requests a virtio-fs client sent per file when unpacking a tree
// (clients before Linux 5.16 ignore it).
//
// With Passthrough, the kernel does a file's I/O on the host file itself
// when it can (go-fuse asks for it at every open): faster than any
// request, and it keeps no data in the FUSE client's page cache either,
// so only CacheNever asks for direct I/O, which would override it.
func (ex *export) fopenFlags(flags, fd int) uint32 {
	fl := uint32(fuse.FOPEN_NOFLUSH)
	acc := flags & unix.O_ACCMODE
	streamed := acc == unix.O_WRONLY || ex.opts.Cache == CacheMetadata && acc == unix.O_RDONLY && !ex.opts.Passthrough && !isELF(fd)
	switch {
	case ex.opts.Cache == CacheNever, streamed && !ex.opts.Passthrough:
		fl |= fuse.FOPEN_DIRECT_IO
	case ex.opts.Cache == CacheAlways:
		fl |= fuse.FOPEN_KEEP_CACHE
	}
	return fl
}

// isELF reports whether the file open as fd starts with the ELF magic.
func isELF(fd int) bool {
	if fd < 0 {
		return false
	}
	var magic [4]byte
	k, err := unix.Pread(fd, magic[:], 0)
	return err == nil && k == len(magic) && string(magic[:]) == "\x7fELF"
}

// Root opens the export dir and returns its root node. Each transport
// (host mount, virtio-fs connection) needs a root of its own: go-fuse
// keeps the client's inode table in it.
func Root(dir string, o Options) (fs.InodeEmbedder, error) {
	if _, err := FSOptions(o); err != nil {
		return nil, err
	}
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("export %s: %w", dir, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("export %s: %w", dir, err)
	}
	return &node{ex: &export{opts: o, rootDev: st.Dev}, fd: fd}, nil
}

// export is what every node of one export shares.
type export struct {
	opts    Options
	rootDev uint64
	// open counts descriptors held, for tests and leak checks.
	open atomic.Int64

	mu sync.Mutex
	// dirs holds the descriptor of each directory below the root that
	// a node stands for (see dirFD).
	dirs map[devIno]*dirFD
}

type devIno struct{ dev, ino uint64 }

// dirFD is the O_PATH descriptor of one directory, shared by every node
// that stands for it. go-fuse (v2.12) makes a node for every LOOKUP and
// keeps it only if no node of the same inode is registered yet; the
// loser is dropped without a call back. A client looks a directory up
// again whenever its entry times out (a second with the auto and
// metadata caches), so a descriptor of each node's own leaked one per
// look-up: a KIWI build with its tree on a share ran out of them
// (EMFILE) in dpkg after 20,000 look-ups. Now a directory has one
// descriptor however many nodes stand for it, closed when the last of
// them is forgotten (OnForget) or, for nodes go-fuse dropped, garbage
// collected.
type dirFD struct {
	fd   int
	key  devIno
	refs int // guarded by export.mu
}

// dirRef is one node's reference to a dirFD, released once.
type dirRef struct {
	ex   *export
	d    *dirFD
	done bool // guarded by export.mu
}

// holdDir returns the shared descriptor of the directory that fd (an
// O_PATH descriptor, consumed) opens, with a new reference to it.
func (ex *export) holdDir(fd int, st *unix.Stat_t) *dirRef {
	key := devIno{st.Dev, st.Ino}
	ex.mu.Lock()
	defer ex.mu.Unlock()
	d := ex.dirs[key]
	if d != nil {
		unix.Close(fd)
	} else {
		d = &dirFD{fd: fd, key: key}
		if ex.dirs == nil {
			ex.dirs = map[devIno]*dirFD{}
		}
		ex.dirs[key] = d
		ex.open.Add(1)
	}
	d.refs++
	return &dirRef{ex: ex, d: d}
}

// release drops the reference; the last one closes the descriptor.
func (r *dirRef) release() {
	r.ex.mu.Lock()
	defer r.ex.mu.Unlock()
	if r.done {
		return
	}
	r.done = true
	if r.d.refs--; r.d.refs == 0 {
		delete(r.ex.dirs, r.d.key)
		unix.Close(r.d.fd)
		r.ex.open.Add(-1)
	}
}

// node is one inode of the export. Directories hold an O_PATH
// descriptor in fd (the root its own, the others their directory's
// shared one, through dir); other nodes have fd -1 and are found again
// by dev and ino (see handle).
type node struct {
	fs.Inode
	ex       *export
	fd       int
	dir      *dirRef
	dev, ino uint64
}

var (
	_ fs.NodeLookuper       = (*node)(nil)
	_ fs.NodeGetattrer      = (*node)(nil)
	_ fs.NodeSetattrer      = (*node)(nil)
	_ fs.NodeOpener         = (*node)(nil)
	_ fs.NodeCreater        = (*node)(nil)
	_ fs.NodeMkdirer        = (*node)(nil)
	_ fs.NodeMknoder        = (*node)(nil)
	_ fs.NodeSymlinker      = (*node)(nil)
	_ fs.NodeLinker         = (*node)(nil)
	_ fs.NodeReadlinker     = (*node)(nil)
	_ fs.NodeUnlinker       = (*node)(nil)
	_ fs.NodeRmdirer        = (*node)(nil)
	_ fs.NodeRenamer        = (*node)(nil)
	_ fs.NodeOpendirHandler = (*node)(nil)
	_ fs.NodeStatfser       = (*node)(nil)
	_ fs.NodeGetxattrer     = (*node)(nil)
	_ fs.NodeSetxattrer     = (*node)(nil)
	_ fs.NodeRemovexattrer  = (*node)(nil)
	_ fs.NodeListxattrer    = (*node)(nil)
	_ fs.NodeOnForgetter    = (*node)(nil)
	_ fs.NodeIoctler        = (*node)(nil)
	_ fs.NodeStatxer        = (*node)(nil)
)

// Ioctl is refused on every inode, before go-fuse would hand it to an
// open handle: its directory stream passes any command to the host's
// descriptor (FIFREEZE, run by the root daemon, would freeze the host's
// file system; FS_IOC_SETFLAGS would make a host directory immutable).
func (n *node) Ioctl(ctx context.Context, f fs.FileHandle, cmd uint32, arg uint64, input, output []byte) (int32, syscall.Errno) {
	return 0, syscall.ENOTTY
}

// Statx is not offered (the client falls back to GETATTR): go-fuse would
// otherwise answer it from an open file's descriptor with the host's
// attributes, past the id mapping that Getattr applies.
func (n *node) Statx(ctx context.Context, f fs.FileHandle, flags, mask uint32, out *fuse.StatxOut) syscall.Errno {
	return syscall.ENOSYS
}

// OnForget lets go of the directory's descriptor once the client forgot
// the inode.
func (n *node) OnForget() {
	if n.dir != nil {
		n.fd = -1
		n.dir.release()
	}
}

// handle returns an O_PATH descriptor of the node's inode and a function
// to call when done with it.
func (n *node) handle() (int, func(), syscall.Errno) {
	if n.fd >= 0 {
		return n.fd, func() {}, 0
	}
	name, parent := n.Parent()
	if parent == nil {
		return -1, nil, syscall.ESTALE
	}
	p, ok := parent.Operations().(*node)
	if !ok || p.fd < 0 {
		return -1, nil, syscall.ESTALE
	}
	fd, e := p.openChild(name)
	if e != 0 {
		if e == syscall.ENOENT {
			e = syscall.ESTALE
		}
		return -1, nil, e
	}
	var st unix.Stat_t
	if err := unix.Fstatat(fd, "", &st, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil || st.Dev != n.dev || st.Ino != n.ino {
		// Renamed or replaced behind the client's back.
		unix.Close(fd)
		return -1, nil, syscall.ESTALE
	}
	return fd, func() { unix.Close(fd) }, 0
}

// handleFor is handle, but an open file's own descriptor when the client
// names one: an unlinked file that is still open has no name to be found
// by.
func (n *node) handleFor(f fs.FileHandle) (int, func(), syscall.Errno) {
	if of, ok := f.(*file); ok {
		return of.fd, func() {}, 0
	}
	return n.handle()
}

// procPath names the inode of descriptor fd through /proc/self/fd:
// opening it, or passing it to a path-taking call that follows the last
// component, reaches exactly that inode.
func procPath(fd int) string { return "/proc/self/fd/" + strconv.Itoa(fd) }

// checkName refuses names that are not a single directory entry (EINVAL)
// and names longer than NAME_MAX bytes (ENAMETOOLONG, as the host's
// calls and the client's own file systems answer).
func checkName(name string) syscall.Errno {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
		return syscall.EINVAL
	}
	if len(name) > unix.NAME_MAX {
		return syscall.ENAMETOOLONG
	}
	return 0
}

func (n *node) writable() syscall.Errno {
	if n.ex.opts.ReadOnly {
		return syscall.EROFS
	}
	return 0
}

// fstat stats the inode of descriptor fd, never following a symlink.
func fstat(fd int) (unix.Stat_t, syscall.Errno) {
	var st unix.Stat_t
	err := unix.Fstatat(fd, "", &st, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW)
	return st, fs.ToErrno(err)
}

func (n *node) stat() (unix.Stat_t, syscall.Errno) {
	var st unix.Stat_t
	fd, done, e := n.handle()
	if e != 0 {
		return st, e
	}
	defer done()
	if err := unix.Fstatat(fd, "", &st, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return st, fs.ToErrno(err)
	}
	n.ex.overlay(fd, &st)
	return st, 0
}

// ino makes inode numbers unique across the file systems mounted below
// the export, as go-fuse's loopback does.
func (ex *export) ino(st *unix.Stat_t) uint64 {
	swap := func(x uint64) uint64 { return x<<32 | x>>32 }
	return (swap(st.Dev) ^ swap(ex.rootDev)) ^ st.Ino
}

func (ex *export) fillAttr(st *unix.Stat_t, a *fuse.Attr) {
	a.Ino = ex.ino(st)
	a.Size = uint64(st.Size)
	a.Blocks = uint64(st.Blocks)
	a.Atime, a.Atimensec = uint64(st.Atim.Sec), uint32(st.Atim.Nsec)
	a.Mtime, a.Mtimensec = uint64(st.Mtim.Sec), uint32(st.Mtim.Nsec)
	a.Ctime, a.Ctimensec = uint64(st.Ctim.Sec), uint32(st.Ctim.Nsec)
	a.Mode = st.Mode
	a.Nlink = uint32(st.Nlink)
	a.Uid = toClient(ex.opts.UIDMap, st.Uid)
	a.Gid = toClient(ex.opts.GIDMap, st.Gid)
	a.Rdev = uint32(st.Rdev)
	a.Blksize = uint32(st.Blksize)
}

const overflowID = 65534

func toClient(m []IDMap, id uint32) uint32 {
	if len(m) == 0 {
		return id
	}
	for _, e := range m {
		if id >= e.Host && id-e.Host < e.Size {
			return e.Client + (id - e.Host)
		}
	}
	return overflowID
}

func toHost(m []IDMap, id uint32) (uint32, bool) {
	if len(m) == 0 {
		return id, true
	}
	for _, e := range m {
		if id >= e.Client && id-e.Client < e.Size {
			return e.Host + (id - e.Client), true
		}
	}
	return 0, false
}

// newChild wraps fd (an O_PATH descriptor of name's inode) as a child
// inode and fills out. The descriptor is consumed.
func (n *node) newChild(ctx context.Context, fd int, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	var st unix.Stat_t
	if err := unix.Fstatat(fd, "", &st, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
		unix.Close(fd)
		return nil, fs.ToErrno(err)
	}
	n.ex.overlay(fd, &st)
	child := &node{ex: n.ex, fd: -1, dev: st.Dev, ino: st.Ino}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		child.dir = n.ex.holdDir(fd, &st)
		child.fd = child.dir.d.fd
		// If go-fuse drops this node for one it already has, nothing
		// tells us but the garbage collector.
		runtime.AddCleanup(child, (*dirRef).release, child.dir)
	} else {
		unix.Close(fd)
	}
	in := n.NewInode(ctx, child, fs.StableAttr{Mode: st.Mode & unix.S_IFMT, Ino: n.ex.ino(&st)})
	n.ex.fillAttr(&st, &out.Attr)
	return in, 0
}

// openChild opens name below n as an O_PATH descriptor without following
// a symlink.
func (n *node) openChild(name string) (int, syscall.Errno) {
	fd, err := unix.Openat(n.fd, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	return fd, fs.ToErrno(err)
}

// Lookup finds a directory entry.
func (n *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if e := checkName(name); e != 0 {
		return nil, e
	}
	fd, e := n.openChild(name)
	if e != 0 {
		return nil, e
	}
	return n.newChild(ctx, fd, out)
}

// Getattr stats the inode.
func (n *node) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	fd, done, e := n.handleFor(f)
	if e != 0 {
		return e
	}
	defer done()
	st, e := fstat(fd)
	if e != 0 {
		return e
	}
	n.ex.overlay(fd, &st)
	n.ex.fillAttr(&st, &out.Attr)
	return 0
}

// owner returns the host ids a new inode should get, from the caller.
func (n *node) owner(ctx context.Context) (uid, gid int, e syscall.Errno) {
	if n.ex.opts.Squash {
		return -1, -1, 0
	}
	c, ok := fuse.FromContext(ctx)
	if !ok {
		return -1, -1, 0
	}
	u, uok := toHost(n.ex.opts.UIDMap, c.Uid)
	g, gok := toHost(n.ex.opts.GIDMap, c.Gid)
	if !uok || !gok {
		return 0, 0, syscall.EPERM
	}
	// In a set-group-ID directory the kernel already gave the new inode
	// the directory's group.
	if st, e := n.stat(); e == 0 && st.Mode&unix.S_ISGID != 0 {
		return int(u), -1, 0
	}
	return int(u), int(g), 0
}

// chownNew gives a just-created entry its owner; on failure the entry is
// removed again so that the client never sees a root-owned file.
func (n *node) chownNew(ctx context.Context, name string, fd int, dir bool) syscall.Errno {
	uid, gid, e := n.owner(ctx)
	if e == 0 && (uid >= 0 || gid >= 0) {
		e = fs.ToErrno(unix.Fchownat(fd, "", uid, gid, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW))
	}
	if e != 0 {
		flags := 0
		if dir {
			flags = unix.AT_REMOVEDIR
		}
		unix.Unlinkat(n.fd, name, flags)
	}
	return e
}

// Setattr changes mode, owner, size and times.
func (n *node) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if e := n.writable(); e != 0 {
		return e
	}
	fd, done, e := n.handleFor(f)
	if e != 0 {
		return e
	}
	defer done()
	st, e := fstat(fd)
	if e != 0 {
		return e
	}
	m, mapped := n.ex.overlay(fd, &st)
	special := mapped && m.special()
	if mode, ok := in.GetMode(); ok {
		switch {
		case st.Mode&unix.S_IFMT == unix.S_IFLNK:
			return syscall.EOPNOTSUPP
		case special:
			m.mode = m.mode&unix.S_IFMT | mode&07777
			if e := n.ex.writeMapping(fd, m); e != 0 {
				return e
			}
		case n.ex.opts.Mapped && st.Mode&unix.S_IFMT == unix.S_IFREG:
			// Set-id bits go to the mapping, the rest to the file.
			if err := unix.Chmod(procPath(fd), mode&07777&^setID); err != nil {
				return fs.ToErrno(err)
			}
			e := syscall.Errno(0)
			if mode&setID != 0 {
				e = n.ex.writeMapping(fd, mapping{mode: unix.S_IFREG | mode&07777, uid: st.Uid, gid: st.Gid})
			} else if mapped {
				e = n.ex.removeMapping(fd)
			}
			if e != 0 {
				return e
			}
		default:
			if err := unix.Chmod(procPath(fd), mode&07777); err != nil {
				return fs.ToErrno(err)
			}
		}
	}
	uid32, uok := in.GetUID()
	gid32, gok := in.GetGID()
	if (uok || gok) && !n.ex.opts.Squash {
		uid, gid := -1, -1
		if uok {
			h, ok := toHost(n.ex.opts.UIDMap, uid32)
			if !ok {
				return syscall.EPERM
			}
			uid = int(h)
		}
		if gok {
			h, ok := toHost(n.ex.opts.GIDMap, gid32)
			if !ok {
				return syscall.EPERM
			}
			gid = int(h)
		}
		if special {
			// The host file stays the daemon's.
			if uid >= 0 {
				m.uid = uint32(uid)
			}
			if gid >= 0 {
				m.gid = uint32(gid)
			}
			if e := n.ex.writeMapping(fd, m); e != 0 {
				return e
			}
		} else if err := unix.Fchownat(fd, "", uid, gid, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fs.ToErrno(err)
		}
	}
	if size, ok := in.GetSize(); ok {
		if st.Mode&unix.S_IFMT != unix.S_IFREG {
			return syscall.EINVAL
		}
		wfd, err := unix.Open(procPath(fd), unix.O_WRONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fs.ToErrno(err)
		}
		if e := n.ex.killSetID(wfd, unix.O_WRONLY); e != 0 {
			unix.Close(wfd)
			return e
		}
		err = unix.Ftruncate(wfd, int64(size))
		unix.Close(wfd)
		if err != nil {
			return fs.ToErrno(err)
		}
	}
	mtime, mok := in.GetMTime()
	atime, aok := in.GetATime()
	if mok || aok {
		ts := []unix.Timespec{{Nsec: unix.UTIME_OMIT}, {Nsec: unix.UTIME_OMIT}}
		if aok {
			ts[0] = timespec(atime)
		}
		if mok {
			ts[1] = timespec(mtime)
		}
		if err := unix.UtimesNanoAt(fd, "", ts, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fs.ToErrno(err)
		}
	}
	return n.Getattr(ctx, f, out)
}

func timespec(t time.Time) unix.Timespec { return unix.NsecToTimespec(t.UnixNano()) }

// reopen opens the node's inode with flags through /proc/self/fd.
func (n *node) reopen(flags int) (int, syscall.Errno) {
	pfd, done, e := n.handle()
	if e != 0 {
		return -1, e
	}
	defer done()
	fd, err := unix.Open(procPath(pfd), flags|unix.O_CLOEXEC, 0)
	return fd, fs.ToErrno(err)
}

// openFlags keeps the flags a client may ask for when opening. O_NOFOLLOW
// goes too: reopening through /proc follows the magic link by design, and
// Create adds it for the name it creates.
func (n *node) openFlags(flags uint32) (int, syscall.Errno) {
	f := int(flags) &^ (unix.O_CREAT | unix.O_EXCL | unix.O_NOCTTY | unix.O_PATH | unix.O_TMPFILE | unix.O_NOFOLLOW)
	if f&unix.O_ACCMODE != unix.O_RDONLY || f&unix.O_TRUNC != 0 {
		if e := n.writable(); e != 0 {
			return 0, e
		}
	}
	return f, 0
}

// Open opens a regular file.
func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	st, e := n.stat()
	if e != 0 {
		return nil, 0, e
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		// FIFOs and sockets are the client's business; devices are never
		// opened (see the package comment), nor are the files that stand
		// for the nodes of a mapped export.
		return nil, 0, syscall.EACCES
	}
	f, e := n.openFlags(flags)
	if e != 0 {
		return nil, 0, e
	}
	fd, e := n.reopen(f)
	if e != 0 {
		return nil, 0, e
	}
	if e := n.ex.killSetID(fd, f); e != 0 {
		unix.Close(fd)
		return nil, 0, e
	}
	return newFile(fd), n.ex.fopenFlags(f, fd), 0
}

// OpendirHandle opens a directory for reading.
func (n *node) OpendirHandle(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	fd, e := n.reopen(unix.O_RDONLY | unix.O_DIRECTORY)
	if e != 0 {
		return nil, 0, e
	}
	ds, e := fs.NewLoopbackDirStreamFd(fd)
	if e != 0 {
		unix.Close(fd)
		return nil, 0, e
	}
	if n.ex.opts.Mapped {
		pfd, done, e := n.handle()
		if e != 0 {
			ds.Close()
			return nil, 0, e
		}
		dup, err := unix.FcntlInt(uintptr(pfd), unix.F_DUPFD_CLOEXEC, 0)
		done()
		if err != nil {
			ds.Close()
			return nil, 0, fs.ToErrno(err)
		}
		return &mappedDir{DirStream: ds, ex: n.ex, fd: dup}, 0, 0
	}
	return ds, 0, 0
}

// Create makes and opens a regular file.
func (n *node) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	if e := checkName(name); e != 0 {
		return nil, nil, 0, e
	}
	if e := n.writable(); e != 0 {
		return nil, nil, 0, e
	}
	f, e := n.openFlags(flags)
	if e != 0 {
		return nil, nil, 0, e
	}
	fd, err := unix.Openat(n.fd, name, f|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, n.ex.hostMode(mode&07777))
	if err == unix.EEXIST && flags&unix.O_EXCL == 0 {
		return n.createExisting(ctx, name, f, out)
	}
	if err != nil {
		return nil, nil, 0, fs.ToErrno(err)
	}
	if e := n.chownNew(ctx, name, fd, false); e != 0 {
		unix.Close(fd)
		return nil, nil, 0, e
	}
	if n.ex.opts.Mapped {
		if e := n.mapSetID(fd, mode); e != 0 {
			unix.Close(fd)
			unix.Unlinkat(n.fd, name, 0)
			return nil, nil, 0, e
		}
	}
	pathFd, err := unix.Open("/proc/self/fd/"+strconv.Itoa(fd), unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Close(fd)
		return nil, nil, 0, fs.ToErrno(err)
	}
	in, e := n.newChild(ctx, pathFd, out)
	if e != 0 {
		unix.Close(fd)
		return nil, nil, 0, e
	}
	return in, newFile(fd), n.ex.fopenFlags(f, -1), 0
}

// createExisting is Create of a name that exists (made on the host since
// the client looked it up, or a client that sends CREATE for an existing
// name): the file is opened as Open would open it, never a device or
// other special file, and its owner and mode stay as they are.
func (n *node) createExisting(ctx context.Context, name string, f int, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	pfd, e := n.openChild(name)
	if e != 0 {
		return nil, nil, 0, e
	}
	st, e := fstat(pfd)
	if e == 0 {
		n.ex.overlay(pfd, &st)
		if st.Mode&unix.S_IFMT != unix.S_IFREG {
			e = syscall.EACCES
		}
	}
	if e != 0 {
		unix.Close(pfd)
		return nil, nil, 0, e
	}
	fd, err := unix.Open(procPath(pfd), f|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Close(pfd)
		return nil, nil, 0, fs.ToErrno(err)
	}
	if e := n.ex.killSetID(fd, f); e != 0 {
		unix.Close(fd)
		unix.Close(pfd)
		return nil, nil, 0, e
	}
	in, e := n.newChild(ctx, pfd, out)
	if e != 0 {
		unix.Close(fd)
		return nil, nil, 0, e
	}
	return in, newFile(fd), n.ex.fopenFlags(f, fd), 0
}

// Mkdir makes a directory.
func (n *node) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if e := n.checkCreate(name); e != 0 {
		return nil, e
	}
	if err := unix.Mkdirat(n.fd, name, mode&07777); err != nil {
		return nil, fs.ToErrno(err)
	}
	return n.created(ctx, name, true, out)
}

// Mknod makes FIFOs, sockets and empty regular files; device nodes are
// refused with EPERM, except in a mapped export, which stores every
// special file as a plain one (see mapped.go).
func (n *node) Mknod(ctx context.Context, name string, mode, dev uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if e := n.checkCreate(name); e != 0 {
		return nil, e
	}
	switch mode & unix.S_IFMT {
	case unix.S_IFCHR, unix.S_IFBLK, unix.S_IFIFO, unix.S_IFSOCK:
		if n.ex.opts.Mapped {
			return n.mknodMapped(ctx, name, mode, dev, out)
		}
		if t := mode & unix.S_IFMT; t == unix.S_IFCHR || t == unix.S_IFBLK {
			return nil, syscall.EPERM
		}
	case unix.S_IFREG:
	default:
		return nil, syscall.EPERM
	}
	if err := unix.Mknodat(n.fd, name, n.ex.hostMode(mode), 0); err != nil {
		return nil, fs.ToErrno(err)
	}
	if n.ex.opts.Mapped && mode&setID != 0 {
		fd, e := n.openChild(name)
		if e == 0 {
			e = n.mapSetID(fd, mode)
			unix.Close(fd)
		}
		if e != 0 {
			unix.Unlinkat(n.fd, name, 0)
			return nil, e
		}
	}
	return n.created(ctx, name, false, out)
}

// Symlink makes a symbolic link; its target is only ever returned to the
// client, never followed here.
func (n *node) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if e := n.checkCreate(name); e != 0 {
		return nil, e
	}
	if target == "" || len(target) >= unix.PathMax || strings.ContainsRune(target, 0) {
		return nil, syscall.EINVAL
	}
	if err := unix.Symlinkat(target, n.fd, name); err != nil {
		return nil, fs.ToErrno(err)
	}
	return n.created(ctx, name, false, out)
}

func (n *node) checkCreate(name string) syscall.Errno {
	if e := checkName(name); e != 0 {
		return e
	}
	return n.writable()
}

// created finishes Mkdir, Mknod and Symlink: owner, then the new inode.
func (n *node) created(ctx context.Context, name string, dir bool, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	fd, e := n.openChild(name)
	if e != 0 {
		return nil, e
	}
	if e := n.chownNew(ctx, name, fd, dir); e != 0 {
		unix.Close(fd)
		return nil, e
	}
	return n.newChild(ctx, fd, out)
}

// Link makes a hard link to an inode of the same export.
func (n *node) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if e := n.checkCreate(name); e != 0 {
		return nil, e
	}
	t, ok := target.(*node)
	if !ok || t.ex != n.ex {
		return nil, syscall.EXDEV
	}
	// linkat with AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; the /proc
	// path works for a rootless daemon too and names the same inode.
	tfd, done, e := t.handle()
	if e != 0 {
		return nil, e
	}
	err := unix.Linkat(unix.AT_FDCWD, procPath(tfd), n.fd, name, unix.AT_SYMLINK_FOLLOW)
	done()
	if err != nil {
		return nil, fs.ToErrno(err)
	}
	fd, e := n.openChild(name)
	if e != 0 {
		return nil, e
	}
	return n.newChild(ctx, fd, out)
}

// Readlink returns a symlink's target.
func (n *node) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	fd, done, e := n.handle()
	if e != 0 {
		return nil, e
	}
	defer done()
	buf := make([]byte, unix.PathMax)
	k, err := unix.Readlinkat(fd, "", buf)
	if err != nil {
		return nil, fs.ToErrno(err)
	}
	return buf[:k], 0
}

// Unlink removes a non-directory entry.
func (n *node) Unlink(ctx context.Context, name string) syscall.Errno {
	if e := n.checkCreate(name); e != 0 {
		return e
	}
	return fs.ToErrno(unix.Unlinkat(n.fd, name, 0))
}

// Rmdir removes an empty directory.
func (n *node) Rmdir(ctx context.Context, name string) syscall.Errno {
	if e := n.checkCreate(name); e != 0 {
		return e
	}
	return fs.ToErrno(unix.Unlinkat(n.fd, name, unix.AT_REMOVEDIR))
}

// Rename moves an entry within the export (flags: RENAME_NOREPLACE,
// RENAME_EXCHANGE).
func (n *node) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	if e := n.checkCreate(name); e != 0 {
		return e
	}
	if e := checkName(newName); e != 0 {
		return e
	}
	np, ok := newParent.(*node)
	if !ok || np.ex != n.ex {
		return syscall.EXDEV
	}
	if flags&^(unix.RENAME_NOREPLACE|unix.RENAME_EXCHANGE) != 0 {
		return syscall.EINVAL
	}
	return fs.ToErrno(unix.Renameat2(n.fd, name, np.fd, newName, uint(flags)))
}

// Statfs reports the export's file system.
func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	fd, done, e := n.handle()
	if e != 0 {
		return e
	}
	defer done()
	var s unix.Statfs_t
	if err := unix.Fstatfs(fd, &s); err != nil {
		return fs.ToErrno(err)
	}
	out.Blocks, out.Bfree, out.Bavail = s.Blocks, s.Bfree, s.Bavail
	out.Files, out.Ffree = s.Files, s.Ffree
	out.Bsize, out.NameLen, out.Frsize = uint32(s.Bsize), uint32(s.Namelen), uint32(s.Frsize)
	return 0
}

// xattr runs fn with the path extended-attribute calls use: the inode
// through /proc, which the *xattr calls follow. Symlinks have no extended
// attributes here (following the /proc link of a symlink's descriptor is
// not something to rely on).
func (n *node) xattr(write bool, fn func(path string) error) syscall.Errno {
	if !n.ex.opts.Xattr {
		return syscall.EOPNOTSUPP
	}
	if write {
		if e := n.writable(); e != 0 {
			return e
		}
	}
	fd, done, e := n.handle()
	if e != 0 {
		return e
	}
	defer done()
	st, e := fstat(fd)
	if e != 0 {
		return e
	}
	if st.Mode&unix.S_IFMT == unix.S_IFLNK {
		return syscall.EOPNOTSUPP
	}
	return fs.ToErrno(fn(procPath(fd)))
}

// Getxattr reads an extended attribute. The mapping attributes (see
// mapped.go) are not there for the client.
func (n *node) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	if isMapAttr(attr) {
		if !n.ex.opts.Xattr {
			return 0, syscall.EOPNOTSUPP
		}
		return 0, syscall.ENODATA
	}
	var k int
	e := n.xattr(false, func(p string) (err error) {
		if n.ex.mapsCaps(attr) {
			// The client's own, else the host's.
			if k, err = unix.Getxattr(p, n.ex.capAttr(), dest); err != unix.ENODATA {
				return err
			}
		}
		k, err = unix.Getxattr(p, attr, dest)
		return err
	})
	return uint32(k), e
}

// Setxattr writes an extended attribute; the mapping attributes are the
// daemon's (EPERM).
func (n *node) Setxattr(ctx context.Context, attr string, data []byte, flags uint32) syscall.Errno {
	if isMapAttr(attr) {
		return syscall.EPERM
	}
	if n.ex.mapsCaps(attr) {
		attr = n.ex.capAttr()
	}
	return n.xattr(true, func(p string) error { return unix.Setxattr(p, attr, data, int(flags)) })
}

// Removexattr removes an extended attribute, not a mapping attribute.
func (n *node) Removexattr(ctx context.Context, attr string) syscall.Errno {
	if isMapAttr(attr) {
		return syscall.EPERM
	}
	return n.xattr(true, func(p string) error {
		if n.ex.mapsCaps(attr) {
			if err := unix.Removexattr(p, n.ex.capAttr()); err != unix.ENODATA {
				return err
			}
		}
		return unix.Removexattr(p, attr)
	})
}

// Listxattr lists extended attribute names, but the mapping attributes.
func (n *node) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	var k int
	e := n.xattr(false, func(p string) error {
		var list []byte
		for {
			size, err := unix.Listxattr(p, nil)
			if err != nil {
				return err
			}
			list = make([]byte, size)
			size, err = unix.Listxattr(p, list)
			if err == unix.ERANGE {
				continue // grew meanwhile
			}
			if err != nil {
				return err
			}
			list = list[:size]
			break
		}
		var kept []byte
		names := strings.SplitAfter(string(list), "\x00")
		for _, name := range names {
			if n.ex.opts.Mapped && name == n.ex.capAttr()+"\x00" && !slices.Contains(names, fileCaps+"\x00") {
				name = fileCaps + "\x00"
			}
			if name != "" && !isMapAttr(name) {
				kept = append(kept, name...)
			}
		}
		k = len(kept)
		if len(dest) == 0 {
			return nil // the size is asked for
		}
		if len(kept) > len(dest) {
			return unix.ERANGE
		}
		copy(dest, kept)
		return nil
	})
	return uint32(k), e
}

// file is an open regular file: go-fuse's descriptor-based loopback file
// without ioctl, which would hand the client's command and argument to
// the host kernel.
type file struct {
	*fs.LoopbackFile
	fd int // owned by LoopbackFile, valid until Release
}

func newFile(fd int) *file {
	return &file{LoopbackFile: fs.NewLoopbackFileFromOS(os.NewFile(uintptr(fd), "sharefs")), fd: fd}
}

// Ioctl is refused.
func (f *file) Ioctl(ctx context.Context, cmd uint32, arg uint64, input, output []byte) (int32, syscall.Errno) {
	return 0, syscall.ENOTTY
}

// OpenDescriptors reports how many inode descriptors the export holds
// (its root included), for leak checks.
func OpenDescriptors(root fs.InodeEmbedder) int64 {
	if n, ok := root.(*node); ok {
		return n.ex.open.Load() + 1
	}
	return 0
}
