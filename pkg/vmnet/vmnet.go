// Package vmnet gives a VM the network of the container it runs: inside
// the container's network namespace it creates a tap device for each
// interface, moves the interface's addresses and routes into the guest's
// configuration (the host side keeps none), and joins tap and interface
// with ingress qdiscs and tc mirred redirect filters both ways, the way
// Kata Containers' tcfilter mode does. QEMU gets the tap's descriptor and
// the guest's NIC the interface's MAC address, so the container network
// (podman's bridge, a CNI plugin, a CRI pod network) sees the guest as
// the container. Everything goes through netlink and ioctls: no ip(8),
// no tc(8).
package vmnet

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// TapPrefix starts the names of the taps vmnet makes.
const TapPrefix = "kiwitap"

// Interface is one container interface handed to the guest.
type Interface struct {
	// Name is the interface in the namespace (eth0) and Tap its tap.
	Name, Tap string
	// MAC is the interface's address, which the guest's NIC takes.
	MAC string
	MTU int
	// Addrs and Routes were the interface's; Teardown gives them back.
	Addrs  []string
	Routes []Route
}

// Route is a route through an interface.
type Route struct {
	Dst     string `json:"dst,omitempty"` // CIDR; empty is the default route
	Gateway string `json:"gateway,omitempty"`
	Family  int    `json:"family"`
}

// State is what Setup did, recorded so that Teardown can undo it from
// another process, after a crash.
type State struct {
	// NetNS is the namespace's path.
	NetNS      string      `json:"netns"`
	Interfaces []Interface `json:"interfaces"`
}

// Guest returns the guest's network configuration.
func (s *State) Guest() *vmproto.Network {
	n := &vmproto.Network{}
	for _, ifc := range s.Interfaces {
		n.Interfaces = append(n.Interfaces, vmproto.Interface{MAC: ifc.MAC, Addresses: ifc.Addrs, MTU: ifc.MTU})
		for _, r := range ifc.Routes {
			if r.Gateway != "" {
				n.Routes = append(n.Routes, vmproto.Route{Destination: r.Dst, Gateway: r.Gateway})
			}
		}
	}
	return n
}

// Setup prepares the namespace at nsPath and returns what it did and one
// open tap descriptor per interface (for QEMU's -netdev tap,fd=N), in
// the order of State.Interfaces. The taps are not persistent: they
// disappear with the last descriptor. On error nothing is left changed.
func Setup(nsPath string) (st *State, taps []*os.File, err error) {
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return nil, nil, fmt.Errorf("network namespace %s: %w", nsPath, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, nil, fmt.Errorf("netlink in %s: %w", nsPath, err)
	}
	defer h.Close()
	st = &State{NetNS: nsPath}
	defer func() {
		if err != nil {
			for _, t := range taps {
				t.Close()
			}
			taps = nil
			teardown(h, st)
		}
	}()
	links, err := h.LinkList()
	if err != nil {
		return nil, nil, fmt.Errorf("list links: %w", err)
	}
	for _, l := range links {
		a := l.Attrs()
		if a.Flags&net.FlagLoopback != 0 || a.Flags&net.FlagUp == 0 || len(a.HardwareAddr) != 6 {
			continue
		}
		if _, isTap := l.(*netlink.Tuntap); isTap {
			continue
		}
		ifc := Interface{Name: a.Name, Tap: TapPrefix + strconv.Itoa(len(st.Interfaces)), MAC: a.HardwareAddr.String(), MTU: a.MTU}
		addrs, err := h.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return st, nil, fmt.Errorf("%s addresses: %w", a.Name, err)
		}
		routes, err := h.RouteList(l, netlink.FAMILY_ALL)
		if err != nil {
			return st, nil, fmt.Errorf("%s routes: %w", a.Name, err)
		}
		var moved []netlink.Addr
		for _, ad := range addrs {
			if ad.IP.IsLinkLocalUnicast() {
				continue // the guest makes its own IPv6 link-local address
			}
			ifc.Addrs = append(ifc.Addrs, ad.IPNet.String())
			moved = append(moved, ad)
		}
		for _, r := range routes {
			if r.Table != unix.RT_TABLE_MAIN || r.Protocol == unix.RTPROT_KERNEL || (r.Dst != nil && r.Dst.IP.IsLinkLocalUnicast()) {
				continue // prefix routes come back with their addresses
			}
			rt := Route{Family: r.Family}
			if ones, _ := maskSize(r.Dst); r.Dst != nil && ones > 0 {
				rt.Dst = r.Dst.String() // else the default route
			}
			if r.Gw != nil {
				rt.Gateway = r.Gw.String()
			}
			ifc.Routes = append(ifc.Routes, rt)
		}
		// Recorded before anything changes, so that teardown can undo a
		// partial setup.
		st.Interfaces = append(st.Interfaces, ifc)
		tap, err := openTap(ns, ifc.Tap)
		if err != nil {
			return st, nil, err
		}
		taps = append(taps, tap)
		tl, err := h.LinkByName(ifc.Tap)
		if err != nil {
			return st, nil, fmt.Errorf("tap %s: %w", ifc.Tap, err)
		}
		if err := h.LinkSetMTU(tl, a.MTU); err != nil {
			return st, nil, fmt.Errorf("tap %s mtu: %w", ifc.Tap, err)
		}
		if err := h.LinkSetUp(tl); err != nil {
			return st, nil, fmt.Errorf("tap %s up: %w", ifc.Tap, err)
		}
		for _, ad := range moved {
			if err := h.AddrDel(l, &ad); err != nil {
				return st, nil, fmt.Errorf("move %s from %s: %w", ad.IPNet, a.Name, err)
			}
		}
		if err := redirect(h, a.Index, tl.Attrs().Index); err != nil {
			return st, nil, fmt.Errorf("%s -> %s: %w", a.Name, ifc.Tap, err)
		}
		if err := redirect(h, tl.Attrs().Index, a.Index); err != nil {
			return st, nil, fmt.Errorf("%s -> %s: %w", ifc.Tap, a.Name, err)
		}
	}
	return st, taps, nil
}

func maskSize(n *net.IPNet) (int, int) {
	if n == nil {
		return 0, 0
	}
	return n.Mask.Size()
}

// ingress is the ingress qdisc of a link.
func ingress(index int) *netlink.Ingress {
	return &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_INGRESS,
	}}
}

// redirect sends every frame arriving on link from out of link to.
func redirect(h *netlink.Handle, from, to int) error {
	if err := h.QdiscAdd(ingress(from)); err != nil {
		return fmt.Errorf("ingress qdisc: %w", err)
	}
	f := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: from, Parent: netlink.MakeHandle(0xffff, 0), Priority: 1, Protocol: unix.ETH_P_ALL,
		},
		// No selector: match everything.
		Actions: []netlink.Action{netlink.NewMirredAction(to)},
	}
	if err := h.FilterAdd(f); err != nil {
		return fmt.Errorf("mirred filter: %w", err)
	}
	return nil
}

// openTap creates a tap named name in ns and returns its descriptor. The
// tun driver creates the device in the namespace of the thread that asks,
// so a locked thread enters ns for the ioctl; a thread that cannot
// return to its namespace is never reused (it stays locked and dies with
// its goroutine).
func openTap(ns netns.NsHandle, name string) (*os.File, error) {
	type result struct {
		f   *os.File
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			ch <- result{err: err}
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			ch <- result{err: fmt.Errorf("enter network namespace: %w", err)}
			return
		}
		f, err := tunSetIff(name)
		if err := netns.Set(orig); err != nil {
			if f != nil {
				f.Close()
			}
			ch <- result{err: fmt.Errorf("leave network namespace: %w", err)}
			return
		}
		runtime.UnlockOSThread()
		ch <- result{f, err}
	}()
	r := <-ch
	return r.f, r.err
}

func tunSetIff(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_ONE_QUEUE)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("create tap %s: %w", name, err)
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun:"+name), nil
}

// Teardown undoes Setup in the namespace: the redirect filters and
// ingress qdiscs go, the taps go (if a descriptor still keeps them), and
// the interfaces get their addresses and routes back. A namespace that no
// longer exists needs nothing; the rest is best effort and idempotent.
func Teardown(st *State) error {
	if st == nil || len(st.Interfaces) == 0 {
		return nil
	}
	ns, err := netns.GetFromPath(st.NetNS)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("network namespace %s: %w", st.NetNS, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink in %s: %w", st.NetNS, err)
	}
	defer h.Close()
	return teardown(h, st)
}

func teardown(h *netlink.Handle, st *State) error {
	var errs []error
	for _, ifc := range st.Interfaces {
		if tl, err := h.LinkByName(ifc.Tap); err == nil {
			h.QdiscDel(ingress(tl.Attrs().Index))
			if err := h.LinkDel(tl); err != nil {
				errs = append(errs, fmt.Errorf("delete %s: %w", ifc.Tap, err))
			}
		}
		l, err := h.LinkByName(ifc.Name)
		if err != nil {
			continue // gone with its namespace's owner
		}
		if err := h.QdiscDel(ingress(l.Attrs().Index)); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("%s ingress qdisc: %w", ifc.Name, err))
		}
		for _, cidr := range ifc.Addrs {
			ad, err := netlink.ParseAddr(cidr)
			if err != nil {
				continue
			}
			if err := h.AddrAdd(l, ad); err != nil && !errors.Is(err, unix.EEXIST) {
				errs = append(errs, fmt.Errorf("restore %s on %s: %w", cidr, ifc.Name, err))
			}
		}
		for _, r := range ifc.Routes {
			nr := &netlink.Route{LinkIndex: l.Attrs().Index, Family: r.Family}
			if r.Dst != "" {
				if _, dst, err := net.ParseCIDR(r.Dst); err == nil {
					nr.Dst = dst
				}
			}
			if r.Gateway != "" {
				nr.Gw = net.ParseIP(r.Gateway)
			}
			if err := h.RouteAdd(nr); err != nil && !errors.Is(err, unix.EEXIST) {
				errs = append(errs, fmt.Errorf("restore route %s via %s: %w", r.Dst, r.Gateway, err))
			}
		}
	}
	return errors.Join(errs...)
}

// Leftovers lists the taps and ingress qdiscs vmnet could have left in
// the namespace at nsPath (for tests and `kiwi-shim check`).
func Leftovers(nsPath string) ([]string, error) {
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, l := range links {
		a := l.Attrs()
		if len(a.Name) >= len(TapPrefix) && a.Name[:len(TapPrefix)] == TapPrefix {
			out = append(out, "tap "+a.Name)
		}
		qs, _ := h.QdiscList(l)
		for _, q := range qs {
			if q.Type() == "ingress" {
				out = append(out, "ingress qdisc on "+a.Name)
			}
		}
	}
	return out, nil
}

// StateFile is where a container's State is kept in its state directory.
const StateFile = "net.json"

// Save writes st to dir/StateFile.
func Save(dir string, st *State) error {
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, StateFile), b, 0o600)
}

// Load reads dir/StateFile; no file is no state.
func Load(dir string) (*State, error) {
	b, err := os.ReadFile(filepath.Join(dir, StateFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var st State
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("%s: %w", StateFile, err)
	}
	return &st, nil
}
