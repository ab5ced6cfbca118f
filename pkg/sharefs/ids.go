package sharefs

import (
	"context"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

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
// removed again so that the client never sees a root-owned file. The
// kernel clears a file's set-id bits when its owner changes, so a file the
// client made with set-id bits in mode (a regular file; the client's
// kernel already dropped the set-group-ID bit that its caller may not
// have) gets mode again afterwards: on a local disk, open(O_CREAT, 04755)
// makes a set-user-ID file of the caller's.
func (n *node) chownNew(ctx context.Context, name string, fd int, dir bool, mode uint32) syscall.Errno {
	uid, gid, e := n.owner(ctx)
	if e == 0 && (uid >= 0 || gid >= 0) {
		e = fs.ToErrno(unix.Fchownat(fd, "", uid, gid, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW))
		if hm := n.ex.hostMode(mode); e == 0 && !dir && hm&setID != 0 {
			e = fs.ToErrno(unix.Chmod(procPath(fd), hm&07777))
		}
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
