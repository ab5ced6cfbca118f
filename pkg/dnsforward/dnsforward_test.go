package dnsforward

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// upstream is a nameserver on loopback that answers A questions with
// 192.0.2.1 (TTL ttl), after dropping the first drop queries it gets.
type upstream struct {
	conn     *net.UDPConn
	tcp      net.Listener
	drop     int32
	silent   atomic.Bool // answer nothing
	truncUDP atomic.Bool // answer UDP with TC set, TCP in full
	ttl      uint32
	queries  atomic.Int32
}

func newUpstream(t *testing.T, drop int32, ttl uint32) *upstream {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", c.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	u := &upstream{conn: c, tcp: l, drop: drop, ttl: ttl}
	t.Cleanup(func() { c.Close(); l.Close() })
	go func() {
		buf := make([]byte, 512)
		for {
			n, from, err := c.ReadFromUDP(buf)
			if err != nil {
				return
			}
			if u.queries.Add(1) <= u.drop || u.silent.Load() {
				continue
			}
			c.WriteToUDP(u.reply(t, buf[:n], u.truncUDP.Load()), from)
		}
	}()
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			q, err := readTCP(conn)
			if err == nil {
				writeTCP(conn, u.reply(t, q, false))
			}
			conn.Close()
		}
	}()
	return u
}

func (u *upstream) addr() netip.AddrPort { return u.conn.LocalAddr().(*net.UDPAddr).AddrPort() }

func (u *upstream) reply(t *testing.T, q []byte, trunc bool) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(q)
	if err != nil {
		t.Errorf("upstream got a bad query: %v", err)
		return nil
	}
	question, _ := p.Question()
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: h.ID, Response: true, RecursionDesired: h.RecursionDesired, Truncated: trunc})
	b.StartQuestions()
	b.Question(question)
	if !trunc && question.Type == dnsmessage.TypeA {
		b.StartAnswers()
		b.AResource(dnsmessage.ResourceHeader{Name: question.Name, Class: dnsmessage.ClassINET, TTL: u.ttl}, dnsmessage.AResource{A: [4]byte{192, 0, 2, 1}})
	}
	msg, _ := b.Finish()
	return msg
}

func query(t testing.TB, id uint16, name string) []byte {
	t.Helper()
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, RecursionDesired: true})
	b.StartQuestions()
	b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET})
	msg, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	return msg
}

// answerOf returns the answer's ID, rcode and first A record ("" if none).
func answerOf(t *testing.T, msg []byte) (uint16, dnsmessage.RCode, string) {
	t.Helper()
	var m dnsmessage.Message
	if err := m.Unpack(msg); err != nil {
		t.Fatalf("answer does not parse: %v", err)
	}
	a := ""
	for _, r := range m.Answers {
		if ar, ok := r.Body.(*dnsmessage.AResource); ok {
			a = netip.AddrFrom4(ar.A).String()
		}
	}
	return m.ID, m.RCode, a
}

type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func TestAnswer(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name       string
		drop       int32
		ttl        uint32
		advance    time.Duration // between the two questions
		silent     bool          // upstream stops answering before the second
		wantAsked  int32         // upstream queries in all
		wantSecond dnsmessage.RCode
	}{
		{name: "cached", ttl: 60, wantAsked: 1},
		{name: "expired", ttl: 60, advance: 61 * time.Second, wantAsked: 2},
		{name: "resent after lost queries", drop: 2, ttl: 60, wantAsked: 3},
		{name: "stale when upstream is silent", ttl: 60, advance: 61 * time.Second, silent: true},
		{name: "zero TTL is not cached", ttl: 0, wantAsked: 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := newUpstream(t, tc.drop, tc.ttl)
			clk := &clock{now: time.Unix(1e9, 0)}
			f, err := New(Options{Upstreams: []netip.AddrPort{u.addr()}, FirstRetry: 20 * time.Millisecond, Deadline: 2 * time.Second, Now: clk.Now})
			if err != nil {
				t.Fatal(err)
			}
			if id, rc, a := answerOf(t, f.Answer(ctx, query(t, 7, "mirror.example."))); id != 7 || rc != 0 || a != "192.0.2.1" {
				t.Fatalf("first answer: id %d rcode %v A %q", id, rc, a)
			}
			clk.add(tc.advance)
			if tc.silent {
				u.silent.Store(true)
				f.opts.Deadline = 200 * time.Millisecond
			}
			id, rc, a := answerOf(t, f.Answer(ctx, query(t, 8, "MIRROR.example.")))
			if id != 8 || rc != tc.wantSecond || a != "192.0.2.1" {
				t.Fatalf("second answer: id %d rcode %v A %q", id, rc, a)
			}
			if tc.silent {
				if f.Stats().StaleHits != 1 {
					t.Errorf("stats %+v: want one stale hit", f.Stats())
				}
			} else if got := u.queries.Load(); got != tc.wantAsked {
				t.Errorf("upstream asked %d times, want %d", got, tc.wantAsked)
			}
		})
	}
}

func TestServFailWithoutStale(t *testing.T) {
	u := newUpstream(t, 0, 60)
	u.silent.Store(true)
	f, err := New(Options{Upstreams: []netip.AddrPort{u.addr()}, FirstRetry: 10 * time.Millisecond, Deadline: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if id, rc, _ := answerOf(t, f.Answer(context.Background(), query(t, 9, "gone.example."))); id != 9 || rc != dnsmessage.RCodeServerFailure {
		t.Fatalf("id %d rcode %v, want 9 SERVFAIL", id, rc)
	}
}

func TestTruncatedRetriesOverTCP(t *testing.T) {
	u := newUpstream(t, 0, 60)
	u.truncUDP.Store(true)
	f, err := New(Options{Upstreams: []netip.AddrPort{u.addr()}})
	if err != nil {
		t.Fatal(err)
	}
	if _, rc, a := answerOf(t, f.Answer(context.Background(), query(t, 1, "big.example."))); rc != 0 || a != "192.0.2.1" {
		t.Fatalf("rcode %v A %q", rc, a)
	}
	if f.Stats().TCP != 1 {
		t.Errorf("stats %+v: want one TCP exchange", f.Stats())
	}
}

// TestJoin: many clients asking one name at once cost one upstream query.
func TestJoin(t *testing.T) {
	u := newUpstream(t, 1, 60) // the first query is lost: the others wait on it
	f, err := New(Options{Upstreams: []netip.AddrPort{u.addr()}, FirstRetry: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, rc, a := answerOf(t, f.Answer(context.Background(), query(t, uint16(i), "join.example."))); rc != 0 || a == "" {
				t.Errorf("client %d: rcode %v A %q", i, rc, a)
			}
		}()
	}
	wg.Wait()
	if got := u.queries.Load(); got != 2 {
		t.Errorf("upstream asked %d times, want 2 (one lost, one resent)", got)
	}
}

// TestServe: real clients through UDP and TCP listeners.
func TestServe(t *testing.T) {
	u := newUpstream(t, 0, 60)
	f, err := New(Options{Upstreams: []netip.AddrPort{u.addr()}})
	if err != nil {
		t.Fatal(err)
	}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 2)
	go func() { done <- f.ServeUDP(ctx, pc) }()
	go func() { done <- f.ServeTCP(ctx, l) }()
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		if network == "tcp" {
			return d.DialContext(ctx, network, l.Addr().String())
		}
		return d.DialContext(ctx, network, pc.LocalAddr().String())
	}}
	addrs, err := r.LookupHost(context.Background(), "www.example.")
	if err != nil || len(addrs) != 1 || addrs[0] != "192.0.2.1" {
		t.Fatalf("lookup over UDP: %v %v", addrs, err)
	}
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	writeTCP(c, query(t, 3, "tcp.example."))
	msg, err := readTCP(c)
	c.Close()
	if err != nil {
		t.Fatal(err)
	}
	if id, rc, a := answerOf(t, msg); id != 3 || rc != 0 || a != "192.0.2.1" {
		t.Fatalf("over TCP: id %d rcode %v A %q", id, rc, a)
	}
	cancel()
	for range 2 {
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	}
}

func TestBadQueries(t *testing.T) {
	f, err := New(Options{Upstreams: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:9")}, Deadline: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		msg  []byte
		want dnsmessage.RCode
		none bool
	}{
		{name: "short", msg: []byte{1, 2, 3}, none: true},
		{name: "header only", msg: make([]byte, 12), want: dnsmessage.RCodeFormatError},
		{name: "a response", msg: func() []byte { q := query(t, 1, "x.example."); q[2] |= 0x80; return q }(), none: true},
		{name: "two questions", msg: func() []byte { q := query(t, 1, "x.example."); q[5] = 2; return q }(), want: dnsmessage.RCodeFormatError},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := f.Answer(context.Background(), tc.msg)
			if tc.none {
				if a != nil {
					t.Fatalf("answered %x", a)
				}
				return
			}
			var p dnsmessage.Parser
			h, err := p.Start(a)
			if err != nil || h.RCode != tc.want {
				t.Fatalf("rcode %v (%v), want %v", h.RCode, err, tc.want)
			}
		})
	}
}

// FuzzMessages: the decoders of messages from the network never panic
// and stay within their bounds.
func FuzzMessages(f *testing.F) {
	f.Add(query(f, 1, "mirror.example."))
	f.Add(make([]byte, 12))
	f.Fuzz(func(t *testing.T, msg []byte) {
		parseQuestion(msg)
		cacheTTL(msg)
		if a := failure(msg, dnsmessage.RCodeServerFailure); len(a) > maxMessage {
			t.Fatalf("failure answer of %d bytes", len(a))
		}
		truncate(msg)
		hasEDNS(msg)
	})
}

func TestResolvConf(t *testing.T) {
	listen := netip.MustParseAddr(ListenAddr)
	for _, tc := range []struct {
		name, in, want string
		ups            []string
	}{
		{
			name: "podman bridge",
			in:   "search dns.podman\nnameserver 10.88.0.1\nnameserver 192.0.2.53\noptions edns0\n",
			want: "search dns.podman\n# kiwi-shim: the box's DNS forwarder answers at 127.0.0.153 for the nameservers below\n" +
				"# (it resends lost queries, caches answers and keeps them for a while if the nameservers stop answering;\n" +
				"# annotation io.kiwi-shim.vm.dns=direct turns it off)\nnameserver 127.0.0.153\n# nameserver 10.88.0.1\n# nameserver 192.0.2.53\noptions edns0\n",
			ups: []string{"10.88.0.1:53", "192.0.2.53:53"},
		},
		{name: "loopback only", in: "nameserver 127.0.0.53\n", want: "nameserver 127.0.0.53\n"},
		{name: "none", in: "search example\n", want: "search example\n"},
		{name: "garbage", in: "nameserver\nnameserver x\n", want: "nameserver\nnameserver x\n"},
		{name: "v6 with zone", in: "nameserver fe80::1%eth0\n", ups: []string{"[fe80::1%eth0]:53"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ups, out := ResolvConf([]byte(tc.in), listen)
			var got []string
			for _, u := range ups {
				got = append(got, u.String())
			}
			if strings.Join(got, " ") != strings.Join(tc.ups, " ") {
				t.Errorf("upstreams %v, want %v", got, tc.ups)
			}
			if tc.want != "" && string(out) != tc.want {
				t.Errorf("text:\n%s\nwant:\n%s", out, tc.want)
			}
		})
	}
}
