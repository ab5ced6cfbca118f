package sharefs

import (
	"context"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

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
