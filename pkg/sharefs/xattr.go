package sharefs

import (
	"context"
	"slices"
	"strings"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"golang.org/x/sys/unix"
)

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
