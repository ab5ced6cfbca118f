package bridgepin

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func ip(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func mac(t *testing.T, dev string) string {
	t.Helper()
	i, err := net.InterfaceByName(dev)
	if err != nil {
		t.Fatal(err)
	}
	return i.HardwareAddr.String()
}

// TestPin: a bridge that follows its ports' lowest address is pinned by
// Pin on a namespace whose veth is its port, and then keeps its address
// when a port with a lower address joins.
func TestPin(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to make bridges and namespaces (make test runs as root)")
	}
	id := os.Getpid() % 100000
	ns, br := fmt.Sprintf("kiwipin%d", id), fmt.Sprintf("kpbr%d", id)
	va, vb := fmt.Sprintf("kpa%d", id), fmt.Sprintf("kpb%d", id)
	t.Cleanup(func() {
		for _, l := range []string{va, vb, br} {
			exec.Command("ip", "link", "del", l).Run()
		}
		exec.Command("ip", "netns", "del", ns).Run()
	})
	ip(t, "netns", "add", ns)
	ip(t, "link", "add", br, "type", "bridge")
	ip(t, "link", "add", va, "address", "02:00:00:00:00:50", "type", "veth", "peer", "name", "eth0", "netns", ns)
	ip(t, "link", "set", va, "master", br)
	ip(t, "link", "set", va, "up")
	ip(t, "link", "set", br, "up")
	if got := mac(t, br); got != "02:00:00:00:00:50" {
		t.Fatalf("bridge address %s: the test expects it to follow its only port", got)
	}
	pinned, err := Pin(filepath.Join("/run/netns", ns))
	if err != nil || len(pinned) != 1 || pinned[0] != br {
		t.Fatalf("Pin: %v %v, want [%s]", pinned, err, br)
	}
	if pinned, err := Pin(filepath.Join("/run/netns", ns)); err != nil || len(pinned) != 0 {
		t.Errorf("second Pin: %v %v, want nothing to do", pinned, err)
	}
	ip(t, "link", "add", vb, "address", "02:00:00:00:00:01", "type", "veth", "peer", "name", vb+"p")
	ip(t, "link", "set", vb, "master", br)
	ip(t, "link", "set", vb, "up")
	if got := mac(t, br); got != "02:00:00:00:00:50" {
		t.Errorf("pinned bridge took address %s from a new port", got)
	}
}
