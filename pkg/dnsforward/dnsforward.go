// Package dnsforward is the box's DNS forwarder: kiwi-box-init serves it on
// a loopback address in the guest and points the container's resolv.conf
// at it, in front of the nameservers the container was given.
//
// Why: a KIWI build makes a lookup for each of its ~100 package downloads,
// and a single lookup that the resolver library gives up on fails the whole
// build. The library's own recovery is slow and short (glibc: resend after
// 5 s, twice, A and AAAA from one socket), while the path to the upstream
// nameserver crosses the guest's emulated NIC, a tap, the container
// network's NAT and, on a loaded build host, a guest whose clock and
// scheduling lag under TCG. The forwarder
//   - resends a query it has no answer for after a short, growing interval,
//     from a fresh socket (a fresh source port and conntrack entry) per
//     query, to each nameserver in turn;
//   - answers repeated questions from a cache bounded in entries and in
//     the answers' own TTLs (most of a build's lookups are one mirror host);
//   - joins identical questions in flight into one upstream query;
//   - when no nameserver answers in time, answers from an expired entry of
//     at most StaleFor (RFC 8767's serve-stale) rather than fail a build
//     over a name that resolved minutes ago;
//   - retries over TCP when a UDP answer is truncated.
//
// Answers come from the network, so every message is parsed with
// x/net/dns/dnsmessage, bounded in size, and must match the question's ID
// and question before it is used.
package dnsforward

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// Options configure a Forwarder. Zero values take the defaults given.
type Options struct {
	// Upstreams are the nameservers to forward to (port 53 if none).
	Upstreams []netip.AddrPort
	// FirstRetry is how long to wait for an answer before resending the
	// query; each resend waits twice as long as the last (default 400 ms).
	FirstRetry time.Duration
	// MaxRetry caps the wait between resends (default 2 s).
	MaxRetry time.Duration
	// Deadline bounds the whole exchange with the nameservers, before the
	// stale cache or SERVFAIL answers (default 8 s, inside glibc's two
	// 5-second attempts).
	Deadline time.Duration
	// StaleFor is how long after expiry an entry may still answer when
	// no nameserver does (default 1 h; negative disables).
	StaleFor time.Duration
	// MaxEntries bounds the cache (default 4096).
	MaxEntries int
	// MaxInFlight bounds the questions being resolved at once; beyond it
	// a query is answered SERVFAIL at once (default 256).
	MaxInFlight int
	// Now is the clock (default time.Now); tests set it.
	Now func() time.Time
}

// Stats count what the forwarder did, for tests and debugging.
type Stats struct {
	Queries, CacheHits, StaleHits, Joined, Upstream, Resends, TCP, Failures uint64
}

// Forwarder answers DNS queries from its cache or its upstreams. It is
// safe for concurrent use.
type Forwarder struct {
	opts Options

	mu       sync.Mutex
	cache    map[key]*entry
	inflight map[key]*call
	stats    Stats
}

// key is a question: name (lower case), type, class.
type key struct {
	name  string
	typ   dnsmessage.Type
	class dnsmessage.Class
}

type entry struct {
	msg     []byte // the answer, ID zero
	expires time.Time
}

type call struct {
	done chan struct{}
	msg  []byte // ID zero; nil on failure
}

// maxMessage bounds a DNS message (the TCP length prefix's range).
const maxMessage = 65535

// maxTTL caps how long an answer is cached, whatever its TTL.
const maxTTL = time.Hour

// negativeTTL is how long NXDOMAIN and empty answers are cached when the
// answer carries no SOA to say.
const negativeTTL = 30 * time.Second

// New returns a Forwarder for opts.
func New(opts Options) (*Forwarder, error) {
	if len(opts.Upstreams) == 0 {
		return nil, errors.New("dns forwarder: no upstream nameserver")
	}
	for i, u := range opts.Upstreams {
		if !u.Addr().IsValid() {
			return nil, fmt.Errorf("dns forwarder: upstream %d is not an address", i)
		}
		if u.Port() == 0 {
			opts.Upstreams[i] = netip.AddrPortFrom(u.Addr(), 53)
		}
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&opts.FirstRetry, 400*time.Millisecond)
	def(&opts.MaxRetry, 2*time.Second)
	def(&opts.Deadline, 8*time.Second)
	def(&opts.StaleFor, time.Hour)
	if opts.MaxEntries == 0 {
		opts.MaxEntries = 4096
	}
	if opts.MaxInFlight == 0 {
		opts.MaxInFlight = 256
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Forwarder{opts: opts, cache: map[key]*entry{}, inflight: map[key]*call{}}, nil
}

// Stats returns a snapshot of the counters.
func (f *Forwarder) Stats() Stats {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.stats
}

// parseQuestion returns the ID, flags and single question of a query.
func parseQuestion(msg []byte) (dnsmessage.Header, dnsmessage.Question, error) {
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	if err != nil {
		return h, dnsmessage.Question{}, fmt.Errorf("parse header: %w", err)
	}
	q, err := p.Question()
	if err != nil {
		return h, q, fmt.Errorf("parse question: %w", err)
	}
	if _, err := p.Question(); !errors.Is(err, dnsmessage.ErrSectionDone) {
		return h, q, errors.New("more than one question")
	}
	return h, q, nil
}

func keyOf(q dnsmessage.Question) key {
	return key{name: strings.ToLower(q.Name.String()), typ: q.Type, class: q.Class}
}

// Answer returns the answer to one query message, or nil when the query
// is not worth an answer (not a well-formed query).
func (f *Forwarder) Answer(ctx context.Context, query []byte) []byte {
	if len(query) > maxMessage {
		return nil
	}
	h, q, err := parseQuestion(query)
	if err != nil || h.Response {
		if err != nil && len(query) >= 12 && !h.Response {
			return failure(query, dnsmessage.RCodeFormatError)
		}
		return nil
	}
	if h.OpCode != 0 {
		return failure(query, dnsmessage.RCodeNotImplemented)
	}
	k := keyOf(q)
	f.mu.Lock()
	f.stats.Queries++
	if e := f.cache[k]; e != nil && f.opts.Now().Before(e.expires) {
		f.stats.CacheHits++
		f.mu.Unlock()
		return withID(e.msg, h.ID)
	}
	c, joined := f.inflight[k]
	if joined {
		f.stats.Joined++
	} else {
		if len(f.inflight) >= f.opts.MaxInFlight {
			f.stats.Failures++
			f.mu.Unlock()
			return failure(query, dnsmessage.RCodeServerFailure)
		}
		c = &call{done: make(chan struct{})}
		f.inflight[k] = c
	}
	f.mu.Unlock()
	if !joined {
		// The exchange belongs to every joined query, not to this one's
		// context alone: bound it by the deadline only.
		c.msg = f.resolve(context.WithoutCancel(ctx), query, q, k)
		f.mu.Lock()
		delete(f.inflight, k)
		f.mu.Unlock()
		close(c.done)
	}
	select {
	case <-c.done:
	case <-ctx.Done():
		return nil
	}
	if c.msg == nil {
		return failure(query, dnsmessage.RCodeServerFailure)
	}
	return withID(c.msg, h.ID)
}

// resolve asks the upstreams, caches the answer and returns it with ID
// zero; on failure it falls back to a stale entry, else nil.
func (f *Forwarder) resolve(ctx context.Context, query []byte, q dnsmessage.Question, k key) []byte {
	ctx, cancel := context.WithTimeout(ctx, f.opts.Deadline)
	defer cancel()
	msg, err := f.exchange(ctx, query, q)
	now := f.opts.Now()
	f.mu.Lock()
	defer f.mu.Unlock()
	if err != nil {
		if e := f.cache[k]; e != nil && f.opts.StaleFor > 0 && now.Before(e.expires.Add(f.opts.StaleFor)) {
			f.stats.StaleHits++
			return e.msg
		}
		f.stats.Failures++
		return nil
	}
	msg = withID(msg, 0)
	if ttl, ok := cacheTTL(msg); ok && ttl > 0 {
		if len(f.cache) >= f.opts.MaxEntries {
			f.evict(now)
		}
		f.cache[k] = &entry{msg: msg, expires: now.Add(ttl)}
	}
	return msg
}

// evict drops expired entries, or one entry when none has expired, to
// make room. Called with f.mu held.
func (f *Forwarder) evict(now time.Time) {
	for k, e := range f.cache {
		if now.After(e.expires.Add(f.opts.StaleFor)) {
			delete(f.cache, k)
		}
	}
	for k := range f.cache {
		if len(f.cache) < f.opts.MaxEntries {
			return
		}
		delete(f.cache, k)
	}
}

// exchange sends the query to the upstreams over UDP from one fresh
// socket, resending to the next upstream after each interval, and
// returns the first matching answer; a truncated one is asked again
// over TCP.
func (f *Forwarder) exchange(ctx context.Context, query []byte, q dnsmessage.Question) ([]byte, error) {
	id := binary.BigEndian.Uint16(query)
	conn, err := net.ListenUDP("udp", nil)
	if err != nil {
		return nil, fmt.Errorf("dns forwarder socket: %w", err)
	}
	defer conn.Close()
	answers := make(chan answer, 1)
	go f.readAnswers(conn, id, q, answers)
	wait := f.opts.FirstRetry
	sent := map[netip.AddrPort]bool{}
	for i := 0; ; i++ {
		up := f.opts.Upstreams[i%len(f.opts.Upstreams)]
		sent[up] = true
		if _, err := conn.WriteToUDPAddrPort(query, up); err == nil {
			f.count(func(s *Stats) {
				s.Upstream++
				if i > 0 {
					s.Resends++
				}
			})
		}
		timer := time.NewTimer(wait)
		select {
		case a := <-answers:
			timer.Stop()
			if !a.truncated {
				return a.msg, nil
			}
			f.count(func(s *Stats) { s.TCP++ })
			return exchangeTCP(ctx, query, q, a.from)
		case <-ctx.Done():
			timer.Stop()
			return nil, fmt.Errorf("no answer from %v: %w", f.opts.Upstreams, ctx.Err())
		case <-timer.C:
		}
		if wait *= 2; wait > f.opts.MaxRetry {
			wait = f.opts.MaxRetry
		}
	}
}

type answer struct {
	msg       []byte
	from      netip.AddrPort
	truncated bool
}

// readAnswers delivers the first answer from an upstream that matches
// the query's ID and question; it ends when conn is closed.
func (f *Forwarder) readAnswers(conn *net.UDPConn, id uint16, q dnsmessage.Question, out chan<- answer) {
	buf := make([]byte, maxMessage)
	for {
		n, from, err := conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		if !f.isUpstream(from) {
			continue
		}
		msg := buf[:n]
		h, aq, err := parseQuestion(msg)
		if err != nil || !h.Response || h.ID != id || keyOf(aq) != keyOf(q) {
			continue
		}
		out <- answer{msg: append([]byte(nil), msg...), from: from, truncated: h.Truncated}
		return
	}
}

func (f *Forwarder) isUpstream(a netip.AddrPort) bool {
	for _, u := range f.opts.Upstreams {
		if u == a {
			return true
		}
	}
	return false
}

func (f *Forwarder) count(fn func(*Stats)) {
	f.mu.Lock()
	fn(&f.stats)
	f.mu.Unlock()
}

// exchangeTCP asks one upstream over TCP.
func exchangeTCP(ctx context.Context, query []byte, q dnsmessage.Question, up netip.AddrPort) ([]byte, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", up.String())
	if err != nil {
		return nil, fmt.Errorf("dns over tcp to %s: %w", up, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	if err := writeTCP(c, query); err != nil {
		return nil, fmt.Errorf("dns over tcp to %s: %w", up, err)
	}
	msg, err := readTCP(c)
	if err != nil {
		return nil, fmt.Errorf("dns over tcp to %s: %w", up, err)
	}
	h, aq, err := parseQuestion(msg)
	if err != nil || !h.Response || h.ID != binary.BigEndian.Uint16(query) || keyOf(aq) != keyOf(q) {
		return nil, fmt.Errorf("dns over tcp to %s: answer does not match the question", up)
	}
	return msg, nil
}

// readTCP reads one length-prefixed message.
func readTCP(r io.Reader) ([]byte, error) {
	var l [2]byte
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return nil, err
	}
	msg := make([]byte, binary.BigEndian.Uint16(l[:]))
	if _, err := io.ReadFull(r, msg); err != nil {
		return nil, err
	}
	return msg, nil
}

// writeTCP writes one length-prefixed message.
func writeTCP(w io.Writer, msg []byte) error {
	b := make([]byte, 2+len(msg))
	binary.BigEndian.PutUint16(b, uint16(len(msg)))
	copy(b[2:], msg)
	_, err := w.Write(b)
	return err
}

// cacheTTL says how long an answer may be cached: the smallest TTL of its
// answer records for a positive answer, the SOA's for a negative one;
// answers that are failures are not cached.
func cacheTTL(msg []byte) (time.Duration, bool) {
	var p dnsmessage.Parser
	h, err := p.Start(msg)
	if err != nil || h.Truncated {
		return 0, false
	}
	if err := p.SkipAllQuestions(); err != nil {
		return 0, false
	}
	switch h.RCode {
	case dnsmessage.RCodeSuccess, dnsmessage.RCodeNameError:
	default:
		return 0, false
	}
	ttl, found := maxTTL, false
	for {
		rh, err := p.AnswerHeader()
		if errors.Is(err, dnsmessage.ErrSectionDone) {
			break
		}
		if err != nil {
			return 0, false
		}
		found = true
		ttl = min(ttl, time.Duration(rh.TTL)*time.Second)
		if err := p.SkipAnswer(); err != nil {
			return 0, false
		}
	}
	if found {
		return ttl, true
	}
	// Negative answer: the SOA in the authority section bounds it.
	ttl = negativeTTL
	for {
		rh, err := p.AuthorityHeader()
		if err != nil {
			break
		}
		if rh.Type == dnsmessage.TypeSOA {
			ttl = min(ttl, time.Duration(rh.TTL)*time.Second)
		}
		if err := p.SkipAuthority(); err != nil {
			break
		}
	}
	return ttl, true
}

// withID returns a copy of msg with its ID set.
func withID(msg []byte, id uint16) []byte {
	out := append([]byte(nil), msg...)
	binary.BigEndian.PutUint16(out, id)
	return out
}

// failure answers a query with an error code and no records, keeping its
// ID and question when they parse.
func failure(query []byte, rc dnsmessage.RCode) []byte {
	var p dnsmessage.Parser
	h, _ := p.Start(query)
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: h.ID, Response: true, OpCode: h.OpCode, RecursionDesired: h.RecursionDesired, RecursionAvailable: true, RCode: rc})
	if q, err := p.Question(); err == nil {
		if b.StartQuestions() == nil {
			_ = b.Question(q)
		}
	}
	msg, err := b.Finish()
	if err != nil {
		return nil
	}
	return msg
}
