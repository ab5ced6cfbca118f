package deviceplugin

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/kiwi-shim/kiwi-shim/pkg/loopdev"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
)

// These tests run the plugin against a fake kubelet (a real gRPC
// Registration server on a unix socket in a temporary directory) and call
// it over gRPC as the kubelet does. The allocator is a private one over a
// fake loop driver made of plain files, so they need no root and touch
// none of the host's devices.

// fakeHost is a loop driver of n unbound devices made of plain files.
func fakeHost(t *testing.T, root string, n int) *loopdev.Host {
	t.Helper()
	h := &loopdev.Host{
		DevDir:   filepath.Join(root, "dev"),
		SysBlock: filepath.Join(root, "sys"),
		ClaimDir: filepath.Join(root, "claims"),
	}
	for i := range n {
		name := "loop" + strconv.Itoa(i)
		for _, d := range []string{filepath.Join(h.SysBlock, name), h.DevDir} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(h.SysBlock, name, "dev"), []byte("7:"+strconv.Itoa(i)+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(h.DevDir, name), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return h
}

// fakeKubelet is the kubelet's Registration service.
type fakeKubelet struct {
	pluginapi.UnimplementedRegistrationServer
	srv  *grpc.Server
	reqs chan *pluginapi.RegisterRequest
}

func (k *fakeKubelet) Register(_ context.Context, r *pluginapi.RegisterRequest) (*pluginapi.Empty, error) {
	k.reqs <- r
	return &pluginapi.Empty{}, nil
}

// startKubelet serves a fake kubelet at sock; a kubelet that starts
// removes every plugin socket in its directory first, as the real one
// does.
func startKubelet(t *testing.T, sock string) *fakeKubelet {
	t.Helper()
	ents, _ := os.ReadDir(filepath.Dir(sock))
	for _, e := range ents {
		if e.Type()&os.ModeSocket != 0 {
			os.Remove(filepath.Join(filepath.Dir(sock), e.Name()))
		}
	}
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	k := &fakeKubelet{srv: grpc.NewServer(), reqs: make(chan *pluginapi.RegisterRequest, 8)}
	pluginapi.RegisterRegistrationServer(k.srv, k)
	go k.srv.Serve(lis)
	t.Cleanup(k.srv.Stop)
	return k
}

func (k *fakeKubelet) registered(t *testing.T) *pluginapi.RegisterRequest {
	t.Helper()
	select {
	case r := <-k.reqs:
		return r
	case <-time.After(30 * time.Second):
		t.Fatal("the plugin did not register")
		return nil
	}
}

// env is one test's plugin world.
type env struct {
	dir     string // the kubelet's device plugin directory
	kubelet string // its registration socket
	host    *loopdev.Host
	alloc   *loopdev.Allocator
	loopDir string
}

func newEnv(t *testing.T, devices, capacity int) *env {
	t.Helper()
	root := t.TempDir()
	e := &env{dir: filepath.Join(root, "device-plugins"), loopDir: filepath.Join(root, "loop")}
	e.kubelet = filepath.Join(e.dir, "kubelet.sock")
	if err := os.MkdirAll(e.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	e.host = fakeHost(t, root, devices)
	a, err := loopdev.New(loopdev.Options{Dir: e.loopDir, Capacity: capacity, Host: e.host})
	if err != nil {
		t.Fatal(err)
	}
	e.alloc = a
	return e
}

// run starts the plugin; the returned function stops it and waits.
func (e *env) run(t *testing.T, opts Options) (*Plugin, func()) {
	t.Helper()
	opts.Alloc = e.alloc
	opts.KubeletSocket = e.kubelet
	p, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}
	t.Cleanup(stop)
	return p, stop
}

// dial connects to the plugin as the kubelet does.
func dial(t *testing.T, sock string) pluginapi.DevicePluginClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return pluginapi.NewDevicePluginClient(conn)
}

func listDevices(t *testing.T, c pluginapi.DevicePluginClient) []*pluginapi.Device {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	s, err := c.ListAndWatch(ctx, &pluginapi.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	r, err := s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	return r.Devices
}

func allocate(t *testing.T, c pluginapi.DevicePluginClient, slots ...string) oci.LoopLease {
	t.Helper()
	r, err := c.Allocate(t.Context(), &pluginapi.AllocateRequest{ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: slots}}})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.ContainerResponses) != 1 {
		t.Fatalf("%d container responses, want 1", len(r.ContainerResponses))
	}
	v := r.ContainerResponses[0].Annotations[oci.AnnotationLoopLease]
	l, err := oci.ParseLoopLease(v)
	if err != nil {
		t.Fatalf("annotation %s=%q: %v", oci.AnnotationLoopLease, v, err)
	}
	if len(l.Devices) != len(slots) {
		t.Fatalf("lease %v for %d slots", l, len(slots))
	}
	return l
}

// held is the allocator's view: device name -> owner.
func held(t *testing.T, a *loopdev.Allocator) map[string]loopdev.Holder {
	t.Helper()
	st, err := a.Status()
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]loopdev.Holder{}
	for _, h := range st.Held {
		m[filepath.Base(h.Device)] = h
	}
	return m
}

func TestRegisterListAllocateAdopt(t *testing.T) {
	e := newEnv(t, 6, 6)
	k := startKubelet(t, e.kubelet)
	p, stop := e.run(t, Options{Devices: 4})
	r := k.registered(t)
	if r.Version != pluginapi.Version || r.ResourceName != ResourceName || r.Endpoint != DefaultEndpoint {
		t.Fatalf("register request %+v", r)
	}
	c := dial(t, filepath.Join(e.dir, r.Endpoint))
	devs := listDevices(t, c)
	if len(devs) != 4 {
		t.Fatalf("%d devices advertised, want 4", len(devs))
	}
	for _, d := range devs {
		if d.Health != pluginapi.Healthy {
			t.Errorf("device %s is %s", d.ID, d.Health)
		}
	}

	lease := allocate(t, c, devs[0].ID, devs[2].ID)
	h := held(t, e.alloc)
	for _, n := range lease.Devices {
		if !strings.Contains(h[n].Owner, lease.ID) {
			t.Errorf("%s: holder %+v, want the allocation %s", n, h[n], lease.ID)
		}
	}
	if len(h) != 2 {
		t.Errorf("allocator holds %v, want the 2 allocated devices", h)
	}

	l, err := Adopt(t.Context(), e.alloc, HandoverDir(e.loopDir), lease, "box1")
	if err != nil {
		t.Fatal(err)
	}
	for i, d := range l.Devices() {
		if d.Name() != lease.Devices[i] {
			t.Fatalf("adopted %v, allocated %v", l.Devices(), lease.Devices)
		}
	}
	if n := p.ledger.len(); n != 0 {
		t.Errorf("the plugin still holds %d allocation(s) after the hand-over", n)
	}
	// The lease outlives the plugin: it is the box's now.
	stop()
	h = held(t, e.alloc)
	if len(h) != 2 || h[lease.Devices[0]].Owner != "box1" || h[lease.Devices[0]].Stale {
		t.Errorf("after the plugin stopped: %+v, want both held by box1", h)
	}
	if err := l.Release(); err != nil {
		t.Fatal(err)
	}
	if h := held(t, e.alloc); len(h) != 0 {
		t.Errorf("after release: %v", h)
	}
	if _, err := os.Stat(filepath.Join(e.dir, DefaultEndpoint)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("plugin socket left behind: %v", err)
	}
	if socks, _ := filepath.Glob(filepath.Join(HandoverDir(e.loopDir), "*.sock")); len(socks) != 0 {
		t.Errorf("hand-over sockets left behind: %v", socks)
	}
}

func TestReregistersWhenTheKubeletRestarts(t *testing.T) {
	e := newEnv(t, 4, 4)
	k := startKubelet(t, e.kubelet)
	e.run(t, Options{Endpoint: "second.sock"})
	k.registered(t)
	// The kubelet dies and a new one starts: it recreates its socket and
	// removes the plugins'.
	k.srv.Stop()
	os.Remove(e.kubelet)
	k2 := startKubelet(t, e.kubelet)
	r := k2.registered(t)
	if r.Endpoint != "second.sock" {
		t.Fatalf("re-registered %+v", r)
	}
	c := dial(t, filepath.Join(e.dir, "second.sock"))
	if n := len(listDevices(t, c)); n != 4 {
		t.Errorf("after re-registration: %d devices, want 4", n)
	}
	allocate(t, c, slotPrefix+"1")
}

func TestUnadoptedAllocationsAreReleased(t *testing.T) {
	e := newEnv(t, 4, 4)
	k := startKubelet(t, e.kubelet)
	p, _ := e.run(t, Options{Devices: 4, AdoptTimeout: time.Hour})
	k.registered(t)
	c := dial(t, filepath.Join(e.dir, DefaultEndpoint))

	// The kubelet reuses a slot only once the pod that had it is gone:
	// the old allocation's lease goes, the new one gets devices.
	first := allocate(t, c, slotPrefix+"0", slotPrefix+"1")
	second := allocate(t, c, slotPrefix+"1", slotPrefix+"2")
	h := held(t, e.alloc)
	if len(h) != 2 || !strings.Contains(h[second.Devices[0]].Owner, second.ID) {
		t.Fatalf("after slot reuse: %+v, want only allocation %s (not %s)", h, second.ID, first.ID)
	}

	// Nobody adopts within the bound: released.
	p.reclaim(time.Now().Add(59 * time.Minute))
	if h := held(t, e.alloc); len(h) != 2 {
		t.Fatalf("released before the bound: %+v", h)
	}
	p.reclaim(time.Now().Add(61 * time.Minute))
	if h := held(t, e.alloc); len(h) != 0 {
		t.Fatalf("after the bound: %+v", h)
	}
	// A container that starts that late still gets its devices, they
	// are free.
	l, err := Adopt(t.Context(), e.alloc, HandoverDir(e.loopDir), second, "late")
	if err != nil {
		t.Fatal(err)
	}
	if got := l.Devices(); got[0].Name() != second.Devices[0] || got[1].Name() != second.Devices[1] {
		t.Errorf("late adopter got %v, want %v", got, second.Devices)
	}
	l.Release()
}

func TestAllocateRefuses(t *testing.T) {
	e := newEnv(t, 4, 2)
	k := startKubelet(t, e.kubelet)
	e.run(t, Options{AllocateTimeout: time.Millisecond})
	k.registered(t)
	c := dial(t, filepath.Join(e.dir, DefaultEndpoint))
	for _, slots := range [][]string{nil, {"loop0"}, {slotPrefix + "2"}, {slotPrefix + "01"}, {slotPrefix + "0", slotPrefix + "0"}} {
		_, err := c.Allocate(t.Context(), &pluginapi.AllocateRequest{ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: slots}}})
		if err == nil {
			t.Errorf("Allocate(%q) succeeded", slots)
		}
	}
	// Two containers in one request, the second cannot be served: the
	// first's lease must not stay.
	other, err := e.alloc.Acquire(t.Context(), loopdev.Request{Owner: "podman box", Count: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Release()
	_, err = c.Allocate(t.Context(), &pluginapi.AllocateRequest{ContainerRequests: []*pluginapi.ContainerAllocateRequest{
		{DevicesIds: []string{slotPrefix + "0"}}, {DevicesIds: []string{slotPrefix + "1"}},
	}})
	if err == nil {
		t.Fatal("Allocate beyond the free capacity succeeded")
	}
	if h := held(t, e.alloc); len(h) != 1 {
		t.Errorf("after the failed allocation: %+v, want only the podman box's", h)
	}
}

func TestAdoptRefusesDevicesTakenMeanwhile(t *testing.T) {
	e := newEnv(t, 4, 4)
	k := startKubelet(t, e.kubelet)
	_, stop := e.run(t, Options{})
	k.registered(t)
	c := dial(t, filepath.Join(e.dir, DefaultEndpoint))
	lease := allocate(t, c, slotPrefix+"3")
	stop() // the plugin goes away before the container starts
	d, _ := loopdev.ParseDevice(lease.Devices[0])
	thief, err := e.alloc.AcquireDevices("thief", []loopdev.Device{d})
	if err != nil {
		t.Fatal(err)
	}
	defer thief.Release()
	if l, err := Adopt(t.Context(), e.alloc, HandoverDir(e.loopDir), lease, "box"); err == nil {
		l.Release()
		t.Fatal("adopted devices that another holder has")
	}
}

// TestPluginKilled: kill -9 of the plugin process frees the leases it held
// for containers that had not adopted them yet, and such a container
// still gets exactly its allocation's devices afterwards.
func TestPluginKilled(t *testing.T) {
	e := newEnv(t, 4, 4)
	k := startKubelet(t, e.kubelet)
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "KIWI_TEST_PLUGIN="+strings.Join([]string{e.kubelet, e.loopDir, e.host.DevDir, e.host.SysBlock, e.host.ClaimDir}, ":"))
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	k.registered(t)
	c := dial(t, filepath.Join(e.dir, DefaultEndpoint))
	lease := allocate(t, c, slotPrefix+"0", slotPrefix+"1")
	h := held(t, e.alloc)
	if len(h) != 2 || h[lease.Devices[0]].PID != cmd.Process.Pid {
		t.Fatalf("before the kill: %+v, want two held by pid %d", h, cmd.Process.Pid)
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	if h := held(t, e.alloc); len(h) != 0 {
		t.Fatalf("after kill -9: %+v, want nothing held", h)
	}
	l, err := Adopt(t.Context(), e.alloc, HandoverDir(e.loopDir), lease, "box")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Release()
	if got := l.Devices(); got[0].Name() != lease.Devices[0] || got[1].Name() != lease.Devices[1] {
		t.Errorf("after the crash the box got %v, want %v", got, lease.Devices)
	}
}

// TestMain runs the plugin process of TestPluginKilled when asked to.
func TestMain(m *testing.M) {
	if v := os.Getenv("KIWI_TEST_PLUGIN"); v != "" {
		os.Exit(helperPlugin(v))
	}
	os.Exit(m.Run())
}

// helperPlugin serves a plugin over the directories in v until killed.
func helperPlugin(v string) int {
	f := strings.Split(v, ":")
	h := &loopdev.Host{DevDir: f[2], SysBlock: f[3], ClaimDir: f[4]}
	a, err := loopdev.New(loopdev.Options{Dir: f[1], Capacity: 4, Host: h})
	if err == nil {
		var p *Plugin
		if p, err = New(Options{Alloc: a, KubeletSocket: f[0]}); err == nil {
			err = p.Run(context.Background())
		}
	}
	if err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
		return 1
	}
	return 0
}

// TestStaleHandoverSocketsAreRemoved: a plugin that starts removes the
// hand-over socket a killed plugin left behind (nobody accepts on it)
// and leaves a live plugin's socket alone.
func TestStaleHandoverSocketsAreRemoved(t *testing.T) {
	e := newEnv(t, 2, 2)
	dir := HandoverDir(e.loopDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	listen := func(name string) *net.UnixListener {
		l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: filepath.Join(dir, name), Net: "unixpacket"})
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	// A dead plugin's socket: the file stays, nobody listens.
	dead := listen("1.sock")
	dead.SetUnlinkOnClose(false)
	dead.Close()
	live := listen("2.sock")
	defer live.Close()
	go func() {
		for {
			c, err := live.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()

	k := startKubelet(t, e.kubelet)
	e.run(t, Options{})
	k.registered(t)
	if _, err := os.Stat(filepath.Join(dir, "1.sock")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the dead plugin's socket: %v, want it removed", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "2.sock")); err != nil {
		t.Errorf("the live plugin's socket: %v, want it kept", err)
	}
}
