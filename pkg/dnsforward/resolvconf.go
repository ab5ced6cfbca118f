package dnsforward

import (
	"bytes"
	"fmt"
	"net/netip"
	"strings"
)

// ListenAddr is where the box's forwarder listens (UDP and TCP port 53):
// a loopback address of its own, so that it meets neither a server the
// build runs on 127.0.0.1 nor systemd-resolved's 127.0.0.53.
const ListenAddr = "127.0.0.153"

// ResolvConf reads the nameservers of a resolv.conf and returns them with
// the text the container sees instead: the same file with each
// nameserver line kept as a comment and one nameserver line for the
// forwarder at listen, where the first one was. Search domains and
// options stay. Loopback nameservers cannot be reached from the box's
// network and are not forwarded to; when no other nameserver is listed,
// upstreams is nil and the text is returned unchanged.
func ResolvConf(content []byte, listen netip.Addr) (upstreams []netip.AddrPort, rewritten []byte) {
	lines := strings.Split(string(content), "\n")
	var out []string
	placed := false
	for _, l := range lines {
		f := strings.Fields(l)
		if len(f) < 2 || f[0] != "nameserver" {
			out = append(out, l)
			continue
		}
		a, err := netip.ParseAddr(f[1])
		if err != nil || a.IsLoopback() || a.IsUnspecified() {
			out = append(out, l)
			continue
		}
		upstreams = append(upstreams, netip.AddrPortFrom(a, 53))
		if !placed {
			out = append(out,
				"# kiwi-shim: the box's DNS forwarder answers at "+listen.String()+" for the nameservers below",
				"# (it resends lost queries, caches answers and keeps them for a while if the nameservers stop answering;",
				"# annotation io.kiwi-shim.vm.dns=direct turns it off)",
				"nameserver "+listen.String())
			placed = true
		}
		out = append(out, "# "+l)
	}
	if len(upstreams) == 0 {
		return nil, content
	}
	return upstreams, []byte(strings.Join(out, "\n"))
}

// String describes the forwarder's upstreams.
func (f *Forwarder) String() string {
	var b bytes.Buffer
	for i, u := range f.opts.Upstreams {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprint(&b, u)
	}
	return "dns forwarder for " + b.String()
}
