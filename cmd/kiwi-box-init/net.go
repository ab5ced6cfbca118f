package main

import (
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// setupNetwork brings up lo and configures the guest's NICs with plain
// rtnetlink requests (no ip(8) in the initramfs).
func setupNetwork(cfg *vmproto.Network, wait time.Duration) error {
	nl, err := newNetlink()
	if err != nil {
		return err
	}
	defer unix.Close(nl.fd)
	if err := nl.linkUp("lo", 0); err != nil {
		return fmt.Errorf("lo: %w", err)
	}
	if cfg == nil {
		return nil
	}
	for _, ifc := range cfg.Interfaces {
		name, err := ifaceByMAC(ifc.MAC, wait)
		if err != nil {
			return err
		}
		if err := nl.linkUp(name, ifc.MTU); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		for _, a := range ifc.Addresses {
			if err := nl.addAddr(name, a); err != nil {
				return fmt.Errorf("%s address %s: %w", name, a, err)
			}
		}
	}
	for _, r := range cfg.Routes {
		if err := nl.addRoute(r); err != nil {
			return fmt.Errorf("route %s via %s: %w", r.Destination, r.Gateway, err)
		}
	}
	return nil
}

// ifaceByMAC finds the NIC QEMU created with the given MAC address,
// waiting up to wait for it to appear (a NIC hot-plugged into a guest
// restored from a template).
func ifaceByMAC(mac string, wait time.Duration) (string, error) {
	deadline := time.Now().Add(wait)
	for {
		ents, _ := os.ReadDir("/sys/class/net")
		for _, e := range ents {
			b, err := os.ReadFile("/sys/class/net/" + e.Name() + "/address")
			if err == nil && strings.EqualFold(strings.TrimSpace(string(b)), mac) {
				return e.Name(), nil
			}
		}
		if !time.Now().Before(deadline) {
			return "", fmt.Errorf("no network interface with MAC %s (is virtio_net loaded?)", mac)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type netlink struct {
	fd  int
	seq uint32
}

func newNetlink() (*netlink, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink: %w", err)
	}
	return &netlink{fd: fd}, nil
}

func align4(n int) int { return (n + 3) &^ 3 }

func attr(typ uint16, data []byte) []byte {
	b := make([]byte, align4(4+len(data)))
	binary.NativeEndian.PutUint16(b[0:2], uint16(4+len(data)))
	binary.NativeEndian.PutUint16(b[2:4], typ)
	copy(b[4:], data)
	return b
}

// request sends one message and waits for its acknowledgement.
func (n *netlink) request(typ uint16, flags uint16, body []byte) error {
	n.seq++
	hdr := make([]byte, unix.SizeofNlMsghdr)
	binary.NativeEndian.PutUint32(hdr[0:4], uint32(unix.SizeofNlMsghdr+len(body)))
	binary.NativeEndian.PutUint16(hdr[4:6], typ)
	binary.NativeEndian.PutUint16(hdr[6:8], flags|unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	binary.NativeEndian.PutUint32(hdr[8:12], n.seq)
	if err := unix.Sendto(n.fd, append(hdr, body...), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, 8192)
	for {
		m, _, err := unix.Recvfrom(n.fd, buf, 0)
		if err != nil {
			return err
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:m])
		if err != nil {
			return err
		}
		for _, msg := range msgs {
			if msg.Header.Seq != n.seq || msg.Header.Type != unix.NLMSG_ERROR || len(msg.Data) < 4 {
				continue
			}
			if code := int32(binary.NativeEndian.Uint32(msg.Data[0:4])); code != 0 {
				return unix.Errno(-code)
			}
			return nil
		}
	}
}

func (n *netlink) linkUp(name string, mtu int) error {
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		return err
	}
	msg := unix.IfInfomsg{Family: unix.AF_UNSPEC, Index: int32(ifc.Index), Flags: unix.IFF_UP, Change: unix.IFF_UP}
	body := (*[unix.SizeofIfInfomsg]byte)(unsafe.Pointer(&msg))[:]
	body = append([]byte{}, body...)
	if mtu > 0 {
		v := make([]byte, 4)
		binary.NativeEndian.PutUint32(v, uint32(mtu))
		body = append(body, attr(unix.IFLA_MTU, v)...)
	}
	return n.request(unix.RTM_NEWLINK, 0, body)
}

func (n *netlink) addAddr(name, cidr string) error {
	ifc, err := net.InterfaceByName(name)
	if err != nil {
		return err
	}
	ip, ipnet, err := net.ParseCIDR(cidr)
	if err != nil {
		return err
	}
	fam, raw := family(ip)
	ones, _ := ipnet.Mask.Size()
	msg := unix.IfAddrmsg{Family: fam, Prefixlen: uint8(ones), Index: uint32(ifc.Index)}
	body := append([]byte{}, (*[unix.SizeofIfAddrmsg]byte)(unsafe.Pointer(&msg))[:]...)
	body = append(body, attr(unix.IFA_LOCAL, raw)...)
	body = append(body, attr(unix.IFA_ADDRESS, raw)...)
	return n.request(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_EXCL, body)
}

func (n *netlink) addRoute(r vmproto.Route) error {
	gw := net.ParseIP(r.Gateway)
	if gw == nil {
		return fmt.Errorf("bad gateway %q", r.Gateway)
	}
	fam, rawGw := family(gw)
	msg := unix.RtMsg{Family: fam, Table: unix.RT_TABLE_MAIN, Protocol: unix.RTPROT_BOOT, Scope: unix.RT_SCOPE_UNIVERSE, Type: unix.RTN_UNICAST}
	var dst []byte
	if r.Destination != "" {
		_, ipnet, err := net.ParseCIDR(r.Destination)
		if err != nil {
			return err
		}
		ones, _ := ipnet.Mask.Size()
		msg.Dst_len = uint8(ones)
		_, dst = family(ipnet.IP)
	}
	body := append([]byte{}, (*[unix.SizeofRtMsg]byte)(unsafe.Pointer(&msg))[:]...)
	if dst != nil {
		body = append(body, attr(unix.RTA_DST, dst)...)
	}
	body = append(body, attr(unix.RTA_GATEWAY, rawGw)...)
	return n.request(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_EXCL, body)
}

func family(ip net.IP) (uint8, []byte) {
	if v4 := ip.To4(); v4 != nil {
		return unix.AF_INET, v4
	}
	return unix.AF_INET6, ip.To16()
}
