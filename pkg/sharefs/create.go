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
	if e := n.chownNew(ctx, name, fd, false, mode); e != 0 {
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
	return n.created(ctx, name, true, 0, out)
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
	return n.created(ctx, name, false, mode, out)
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
	return n.created(ctx, name, false, 0, out)
}

func (n *node) checkCreate(name string) syscall.Errno {
	if e := checkName(name); e != 0 {
		return e
	}
	return n.writable()
}

// created finishes Mkdir, Mknod and Symlink: owner, then the new inode;
// mode is the file mode the client asked for (0 for a directory or link).
func (n *node) created(ctx context.Context, name string, dir bool, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	fd, e := n.openChild(name)
	if e != 0 {
		return nil, e
	}
	if e := n.chownNew(ctx, name, fd, dir, mode); e != 0 {
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
