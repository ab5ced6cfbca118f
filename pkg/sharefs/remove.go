package sharefs

import (
	"context"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"golang.org/x/sys/unix"
)

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
