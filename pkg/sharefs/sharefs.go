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
	"fmt"
	"sync"
	"sync/atomic"
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
