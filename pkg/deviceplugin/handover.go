package deviceplugin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/loopdev"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
)

// The hand-over protocol runs over a SOCK_SEQPACKET unix socket, one JSON
// message per packet:
//
//	keeper -> plugin: {"id": ID, "owner": OWNER}
//	plugin -> keeper: {"devices": ["loopA", ...]} with SCM_RIGHTS: the
//	                  lease files then the claim files (Lease.Files),
//	                  or {"unknown": true}, or {"error": MESSAGE}
//	keeper -> plugin: {"ok": true} once it adopted the lease,
//	                  or {"error": MESSAGE}
//
// Once the files are sent the plugin drops its hold whatever the answer:
// the lease then lives exactly as long as the keeper holds the files, and
// goes stale (the next allocator call frees it) if the keeper refused it
// or died. The plugin never releases a lease it sent, so it cannot
// detach devices under a box that adopted them while the answer was
// lost. Before the send, a crash of either side leaves the lease with
// the plugin (or stale, if the plugin died); never lost, never doubled.

// handoverMsg is one message of the hand-over protocol.
type handoverMsg struct {
	ID      string   `json:"id,omitempty"`
	Owner   string   `json:"owner,omitempty"`
	Devices []string `json:"devices,omitempty"`
	Unknown bool     `json:"unknown,omitempty"`
	OK      bool     `json:"ok,omitempty"`
	Error   string   `json:"error,omitempty"`
}

// maxMsg bounds a message; 256 device names fit easily.
const maxMsg = 16 << 10

// maxSockets bounds how many plugin sockets a keeper asks.
const maxSockets = 64

// handoverTimeout bounds one exchange with one plugin.
const handoverTimeout = 10 * time.Second

// listenHandover listens on the plugin's hand-over socket, named after
// its pid so that plugins of several kubelets on one host can share an
// allocator directory.
func (p *Plugin) listenHandover() (*net.UnixListener, error) {
	if err := os.MkdirAll(p.opts.HandoverDir, 0o700); err != nil {
		return nil, fmt.Errorf("hand-over directory: %w", err)
	}
	path := filepath.Join(p.opts.HandoverDir, strconv.Itoa(os.Getpid())+".sock")
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("hand-over socket: %w", err)
	}
	p.removeStaleSockets()
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("hand-over socket: %w", err)
	}
	return l, nil
}

// serveHandover answers keepers until ctx is done or l is closed.
func (p *Plugin) serveHandover(ctx context.Context, l *net.UnixListener) {
	go func() { <-ctx.Done(); l.Close() }()
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
				p.log.Error("hand-over socket", "err", err)
			}
			return
		}
		go func() {
			defer c.Close()
			if err := p.handOver(c); err != nil {
				p.log.Warn("hand-over", "err", err)
			}
		}()
	}
}

// removeStaleSockets removes the hand-over sockets of plugins that died
// without cleaning up (kill -9, a node's crash): nobody accepts on them,
// and a keeper asks at most maxSockets sockets, so they must not pile up.
// A socket that cannot be judged (not refused) is left alone.
func (p *Plugin) removeStaleSockets() {
	socks, _ := filepath.Glob(filepath.Join(p.opts.HandoverDir, "*.sock"))
	for _, s := range socks {
		c, err := net.DialTimeout("unixpacket", s, time.Second)
		if err == nil {
			c.Close()
			continue
		}
		if errors.Is(err, syscall.ECONNREFUSED) {
			if err := os.Remove(s); err == nil {
				p.log.Info("removed a dead plugin's hand-over socket", "socket", s)
			}
		}
	}
}

// handOver serves one keeper's request.
func (p *Plugin) handOver(c *net.UnixConn) error {
	c.SetDeadline(time.Now().Add(handoverTimeout))
	req, _, err := readMsg(c, 0)
	if err != nil {
		return err
	}
	a := p.ledger.take(req.ID)
	if a == nil {
		return writeMsg(c, handoverMsg{Unknown: true}, nil)
	}
	names := a.devices
	if err := writeMsg(c, handoverMsg{Devices: names}, a.lease.Files()); err != nil {
		p.ledger.add(a)
		return fmt.Errorf("hand allocation %s to %q: %w", a.id, req.Owner, err)
	}
	a.lease.Close()
	ack, _, err := readMsg(c, 0)
	if err != nil || !ack.OK {
		if err == nil {
			err = errors.New(ack.Error)
		}
		return fmt.Errorf("%q did not adopt allocation %s (its lease goes stale): %w", req.Owner, a.id, err)
	}
	p.log.Info("handed over", "id", a.id, "owner", req.Owner, "devices", names)
	return nil
}

// writeMsg sends m with files as SCM_RIGHTS.
func writeMsg(c *net.UnixConn, m handoverMsg, files []*os.File) error {
	b, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("hand-over: encode: %w", err)
	}
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := c.WriteMsgUnix(b, oob, nil); err != nil {
		return fmt.Errorf("hand-over: send: %w", err)
	}
	return nil
}

// readMsg reads one message and at most maxFiles passed files. Files
// beyond that, or passed where none are expected, are closed and make
// it an error.
func readMsg(c *net.UnixConn, maxFiles int) (handoverMsg, []*os.File, error) {
	b := make([]byte, maxMsg)
	oob := make([]byte, unix.CmsgSpace(4*(maxFiles+1)))
	n, oobn, flags, _, err := c.ReadMsgUnix(b, oob)
	if err != nil {
		return handoverMsg{}, nil, fmt.Errorf("hand-over: receive: %w", err)
	}
	var files []*os.File
	if oobn > 0 {
		cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return handoverMsg{}, nil, fmt.Errorf("hand-over: control message: %w", err)
		}
		for _, cm := range cmsgs {
			fds, err := unix.ParseUnixRights(&cm)
			if err != nil {
				continue
			}
			for _, fd := range fds {
				files = append(files, os.NewFile(uintptr(fd), "handed-over"))
			}
		}
	}
	closeAll := func() {
		for _, f := range files {
			f.Close()
		}
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || len(files) > maxFiles {
		closeAll()
		return handoverMsg{}, nil, errors.New("hand-over: message or files truncated")
	}
	var m handoverMsg
	if err := json.Unmarshal(b[:n], &m); err != nil {
		closeAll()
		return handoverMsg{}, nil, fmt.Errorf("hand-over: bad message: %w", err)
	}
	return m, files, nil
}

// Adopt gets the lease of Kubernetes allocation want for owner (a
// container id): from the device plugin that holds it, through its
// hand-over socket in dir, or, if no plugin holds it (see the package
// documentation), by leasing the very devices it names. Either way the
// lease's devices are exactly want.Devices, or Adopt fails.
func Adopt(ctx context.Context, a *loopdev.Allocator, dir string, want oci.LoopLease, owner string) (*loopdev.Lease, error) {
	devs := make([]loopdev.Device, len(want.Devices))
	for i, n := range want.Devices {
		d, err := loopdev.ParseDevice(n)
		if err != nil {
			return nil, fmt.Errorf("allocation %s: %w", want.ID, err)
		}
		devs[i] = d
	}
	socks, _ := filepath.Glob(filepath.Join(dir, "*.sock"))
	if len(socks) > maxSockets {
		socks = socks[:maxSockets]
	}
	var errs []error
	for _, s := range socks {
		l, err := adoptFrom(ctx, a, s, want, devs, owner)
		if l != nil || err != nil && !errors.Is(err, errUnknown) {
			return l, err
		}
	}
	l, err := a.AcquireDevices(owner, devs)
	if err != nil {
		errs = append(errs, err)
		return nil, fmt.Errorf("loop devices %s of Kubernetes allocation %s: no device plugin holds them and they cannot be leased again: %w",
			strings.Join(want.Devices, " "), want.ID, errors.Join(errs...))
	}
	return l, nil
}

// errUnknown says a plugin does not hold the allocation (or is gone).
var errUnknown = errors.New("allocation unknown to this plugin")

// adoptFrom asks the plugin at sock for the allocation.
func adoptFrom(ctx context.Context, a *loopdev.Allocator, sock string, want oci.LoopLease, devs []loopdev.Device, owner string) (*loopdev.Lease, error) {
	var d net.Dialer
	dctx, cancel := context.WithTimeout(ctx, handoverTimeout)
	defer cancel()
	nc, err := d.DialContext(dctx, "unixpacket", sock)
	if err != nil {
		// A plugin that died leaves its socket behind.
		return nil, errUnknown
	}
	c := nc.(*net.UnixConn)
	defer c.Close()
	deadline, _ := dctx.Deadline()
	c.SetDeadline(deadline)
	if err := writeMsg(c, handoverMsg{ID: want.ID, Owner: owner}, nil); err != nil {
		return nil, errUnknown
	}
	m, files, err := readMsg(c, 2*len(devs))
	if err != nil {
		return nil, fmt.Errorf("adopt allocation %s from %s: %w", want.ID, sock, err)
	}
	if m.Unknown {
		return nil, errUnknown
	}
	refuse := func(err error) (*loopdev.Lease, error) {
		writeMsg(c, handoverMsg{Error: err.Error()}, nil)
		return nil, fmt.Errorf("adopt allocation %s: %w", want.ID, err)
	}
	if m.Error != "" {
		return nil, fmt.Errorf("adopt allocation %s: the device plugin says: %s", want.ID, m.Error)
	}
	if !slices.Equal(m.Devices, want.Devices) {
		for _, f := range files {
			f.Close()
		}
		return refuse(fmt.Errorf("the device plugin holds %v, the annotation names %v", m.Devices, want.Devices))
	}
	l, err := a.Adopt(owner, devs, files)
	if err != nil {
		return refuse(err)
	}
	// The plugin has let go already; the answer is only for its log.
	_ = writeMsg(c, handoverMsg{OK: true}, nil)
	return l, nil
}
