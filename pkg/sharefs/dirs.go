package sharefs

import (
	"github.com/hanwen/go-fuse/v2/fs"
	"golang.org/x/sys/unix"
)

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

// OpenDescriptors reports how many inode descriptors the export holds
// (its root included), for leak checks.
func OpenDescriptors(root fs.InodeEmbedder) int64 {
	if n, ok := root.(*node); ok {
		return n.ex.open.Load() + 1
	}
	return 0
}
