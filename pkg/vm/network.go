package vm

import (
	"fmt"
	"net"
	"os"
	"runtime"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// Network modes of a VM.
const (
	// NetNone gives the guest only its loopback interface.
	NetNone = "none"
	// NetUser is QEMU's user-mode (slirp) network: outbound connections
	// from the guest leave through QEMU's own sockets, as the host's.
	NetUser = "user"
	// NetTap hands the container's own interfaces to the guest through
	// taps and tc mirred redirects (package vmnet).
	NetTap = "tap"
)

// userMAC is the MAC of the user-mode NIC; slirp's guest address and
// gateway are fixed (10.0.2.15, 10.0.2.2).
const userMAC = "52:54:00:12:34:56"

// NetworkPlan is how a container's network reaches its VM.
type NetworkPlan struct {
	// Mode is NetNone or NetUser.
	Mode string
	// Why explains the choice for the log.
	Why string
	// NetNS is the namespace whose interfaces NetTap hands over.
	NetNS string
}

// PlanNetwork decides the VM's network from the spec's network namespace:
// a namespace with only loopback (podman --network none, or a new empty
// one) gives the guest only lo; anything else gets user-mode networking,
// so that the build reaches the package repositories with the host's own
// reachability. Host networking cannot be handed to a VM.
func PlanNetwork(spec *specs.Spec) NetworkPlan {
	var ns *specs.LinuxNamespace
	for i := range spec.Linux.Namespaces {
		if spec.Linux.Namespaces[i].Type == specs.NetworkNamespace {
			ns = &spec.Linux.Namespaces[i]
		}
	}
	switch {
	case ns == nil:
		return NetworkPlan{Mode: NetUser, Why: "the container shares the host's network, which a VM cannot: using QEMU user-mode networking"}
	case ns.Path == "":
		return NetworkPlan{Mode: NetNone, Why: "new empty network namespace: loopback only"}
	}
	return PlanNetworkAt(ns.Path)
}

// PlanNetworkAt decides the VM's network from the network namespace at
// path as it is now: its interfaces other than loopback move into the
// guest. A new namespace made for the container (whose path create
// learns only once the monitor lives in it) is planned this way after
// the hooks that may have set it up.
//
// The caller's own namespace is the host's network, whatever path names
// it: its interfaces are the host's and never move into a guest (they
// would take the host's addresses with them). CRI gives every container
// of a pod the sandbox's namespace by path, and a hostNetwork pod's
// sandbox runs in the host's: such a box gets QEMU user-mode networking,
// as a container without a network namespace of its own does.
func PlanNetworkAt(path string) NetworkPlan {
	if same, err := sameNamespace(path, "/proc/self/ns/net"); err == nil && same {
		return NetworkPlan{Mode: NetUser, Why: fmt.Sprintf("%s is the host's network namespace (kiwi-shim's own), which a VM cannot share: using QEMU user-mode networking", path)}
	}
	ifs, err := interfacesIn(path)
	if err != nil {
		return NetworkPlan{Mode: NetUser, Why: fmt.Sprintf("cannot inspect %s (%v): using QEMU user-mode networking", path, err)}
	}
	if len(ifs) <= 1 {
		return NetworkPlan{Mode: NetNone, Why: "network namespace has loopback only"}
	}
	return NetworkPlan{Mode: NetTap, Why: "the container's interfaces move into the guest (tap + tc mirred)", NetNS: path}
}

// interfacesIn lists the interfaces of the network namespace at path.
func interfacesIn(path string) ([]net.Interface, error) {
	type result struct {
		ifs []net.Interface
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// setns affects only this thread; a thread left in another
		// namespace must never run other goroutines, so it stays locked
		// (and is destroyed) if switching back fails.
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			ch <- result{err: err}
			runtime.UnlockOSThread()
			return
		}
		defer orig.Close()
		target, err := os.Open(path)
		if err != nil {
			ch <- result{err: err}
			runtime.UnlockOSThread()
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- result{err: err}
			runtime.UnlockOSThread()
			return
		}
		ifs, err := net.Interfaces()
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		ch <- result{ifs, err}
	}()
	r := <-ch
	return r.ifs, r.err
}

// guestNetwork is the guest side of a plan.
func (p NetworkPlan) guestNetwork() *vmproto.Network {
	if p.Mode != NetUser {
		return nil
	}
	return &vmproto.Network{
		Interfaces: []vmproto.Interface{{MAC: userMAC, Addresses: []string{"10.0.2.15/24"}}},
		Routes:     []vmproto.Route{{Gateway: "10.0.2.2"}},
	}
}

// sameNamespace reports whether the namespace files at a and b are the
// same namespace (their device and inode).
func sameNamespace(a, b string) (bool, error) {
	var sa, sb unix.Stat_t
	if err := unix.Stat(a, &sa); err != nil {
		return false, err
	}
	if err := unix.Stat(b, &sb); err != nil {
		return false, err
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino, nil
}
