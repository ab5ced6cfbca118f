// Package vmshare is the vhost-user-fs back end kiwi-sharefs runs for a
// VM: it serves one export (a sharefs tree) to QEMU's vhost-user-fs-pci
// device, decoding the guest's virtio-fs requests from the virtqueues
// (package vhostuser) and answering them through go-fuse's
// transport-neutral ProtocolServer.
package vmshare

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync/atomic"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/kiwi-shim/kiwi-shim/pkg/sharefs"
	"github.com/kiwi-shim/kiwi-shim/pkg/vhostuser"
)

// Queues of a virtio-fs device: the high-priority queue (FORGET) and one
// request queue. Linux (6.1 and later) sends every request on the first
// request queue, so more would sit idle; requests of that queue are
// still served in parallel (vhostuser.Config.MaxInflight).
const Queues = 2

// QueueSize is the ring size QEMU should use (queue-size=...): the
// largest QEMU allows, so that a 1 MiB write fits in one request.
const QueueSize = vhostuser.MaxQueueSize

// Export is one directory served to a guest.
type Export struct {
	// Tag is the virtio-fs tag the guest mounts.
	Tag string `json:"tag"`
	// Source is the host directory.
	Source string `json:"source"`
	// Socket is the vhost-user socket QEMU connects to.
	Socket string `json:"socket"`
	// Options confine and configure the tree.
	Options sharefs.Options `json:"options"`
}

// device adapts a ProtocolServer to the virtqueues.
type device struct {
	ps  *fuse.ProtocolServer
	log *slog.Logger
	// maxBytes bounds each direction of a chain (see chainLimit).
	maxBytes int
	// refused is set once a request was refused for its size: only the
	// first is a warning, so that a guest cannot fill the log with them.
	refused atomic.Bool
}

// chainLimit is the most a chain may carry in either direction for a
// server whose largest read or write is maxIO bytes: the data plus 128
// KiB for headers, names and an extended attribute's value (at most 64
// KiB on Linux). go-fuse sizes its reply to what the request asks for:
// a READ, GETXATTR, LISTXATTR or IOCTL names a size of up to 4 GiB, and
// when the guest's reply buffer is split over descriptors go-fuse
// allocates that much on the host before the handler runs; a payload
// that crosses descriptors (SETXATTR's value, a name) is copied into a
// buffer as long as the readable part of the chain. A descriptor can
// name gigabytes of guest memory, the same memory again in every
// descriptor, so without a bound a hostile guest had the daemon allocate
// and fill 4 GiB per request, 64 requests at once per queue. Linux never
// comes near it: it asks at most max_pages pages (MaxWrite over the
// host's page size: 256) per READ or READDIR and writes at most
// MaxWrite; a guest with pages larger than 4 KiB would ask more (no
// kernel kiwi-shim boots has them: Debian's amd64 and arm64 kernels use
// 4 KiB pages).
func chainLimit(maxIO int) int { return maxIO + 128<<10 }

// iovLen is the total length of bufs.
func iovLen(bufs [][]byte) int {
	n := 0
	for _, b := range bufs {
		n += len(b)
	}
	return n
}

// Handle serves one FUSE request. Requests without a reply (FORGET) are
// completed with length 0; a request the server cannot parse, or one
// larger than the device's bound either way (chainLimit), gets no reply
// bytes either, which the guest reports as an I/O error.
func (d *device) Handle(q int, c *vhostuser.Chain) int {
	if in, out := iovLen(c.Readable), iovLen(c.Writable); in > d.maxBytes || out > d.maxBytes {
		level := slog.LevelDebug
		if !d.refused.Swap(true) {
			level = slog.LevelWarn
		}
		d.log.Log(context.Background(), level, "request refused: larger than any FUSE request a Linux guest sends (later ones are logged at debug level)", "queue", q, "readable", in, "writable", out, "limit", d.maxBytes)
		return 0
	}
	n, st := d.ps.HandleRequest(c.Readable, c.Writable)
	if n == 0 && st != fuse.OK {
		d.log.Debug("request without reply", "queue", q, "status", st)
	}
	return n
}

// quickOps are the FUSE requests answered with a few system calls on
// metadata the host has cached: no flush to disk, no directory listing,
// nothing that frees a file's blocks (UNLINK and RENAME can).
var quickOps = map[uint32]bool{
	opLookup: true, opForget: true, opGetattr: true, opSetattr: true, opReadlink: true, opSymlink: true, opMknod: true, opMkdir: true,
	opLink: true, opOpen: true, opRead: true, opWrite: true, opStatfs: true, opRelease: true,
	opSetxattr: true, opGetxattr: true, opListxattr: true, opRemovexattr: true, opFlush: true, opOpendir: true, opReleasedir: true,
	opAccess: true, opCreate: true, opBatchForget: true,
}

// quickIO is the largest READ or WRITE Quick accepts.
const quickIO = 64 << 10

// Quick reports whether the chain is a request answered at once (see
// vhostuser.Quicker): a metadata request from quickOps, a READ or WRITE
// of at most 64 KiB, or a SETATTR that does not change the size.
// Anything it cannot read is not quick.
func (d *device) Quick(q int, c *vhostuser.Chain) bool {
	var in [60]byte // fuse_in_header, then the first 20 bytes of the body
	n := 0
	for _, b := range c.Readable {
		n += copy(in[n:], b)
		if n == len(in) {
			break
		}
	}
	if n < 40 {
		return false
	}
	op := binary.LittleEndian.Uint32(in[4:])
	switch {
	case !quickOps[op]:
		return false
	case op == opRead || op == opWrite: // fh, offset, size
		return n >= 60 && binary.LittleEndian.Uint32(in[56:]) <= quickIO
	case op == opSetattr: // valid
		return n >= 44 && binary.LittleEndian.Uint32(in[40:])&fuse.FATTR_SIZE == 0
	}
	return true
}

// NewProtocolServer builds the FUSE protocol server for an export; with
// trace it logs every request and reply (at debug level).
func NewProtocolServer(e Export, log *slog.Logger, trace bool) (*fuse.ProtocolServer, error) {
	root, err := sharefs.Root(e.Source, e.Options)
	if err != nil {
		return nil, err
	}
	opts, err := sharefs.FSOptions(e.Options)
	if err != nil {
		return nil, err
	}
	// go-fuse's messages (the node tree's and the protocol server's, such
	// as "Unimplemented opcode SYNCFS", which the guest takes for success)
	// are debug output.
	opts.Logger = slog.NewLogLogger(log.Handler(), slog.LevelDebug)
	opts.MountOptions.Logger = opts.Logger
	opts.MountOptions.Debug = trace
	// The guest is not trusted, and go-fuse (v2.12) panics while holding
	// an inode's lock when a FORGET drops more lookups than the inode
	// has, which wedges every later request on it. So FORGET is ignored
	// and the guest's inodes stay known for the export's lifetime: only
	// directories hold a descriptor, so this costs a little memory per
	// inode and a descriptor per directory the guest visited.
	opts.RememberInodes = true
	// A handler that panics on guest input answers EIO; the daemon lives.
	opts.PanicHandler = func(p any) fuse.Status {
		log.Error("FUSE handler panicked", "panic", fmt.Sprint(p))
		return fuse.EIO
	}
	return fuse.NewProtocolServer(sharefs.KillPrivOnWrite(fs.NewNodeFS(root, opts)), &opts.MountOptions), nil
}

// newDevice builds the device that serves e's requests.
func newDevice(e Export, log *slog.Logger, trace bool) (*device, error) {
	opts, err := sharefs.FSOptions(e.Options)
	if err != nil {
		return nil, err
	}
	ps, err := NewProtocolServer(e, log, trace)
	if err != nil {
		return nil, err
	}
	return &device{ps: ps, log: log, maxBytes: chainLimit(opts.MaxWrite)}, nil
}

// Listen creates the export's socket; QEMU connects to it once started.
func Listen(e Export) (*net.UnixListener, error) {
	os.Remove(e.Socket)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: e.Socket, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("export %s: %w", e.Tag, err)
	}
	if err := os.Chmod(e.Socket, 0o600); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// Serve accepts QEMU's connection on l and serves the export until QEMU
// closes it (the guest powered off, or QEMU exited), or ctx ends. The
// listener is closed on return. log should name the export (its tag).
func Serve(ctx context.Context, l *net.UnixListener, e Export, log *slog.Logger, trace bool) error {
	defer l.Close()
	dev, err := newDevice(e, log, trace)
	if err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { l.Close() })
	conn, err := l.AcceptUnix()
	stop()
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("export %s: accept: %w", e.Tag, err)
	}
	defer conn.Close()
	// One front end per export: nobody else may connect later.
	l.Close()
	log.Info("front end connected", "source", e.Source)
	b := vhostuser.NewBackend(conn, dev, vhostuser.Config{Queues: Queues, Log: log, Trace: trace})
	err = b.Serve(ctx)
	if err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("export %s: %w", e.Tag, err)
	}
	log.Info("front end gone")
	return err
}
