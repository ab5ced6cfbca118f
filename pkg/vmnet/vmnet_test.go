package vmnet

import (
	"fmt"
	"net"
	"os"
	"runtime"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// testNamespace makes a network namespace with eth0 (a veth) at
// 192.0.2.2/24 and a default route via 192.0.2.1, held by a locked
// thread until the test ends; it returns the namespace's path.
func testNamespace(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("needs root (network namespaces)")
	}
	ready := make(chan string)
	done := make(chan struct{})
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the namespace
		orig, _ := netns.Get()
		defer orig.Close()
		ns, err := netns.New()
		if err != nil {
			ready <- "error " + err.Error()
			return
		}
		defer ns.Close()
		err = func() error {
			l := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0", MTU: 1400, HardwareAddr: net.HardwareAddr{0x02, 0, 0, 0, 0, 0x42}}, PeerName: "peer0"}
			if err := netlink.LinkAdd(l); err != nil {
				return fmt.Errorf("veth: %w", err)
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
			ad, _ := netlink.ParseAddr("192.0.2.2/24")
			if err := netlink.AddrAdd(l, ad); err != nil {
				return err
			}
			return netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: net.ParseIP("192.0.2.1")})
		}()
		if err != nil {
			ready <- "error " + err.Error()
			return
		}
		ready <- fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid())
		<-done
	}()
	p := <-ready
	if len(p) > 6 && p[:6] == "error " {
		t.Fatal(p[6:])
	}
	t.Cleanup(func() { close(done) })
	return p
}

func addrsOf(t *testing.T, nsPath, name string) []string {
	ns, _ := netns.GetFromPath(nsPath)
	defer ns.Close()
	h, _ := netlink.NewHandleAt(ns)
	defer h.Close()
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	as, _ := h.AddrList(l, netlink.FAMILY_V4)
	var out []string
	for _, a := range as {
		out = append(out, a.IPNet.String())
	}
	return out
}

func TestSetupTeardown(t *testing.T) {
	ns := testNamespace(t)
	st, taps, err := Setup(ns)
	if err != nil {
		t.Fatal(err)
	}
	if len(taps) != 1 || len(st.Interfaces) != 1 {
		t.Fatalf("%d taps for %+v", len(taps), st.Interfaces)
	}
	ifc := st.Interfaces[0]
	if ifc.Name != "eth0" || ifc.MAC != "02:00:00:00:00:42" || ifc.MTU != 1400 || !slices.Equal(ifc.Addrs, []string{"192.0.2.2/24"}) {
		t.Fatalf("interface %+v", ifc)
	}
	g := st.Guest()
	if len(g.Routes) != 1 || g.Routes[0].Gateway != "192.0.2.1" || g.Routes[0].Destination != "" {
		t.Fatalf("guest routes %+v", g.Routes)
	}
	if a := addrsOf(t, ns, "eth0"); len(a) != 0 {
		t.Fatalf("eth0 kept %v", a)
	}
	left, err := Leftovers(ns)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(left, "tap kiwitap0") || !slices.Contains(left, "ingress qdisc on eth0") || !slices.Contains(left, "ingress qdisc on kiwitap0") {
		t.Fatalf("after setup: %v", left)
	}
	// QEMU and the monitor are gone (their descriptors closed), then
	// delete runs.
	for _, f := range taps {
		f.Close()
	}
	if err := Teardown(st); err != nil {
		t.Fatal(err)
	}
	if left, _ := Leftovers(ns); len(left) != 0 {
		t.Fatalf("after teardown: %v", left)
	}
	if a := addrsOf(t, ns, "eth0"); !slices.Equal(a, []string{"192.0.2.2/24"}) {
		t.Fatalf("eth0 addresses after teardown: %v", a)
	}
	// Idempotent.
	if err := Teardown(st); err != nil {
		t.Fatalf("second teardown: %v", err)
	}
}

func TestTeardownGoneNamespace(t *testing.T) {
	if err := Teardown(&State{NetNS: "/run/netns/kiwi-shim-no-such-ns", Interfaces: []Interface{{Name: "eth0"}}}); err != nil {
		t.Fatalf("teardown of a vanished namespace: %v", err)
	}
}
