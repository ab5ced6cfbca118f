package sharefs

import (
	"context"
	"os"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

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
