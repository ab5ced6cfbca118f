package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/kiwi-shim/kiwi-shim/pkg/dnsforward"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// planDNS points the container's resolv.conf (a file mount that arrives
// by value) at the box's DNS forwarder and returns the forwarder for its
// nameservers; nil when the container has no resolv.conf with a
// nameserver the box can reach, or asked for direct DNS.
func planDNS(cfg *vmproto.Config) (*dnsforward.Forwarder, error) {
	if cfg.DirectDNS || cfg.Network == nil {
		return nil, nil
	}
	listen := netip.MustParseAddr(dnsforward.ListenAddr)
	for i, m := range cfg.Mounts {
		if m.Type != "file" || m.Destination != "/etc/resolv.conf" {
			continue
		}
		ups, text := dnsforward.ResolvConf(m.Content, listen)
		if ups == nil {
			return nil, nil
		}
		f, err := dnsforward.New(dnsforward.Options{Upstreams: ups})
		if err != nil {
			return nil, err
		}
		cfg.Mounts[i].Content = text
		return f, nil
	}
	return nil, nil
}

// serveDNS starts the forwarder on the loopback address that resolv.conf
// names, UDP and TCP. It runs for the life of the guest.
func serveDNS(f *dnsforward.Forwarder) error {
	addr := net.JoinHostPort(dnsforward.ListenAddr, "53")
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return fmt.Errorf("dns forwarder: %w", err)
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		pc.Close()
		return fmt.Errorf("dns forwarder: %w", err)
	}
	ctx := context.Background()
	go func() {
		if err := f.ServeUDP(ctx, pc); err != nil {
			fmt.Fprintf(os.Stderr, "kiwi-box-init: %v: udp: %v\n", f, err)
		}
	}()
	go func() {
		if err := f.ServeTCP(ctx, l); err != nil {
			fmt.Fprintf(os.Stderr, "kiwi-box-init: %v: tcp: %v\n", f, err)
		}
	}()
	return nil
}
