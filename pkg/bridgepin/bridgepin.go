// Package bridgepin pins the MAC address of the host bridges that a
// container's network namespace is attached to.
//
// Why: a Linux bridge without an address of its own takes the lowest MAC
// address among its ports, so it changes whenever a container with a lower
// veth address joins or leaves. podman's netavark (1.4, Debian 12's) and
// CNI's bridge plugin leave their bridge that way, and the bridge's address
// is the containers' gateway: after a change, every container that has the
// old one in its neighbour cache sends to an address nobody answers, until
// its cache entry goes stale, fails its probes and is resolved again. On a
// build host where containers come and go, measured here, a container lost
// every packet to its gateway for 10 to 100 seconds at a time, which is
// how a KIWI build fails with "unable to resolve host address" while the
// host resolves the same name at once. Setting the bridge's current
// address explicitly (what Docker does for docker0) makes the kernel keep
// it (addr_assign_type NET_ADDR_SET): the value does not change, only
// that it no longer follows the ports.
package bridgepin

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// netAddrSet is NET_ADDR_SET of <linux/netdevice.h>: the address was set
// explicitly, so a bridge keeps it.
const netAddrSet = "3"

// Pin pins the address of each bridge in the caller's network namespace
// that a veth of the namespace at nsPath is a port of, and returns the
// names of the bridges it pinned now. A veth whose peer is not in the
// caller's namespace (rootless podman, a pod's own) is left alone.
func Pin(nsPath string) ([]string, error) {
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return nil, fmt.Errorf("network namespace %s: %w", nsPath, err)
	}
	defer ns.Close()
	inner, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("netlink in %s: %w", nsPath, err)
	}
	defer inner.Close()
	links, err := inner.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links in %s: %w", nsPath, err)
	}
	var pinned []string
	var errs []error
	for _, l := range links {
		if l.Type() != "veth" {
			continue
		}
		br, err := bridgeOf(l)
		if err != nil || br == nil {
			continue
		}
		done, err := pin(br)
		if err != nil {
			errs = append(errs, err)
		} else if done {
			pinned = append(pinned, br.Attrs().Name)
		}
	}
	return pinned, errors.Join(errs...)
}

// bridgeOf returns the bridge that the peer of a veth inside the
// container's namespace belongs to in the caller's namespace, or nil.
func bridgeOf(inside netlink.Link) (netlink.Link, error) {
	peer, err := netlink.LinkByIndex(inside.Attrs().ParentIndex)
	if err != nil {
		return nil, err
	}
	// Indexes are per namespace: the link of that index here is the
	// veth's peer only if it names the veth's index as its own peer.
	if peer.Type() != "veth" || peer.Attrs().ParentIndex != inside.Attrs().Index || peer.Attrs().MasterIndex == 0 {
		return nil, nil
	}
	br, err := netlink.LinkByIndex(peer.Attrs().MasterIndex)
	if err != nil || br.Type() != "bridge" {
		return nil, err
	}
	return br, nil
}

// pin sets the bridge's address to itself unless it is pinned already.
func pin(br netlink.Link) (bool, error) {
	name := br.Attrs().Name
	b, err := os.ReadFile(filepath.Join("/sys/class/net", name, "addr_assign_type"))
	if err == nil && strings.TrimSpace(string(b)) == netAddrSet {
		return false, nil
	}
	if err := netlink.LinkSetHardwareAddr(br, br.Attrs().HardwareAddr); err != nil {
		return false, fmt.Errorf("pin the address of bridge %s: %w", name, err)
	}
	return true, nil
}
