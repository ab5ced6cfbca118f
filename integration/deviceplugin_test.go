package integration

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
)

// registrar is a kubelet's device plugin Registration service: the part
// of a kubelet that `kiwi-shim device-plugin` talks to first.
type registrar struct {
	pluginapi.UnimplementedRegistrationServer
	reqs chan *pluginapi.RegisterRequest
}

func (r *registrar) Register(_ context.Context, req *pluginapi.RegisterRequest) (*pluginapi.Empty, error) {
	r.reqs <- req
	return &pluginapi.Empty{}, nil
}

// startRegistrar serves it at sock.
func startRegistrar(t *testing.T, sock string) *registrar {
	t.Helper()
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	r := &registrar{reqs: make(chan *pluginapi.RegisterRequest, 4)}
	srv := grpc.NewServer()
	pluginapi.RegisterRegistrationServer(srv, r)
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	return r
}

// devicePlugin starts `kiwi-shim device-plugin` on the podman test's
// allocator, registering at a fake kubelet, and returns a kubelet-side
// client of it.
func devicePlugin(t *testing.T, p *podman) (*exec.Cmd, func() string, pluginapi.DevicePluginClient) {
	t.Helper()
	kdir := t.TempDir()
	ksock := filepath.Join(kdir, "kubelet.sock")
	reg := startRegistrar(t, ksock)
	cmd := exec.Command(shim(), "--config", p.shimConf, "device-plugin", "--kubelet-socket", ksock)
	cmd.Env = append(os.Environ(), p.loopEnv...)
	logFile, err := os.Create(filepath.Join(kdir, "plugin.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	logs := func() string { b, _ := os.ReadFile(logFile.Name()); return string(b) }
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	var req *pluginapi.RegisterRequest
	select {
	case req = <-reg.reqs:
	case <-time.After(30 * time.Second):
		t.Fatalf("kiwi-shim device-plugin did not register:\n%s", logs())
	}
	if req.ResourceName != "kiwi-shim.io/loop" || req.Version != pluginapi.Version {
		t.Fatalf("register request %+v", req)
	}
	conn, err := grpc.NewClient("unix://"+filepath.Join(kdir, req.Endpoint), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return cmd, logs, pluginapi.NewDevicePluginClient(conn)
}

// allocateLoops asks the plugin for the first n advertised devices, as
// the kubelet does for a pod, and returns the lease annotation's value.
func allocateLoops(t *testing.T, c pluginapi.DevicePluginClient, n int) oci.LoopLease {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	s, err := c.ListAndWatch(ctx, &pluginapi.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	list, err := s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, d := range list.Devices[:n] {
		ids = append(ids, d.ID)
	}
	r, err := c.Allocate(ctx, &pluginapi.AllocateRequest{ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: ids}}})
	if err != nil {
		t.Fatal(err)
	}
	l, err := oci.ParseLoopLease(r.ContainerResponses[0].Annotations[oci.AnnotationLoopLease])
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// loopsIn lists the loop device nodes in the output of `ls /dev`.
func loopsIn(out string) []string {
	var l []string
	for _, f := range strings.Fields(out) {
		if strings.HasPrefix(f, "loop") && f != "loop-control" {
			l = append(l, f)
		}
	}
	slices.Sort(l)
	return l
}

// TestDevicePluginContainerMode: a Kubernetes allocation made by
// `kiwi-shim device-plugin` (called over gRPC as the kubelet calls it)
// reaches a container-mode box through the real create path as the
// io.kiwi-shim.loop.lease annotation; the box gets exactly the allocated
// devices, its keeper holds them while it runs and frees them when it is
// removed, and after kill -9 of the plugin a box still gets exactly its
// allocation's devices.
func TestDevicePluginContainerMode(t *testing.T) {
	p := newPodman(t, 3, "")
	rootfs := busyboxRootfs(t)
	plugin, logs, c := devicePlugin(t, p)

	lease := allocateLoops(t, c, 2)
	want := slices.Sorted(slices.Values(lease.Devices))
	st := status(t, p.loopEnv)
	if len(st.Held) != 2 || st.Held[0].PID != plugin.Process.Pid {
		t.Fatalf("after Allocate: %+v, want 2 devices held by the plugin (pid %d)", st.Held, plugin.Process.Pid)
	}

	id := p.must("run", "-d", "--annotation", containerMode, "--annotation", oci.AnnotationLoopLease+"="+lease.String(),
		"--rootfs", rootfs, "sh", "-c", "ls /dev; echo listed; sleep 600")
	deadline := time.Now().Add(30 * time.Second)
	var out string
	for !strings.Contains(out, "listed") && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
		out = p.must("logs", id)
	}
	if got := loopsIn(out); !slices.Equal(got, want) {
		t.Fatalf("the box has %v, the allocation is %v\n%s", got, want, out)
	}
	st = status(t, p.loopEnv)
	if len(st.Held) != 2 || st.Held[0].PID == plugin.Process.Pid || !strings.HasPrefix(id, st.Held[0].Owner) {
		t.Fatalf("while the box runs: %+v, want its 2 devices held by its keeper (container %s)", st.Held, id)
	}
	p.must("rm", "-f", "-t", "0", id)
	if st := status(t, p.loopEnv); len(st.Held) != 0 {
		t.Fatalf("after the box was removed: %+v", st.Held)
	}

	// The plugin dies between Allocate and the container's start: its
	// lease is freed, and the box still gets exactly its devices.
	lease = allocateLoops(t, c, 1)
	if err := plugin.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	plugin.Wait()
	if st := status(t, p.loopEnv); len(st.Held) != 0 {
		t.Fatalf("after kill -9 of the plugin: %+v, want its lease freed", st.Held)
	}
	r := p.run("", "run", "--rm", "--annotation", containerMode, "--annotation", oci.AnnotationLoopLease+"="+lease.String(),
		"--rootfs", rootfs, "ls", "/dev")
	if got := loopsIn(r.stdout); r.code != 0 || !slices.Equal(got, lease.Devices) {
		t.Fatalf("after the crash the box got %v (exit %d), want %v\n%s%s\nplugin:\n%s", got, r.code, lease.Devices, r.stdout, r.stderr, logs())
	}
}

// TestDevicePluginVMMode: a VM-mode box with a Kubernetes allocation
// holds exactly that lease while it runs (its guest has loop devices of
// its own, but the node's accounting must match what was scheduled) and
// frees it when it is removed.
func TestDevicePluginVMMode(t *testing.T) {
	guestRelease(t)
	p := newPodman(t, 3, "")
	noVMLeft(t)
	rootfs := busyboxRootfs(t)
	plugin, logs, c := devicePlugin(t, p)
	lease := allocateLoops(t, c, 2)
	id := p.must("run", "-d", "--annotation", oci.AnnotationLoopLease+"="+lease.String(), "--rootfs", rootfs, "sh", "-c", "echo started; sleep 600")
	// Wait until the guest runs the command: the lease must be held
	// while the VM lives, not only while create runs.
	deadline := time.Now().Add(5 * time.Minute)
	var out string
	for !strings.Contains(out, "started") {
		if time.Now().After(deadline) {
			t.Fatalf("the VM box did not start in 5 min:\n%s", out)
		}
		time.Sleep(500 * time.Millisecond)
		out = p.must("logs", id)
	}
	st := status(t, p.loopEnv)
	var got []string
	for _, h := range st.Held {
		got = append(got, filepath.Base(h.Device))
		if h.Owner == "" || !strings.HasPrefix(id, h.Owner) || h.PID == plugin.Process.Pid {
			t.Errorf("holder %+v: want the box %s's keeper", h, id)
		}
	}
	slices.Sort(got)
	if want := slices.Sorted(slices.Values(lease.Devices)); !slices.Equal(got, want) {
		t.Fatalf("while the VM box runs the allocator holds %v, the allocation is %v\nplugin:\n%s", got, want, logs())
	}
	p.must("rm", "-f", "-t", "0", id)
	deadline = time.Now().Add(15 * time.Second)
	for len(status(t, p.loopEnv).Held) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("15 s after the box was removed its lease is still held: %+v", status(t, p.loopEnv).Held)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
