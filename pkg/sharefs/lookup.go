package sharefs

import (
	"context"
	"runtime"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

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
