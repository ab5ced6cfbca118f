// Package deviceplugin makes the host's loop capacity a Kubernetes
// resource: a device plugin (the kubelet's device plugin API v1beta1,
// gRPC over unix sockets) that advertises kiwi-shim.io/loop and answers
// each allocation with a lease from pkg/loopdev, the allocator every
// container-mode box and `kiwi-shim loop acquire` on the host use.
//
// # From allocation to box
//
// The kubelet calls Allocate with N of the advertised device ids (they
// are slots: the kubelet counts with them, the allocator picks the
// devices). The plugin leases N devices under a fresh random allocation
// id, holds the lease, and answers with the annotation
// "io.kiwi-shim.loop.lease=ID:loopA loopB" (oci.AnnotationLoopLease). The
// kubelet puts it into the container's CRI config, containerd into the
// OCI spec, and kiwi-shim's create starts the container's keeper with it.
// The keeper adopts exactly that lease (Adopt): it connects to the
// plugin's hand-over socket under the allocator directory, names the id,
// and receives the lease's locked files over SCM_RIGHTS; from then on the
// keeper holds the lease and releases it when the container's init exits,
// as it does for a lease of its own. The devices the box gets are the
// devices the plugin leased, and the keeper checks that they are the ones
// the annotation names.
//
// # Crashes and leases nobody adopts
//
// A lease is an OFD lock held by a live process (see pkg/loopdev), so a
// crash frees it without help: if the plugin dies, the leases it still
// holds (allocated, not yet adopted) go stale and the next allocator call
// on the host detaches and frees them; if a keeper dies, its lease goes
// stale the same way. A keeper that finds no plugin holding its
// allocation (the plugin restarted, or reclaimed it, or the container is
// a restart of one whose keeper already released) leases the very
// devices the annotation names, if they are free (AcquireDevices), and
// fails with a clear error if they are not: the box never runs on devices
// other than its allocation's.
//
// Decision on allocations that no container adopts (a pod deleted before
// its container started, a pod of another runtime class, a container that
// failed before create): the plugin releases such a lease when the
// kubelet hands one of its slots to a new allocation (the kubelet only
// reuses a slot after the pod that had it is gone), and in any case
// after Options.AdoptTimeout (default 10 minutes). A bound rather than
// asking the kubelet's pod-resources API because it needs nothing but
// the device plugin socket, is right even when the kubelet is down or of
// another version, and errs on the safe side: a container that starts
// after the bound still gets its devices through the fallback above
// whenever they are free. The price is that capacity a dead pod had is
// held for up to the bound by a lease no box uses.
package deviceplugin

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/fsnotify/fsnotify"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/kiwi-shim/kiwi-shim/pkg/loopdev"
)

// ResourceName is the extended resource the plugin advertises.
const ResourceName = "kiwi-shim.io/loop"

// DefaultEndpoint is the file name of the plugin's socket in the
// kubelet's device plugin directory.
const DefaultEndpoint = "kiwi-shim-loop.sock"

// Defaults of Options.
const (
	DefaultAdoptTimeout    = 10 * time.Minute
	DefaultAllocateTimeout = 30 * time.Second
)

// Options configure a Plugin.
type Options struct {
	// Alloc is the host's loop allocator.
	Alloc *loopdev.Allocator
	// KubeletSocket is the kubelet's registration socket; its directory
	// is where the plugin's own socket goes. Empty means
	// /var/lib/kubelet/device-plugins/kubelet.sock.
	KubeletSocket string
	// Endpoint is the file name of the plugin's socket; empty means
	// DefaultEndpoint.
	Endpoint string
	// Devices is the number of devices advertised; 0 means the
	// allocator's capacity. Two kubelets on one host that share one
	// allocator each advertise their part of it.
	Devices int
	// HandoverDir is where the hand-over socket for keepers goes; empty
	// means HandoverDir(Alloc.Dir()).
	HandoverDir string
	// AdoptTimeout bounds how long an allocation's lease is held for a
	// container that does not adopt it; 0 means DefaultAdoptTimeout.
	AdoptTimeout time.Duration
	// AllocateTimeout bounds how long Allocate waits for free devices
	// (leases of terminating pods or of boxes outside Kubernetes); 0
	// means DefaultAllocateTimeout.
	AllocateTimeout time.Duration
	// Logger receives progress and errors; nil discards them.
	Logger *slog.Logger
}

// HandoverDir is the directory of the plugins' hand-over sockets under
// the allocator directory loopDir. It is beside the leases on purpose:
// keepers and plugins that share one allocator find each other there,
// and the DaemonSet mounts that one host directory.
func HandoverDir(loopDir string) string { return filepath.Join(loopDir, "kubernetes") }

// Plugin is one running device plugin.
type Plugin struct {
	opts   Options
	dir    string // the kubelet's device plugin directory
	log    *slog.Logger
	ledger *ledger
	now    func() time.Time
}

// New checks opts and returns a Plugin; Run serves it.
func New(opts Options) (*Plugin, error) {
	if opts.Alloc == nil {
		return nil, errors.New("device plugin: no loop allocator")
	}
	if opts.KubeletSocket == "" {
		opts.KubeletSocket = pluginapi.KubeletSocket
	}
	if !filepath.IsAbs(opts.KubeletSocket) {
		return nil, fmt.Errorf("kubelet socket %q: want an absolute path", opts.KubeletSocket)
	}
	if opts.Endpoint == "" {
		opts.Endpoint = DefaultEndpoint
	}
	if opts.Endpoint != filepath.Base(opts.Endpoint) || opts.Endpoint == filepath.Base(opts.KubeletSocket) {
		return nil, fmt.Errorf("endpoint %q: want a file name other than the kubelet's", opts.Endpoint)
	}
	if opts.Devices == 0 {
		opts.Devices = opts.Alloc.Capacity()
	}
	if opts.Devices < 0 || opts.Devices > opts.Alloc.Capacity() {
		return nil, fmt.Errorf("device count %d: want 1 to the loop capacity %d", opts.Devices, opts.Alloc.Capacity())
	}
	if opts.HandoverDir == "" {
		opts.HandoverDir = HandoverDir(opts.Alloc.Dir())
	}
	if opts.AdoptTimeout <= 0 {
		opts.AdoptTimeout = DefaultAdoptTimeout
	}
	if opts.AllocateTimeout <= 0 {
		opts.AllocateTimeout = DefaultAllocateTimeout
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Plugin{
		opts: opts, dir: filepath.Dir(opts.KubeletSocket), log: log,
		ledger: newLedger(), now: time.Now,
	}, nil
}

// SocketPath is the plugin's own socket, where the kubelet calls it.
func (p *Plugin) SocketPath() string { return filepath.Join(p.dir, p.opts.Endpoint) }

// Run serves the plugin until ctx is cancelled: it listens on its
// socket, registers with the kubelet, and starts over whenever the
// kubelet restarts (it then recreates its registration socket and
// removes every plugin's socket). It also serves the hand-over socket
// and reclaims leases nobody adopted. On return every lease it still
// holds is released and its sockets are gone.
func (p *Plugin) Run(ctx context.Context) error {
	h, err := p.listenHandover()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{}, 2)
	go func() { p.serveHandover(ctx, h); done <- struct{}{} }()
	go func() { p.reclaimLoop(ctx); done <- struct{}{} }()
	defer func() {
		cancel()
		h.Close()
		<-done
		<-done
		for _, e := range p.ledger.takeAll() {
			p.release(e, "the plugin stops")
		}
	}()
	for {
		err := p.serveOnce(ctx)
		if ctx.Err() != nil {
			return nil
		}
		p.log.Warn("device plugin starts over", "err", err)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Second):
		}
	}
}

// serveOnce serves the plugin's socket and registers it; it returns when
// the kubelet restarted or the socket vanished (an error saying which),
// or when ctx is done.
func (p *Plugin) serveOnce(ctx context.Context) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watch %s: %w", p.dir, err)
	}
	defer w.Close()
	// Watch before listening and registering: a kubelet restart in
	// between must not go unnoticed.
	if err := w.Add(p.dir); err != nil {
		return fmt.Errorf("watch %s: %w", p.dir, err)
	}
	sock := p.SocketPath()
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove old socket: %w", err)
	}
	lis, err := net.Listen("unix", sock)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", sock, err)
	}
	srv := grpc.NewServer()
	pluginapi.RegisterDevicePluginServer(srv, &service{p: p})
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	defer func() {
		// Stop closes the listener, which removes the socket.
		srv.Stop()
		<-served
	}()
	kubelet, err := os.Stat(p.opts.KubeletSocket)
	if err != nil {
		return p.waitKubelet(ctx, w, fmt.Errorf("kubelet socket: %w", err))
	}
	ours, err := os.Stat(sock)
	if err != nil {
		return fmt.Errorf("own socket: %w", err)
	}
	if err := p.register(ctx); err != nil {
		return p.waitKubelet(ctx, w, err)
	}
	p.log.Info("registered with the kubelet", "resource", ResourceName, "devices", p.opts.Devices, "socket", sock)
	check := time.NewTicker(5 * time.Second)
	defer check.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-served:
			served <- err // for the deferred wait
			return fmt.Errorf("gRPC server stopped: %w", err)
		case ev, ok := <-w.Events:
			if !ok {
				return errors.New("watch ended")
			}
			switch {
			case ev.Name == p.opts.KubeletSocket && ev.Has(fsnotify.Create):
				return errors.New("the kubelet restarted")
			case ev.Name == sock && (ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename)):
				return errors.New("the plugin's socket was removed (kubelet restart)")
			}
		case err := <-w.Errors:
			return fmt.Errorf("watch %s: %w", p.dir, err)
		case <-check.C:
			// Also compare identities, for events lost to an overflow.
			if st, err := os.Stat(p.opts.KubeletSocket); err != nil || !os.SameFile(st, kubelet) {
				return errors.New("the kubelet's socket changed")
			}
			if st, err := os.Stat(sock); err != nil || !os.SameFile(st, ours) {
				return errors.New("the plugin's socket changed")
			}
		}
	}
}

// waitKubelet returns cause once the kubelet's socket is (re)created or
// after a while, so that Run tries again.
func (p *Plugin) waitKubelet(ctx context.Context, w *fsnotify.Watcher, cause error) error {
	p.log.Info("waiting for the kubelet", "socket", p.opts.KubeletSocket, "err", cause)
	t := time.NewTimer(10 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			return cause
		case ev, ok := <-w.Events:
			if !ok || (ev.Name == p.opts.KubeletSocket && ev.Has(fsnotify.Create)) {
				return cause
			}
		case <-w.Errors:
			return cause
		}
	}
}

// register tells the kubelet about the plugin.
func (p *Plugin) register(ctx context.Context) error {
	conn, err := grpc.NewClient("unix://"+p.opts.KubeletSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("connect to the kubelet: %w", err)
	}
	defer conn.Close()
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err = pluginapi.NewRegistrationClient(conn).Register(rctx, &pluginapi.RegisterRequest{
		Version:      pluginapi.Version,
		Endpoint:     p.opts.Endpoint,
		ResourceName: ResourceName,
		Options:      &pluginapi.DevicePluginOptions{},
	})
	if err != nil {
		return fmt.Errorf("register with the kubelet at %s: %w", p.opts.KubeletSocket, err)
	}
	return nil
}
