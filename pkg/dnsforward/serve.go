package dnsforward

import (
	"context"
	"errors"
	"net"
	"sync"
	"time"
)

// tcpIdle bounds how long a TCP client may keep a connection without a
// query; maxTCPConns bounds the connections served at once.
const (
	tcpIdle     = 10 * time.Second
	maxTCPConns = 64
)

// ServeUDP answers queries arriving on conn until ctx ends or conn fails.
// Each query is answered on its own goroutine (at most MaxInFlight
// resolve at once, see Answer), so a slow name never holds up another.
func (f *Forwarder) ServeUDP(ctx context.Context, conn net.PacketConn) error {
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	buf := make([]byte, maxMessage)
	for {
		n, from, err := conn.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		query := append([]byte(nil), buf[:n]...)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if a := f.Answer(ctx, query); a != nil {
				if len(a) > 512 && !hasEDNS(query) {
					// A classic client reads 512 bytes: tell it to ask
					// over TCP.
					a = truncate(a)
				}
				conn.WriteTo(a, from)
			}
		}()
	}
}

// ServeTCP answers length-prefixed queries on connections from l until
// ctx ends or l fails.
func (f *Forwarder) ServeTCP(ctx context.Context, l net.Listener) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	slots := make(chan struct{}, maxTCPConns)
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		select {
		case slots <- struct{}{}:
		default:
			c.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			defer c.Close()
			closer := context.AfterFunc(ctx, func() { c.Close() })
			defer closer()
			for {
				c.SetReadDeadline(time.Now().Add(tcpIdle))
				q, err := readTCP(c)
				if err != nil {
					return
				}
				a := f.Answer(ctx, q)
				if a == nil || writeTCP(c, a) != nil {
					return
				}
			}
		}()
	}
}

// hasEDNS reports whether a query carries an OPT record (and so a UDP
// size of its own, which this forwarder does not parse further).
func hasEDNS(query []byte) bool {
	return len(query) >= 12 && (query[10] != 0 || query[11] != 0)
}

// truncate returns the header and question of an answer with the TC bit
// set.
func truncate(a []byte) []byte {
	t := failure(a, 0)
	if len(t) < 4 {
		return a[:12]
	}
	t[2] |= 0x02 // TC
	return t
}
