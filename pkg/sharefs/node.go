package sharefs

import (
	"context"
	"strconv"
	"strings"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

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
