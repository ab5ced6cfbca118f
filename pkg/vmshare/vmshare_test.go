package vmshare

import (
	"encoding/binary"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/kiwi-shim/kiwi-shim/pkg/sharefs"
	"github.com/kiwi-shim/kiwi-shim/pkg/vhostuser"
)

// request builds a FUSE request: in header + body, with Length set.
func request(opcode uint32, unique, node uint64, body []byte) []byte {
	b := make([]byte, 40+len(body))
	binary.LittleEndian.PutUint32(b, uint32(len(b)))
	binary.LittleEndian.PutUint32(b[4:], opcode)
	binary.LittleEndian.PutUint64(b[8:], unique)
	binary.LittleEndian.PutUint64(b[16:], node)
	copy(b[40:], body)
	return b
}

func initRequest() []byte {
	body := make([]byte, 64)
	binary.LittleEndian.PutUint32(body, 7)      // major
	binary.LittleEndian.PutUint32(body[4:], 38) // minor
	binary.LittleEndian.PutUint32(body[8:], 1<<20)
	return request(opInit, 1, 0, body)
}

// FuzzHandleRequest sends arbitrary FUSE requests (as a guest could put
// them in a virtqueue) to an export: the server answers or refuses, never
// panics, never replies more than the buffer holds, and never touches
// anything outside the export.
func FuzzHandleRequest(f *testing.F) {
	f.Add(request(opLookup, 2, 1, []byte("file\x00")))
	f.Add(request(opLookup, 2, 1, []byte("../canary/secret\x00")))                // escape
	f.Add(request(opMkdir, 3, 1, append(make([]byte, 8), []byte("../x\x00")...))) // escape
	f.Add(request(opSymlink, 4, 1, []byte("/etc/passwd\x00link\x00")))
	f.Add(request(opRename2, 5, 1, append(make([]byte, 16), []byte("file\x00../moved\x00")...)))
	f.Add([]byte{1, 2, 3})
	// One export for the whole run, as one guest sends a stream of
	// requests (and every root holds a descriptor).
	base := f.TempDir()
	export, canary := filepath.Join(base, "export"), filepath.Join(base, "canary")
	os.Mkdir(export, 0o755)
	os.Mkdir(canary, 0o755)
	os.WriteFile(filepath.Join(export, "file"), []byte("inside"), 0o644)
	os.WriteFile(filepath.Join(canary, "secret"), []byte("canary"), 0o644)
	ps, err := NewProtocolServer(Export{Source: export, Options: sharefs.Options{Xattr: true}}, slog.New(slog.DiscardHandler), false)
	if err != nil {
		f.Fatal(err)
	}
	out := make([]byte, 8192)
	if n, st := ps.HandleRequest([][]byte{initRequest()}, [][]byte{out}); st != fuse.OK || n == 0 {
		f.Fatalf("INIT: %d bytes, %v", n, st)
	}
	f.Fuzz(func(t *testing.T, req []byte) {
		out := make([]byte, 8192)
		// Split the request at an arbitrary point, as descriptors do.
		in := [][]byte{req}
		if len(req) > 41 {
			in = [][]byte{req[:41], req[41:]}
		}
		(&device{}).Quick(1, &vhostuser.Chain{Readable: in}) // must not panic
		n, _ := ps.HandleRequest(in, [][]byte{out[:4096], out[4096:]})
		if n > len(out) {
			t.Fatalf("reply of %d bytes into %d", n, len(out))
		}
		ents, _ := os.ReadDir(base)
		if len(ents) != 2 {
			t.Fatalf("created next to the export: %v", ents)
		}
		if b, err := os.ReadFile(filepath.Join(canary, "secret")); err != nil || string(b) != "canary" {
			t.Fatalf("canary changed: %q %v", b, err)
		}
		if ents, _ := os.ReadDir(canary); len(ents) != 1 {
			t.Fatalf("canary directory changed: %v", ents)
		}
	})
}

func TestProtocolServerPanics(t *testing.T) {
	// The panic handler keeps the daemon alive: a request the tree
	// cannot take is an EIO for the guest.
	ps, err := NewProtocolServer(Export{Source: t.TempDir()}, slog.New(slog.DiscardHandler), false)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, 4096)
	ps.HandleRequest([][]byte{initRequest()}, [][]byte{out})
	// GETATTR of a node id the guest never looked up.
	n, st := ps.HandleRequest([][]byte{request(opGetattr, 9, 12345, make([]byte, 16))}, [][]byte{out})
	if st == fuse.OK && n > 16 {
		t.Fatalf("GETATTR of an unknown node answered %d bytes", n)
	}
}

func TestQuick(t *testing.T) {
	io := func(op uint32, size uint32) []byte {
		body := make([]byte, 40)
		binary.LittleEndian.PutUint32(body[16:], size)
		return request(op, 1, 2, body)
	}
	setattr := func(valid uint32) []byte {
		body := make([]byte, 88)
		binary.LittleEndian.PutUint32(body, valid)
		return request(opSetattr, 1, 2, body)
	}
	d := &device{}
	for _, c := range []struct {
		name string
		req  []byte
		want bool
	}{
		{"lookup", request(opLookup, 1, 1, []byte("f\x00")), true},
		{"create", request(opCreate, 1, 1, make([]byte, 20)), true},
		{"read 4k", io(opRead, 4096), true},
		{"read 1m", io(opRead, 1<<20), false},
		{"write 64k", io(opWrite, 64<<10), true},
		{"write 1m", io(opWrite, 1<<20), false},
		{"utimes", setattr(fuse.FATTR_ATIME | fuse.FATTR_MTIME), true},
		{"truncate", setattr(fuse.FATTR_SIZE), false},
		{"fsync", request(opFsync, 1, 2, make([]byte, 16)), false},
		{"unlink", request(opUnlink, 1, 1, []byte("f\x00")), false},
		{"readdirplus", request(opReaddirplus, 1, 1, make([]byte, 40)), false},
		{"short header", request(opLookup, 1, 1, nil)[:39], false},
		{"read without body", request(opRead, 1, 2, nil), false},
	} {
		for _, split := range []bool{false, true} {
			bufs := [][]byte{c.req}
			if split && len(c.req) > 40 {
				// As Linux sends them: the in header alone, then the body.
				bufs = [][]byte{c.req[:40], c.req[40:]}
			}
			if got := d.Quick(1, &vhostuser.Chain{Readable: bufs}); got != c.want {
				t.Errorf("%s (split %v): quick %v, want %v", c.name, split, got, c.want)
			}
		}
	}
}

// TestNullModes: what a guest sees of a mode-0000 file and directory is
// mode 0000 (issue 24: go-fuse reported 0644 and 0755, and the guest's
// kernel let anyone read and list them).
func TestNullModes(t *testing.T) {
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "zero"), []byte("secret"), 0)
	os.Chmod(filepath.Join(src, "zero"), 0)
	os.Mkdir(filepath.Join(src, "zerodir"), 0)
	os.Chmod(filepath.Join(src, "zerodir"), 0)
	ps, err := NewProtocolServer(Export{Source: src}, slog.New(slog.DiscardHandler), false)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, 4096)
	ps.HandleRequest([][]byte{initRequest()}, [][]byte{out})
	for i, c := range []struct {
		name string
		want uint32
	}{{"zero", 0o100000}, {"zerodir", 0o40000}} {
		// fuse_out_header (16 bytes), fuse_entry_out: 40 bytes, then
		// fuse_attr with its mode at offset 60.
		n, st := ps.HandleRequest([][]byte{request(opLookup, uint64(10+i), 1, []byte(c.name+"\x00"))}, [][]byte{out})
		if st != fuse.OK || n < 16+40+64 {
			t.Fatalf("LOOKUP %s: %d bytes, %v", c.name, n, st)
		}
		if got := binary.LittleEndian.Uint32(out[16+40+60:]); got != c.want {
			t.Errorf("LOOKUP %s: mode %#o, want %#o", c.name, got, c.want)
		}
		// GETATTR: fuse_attr_out is 16 bytes before fuse_attr.
		node := binary.LittleEndian.Uint64(out[16:])
		n, st = ps.HandleRequest([][]byte{request(opGetattr, uint64(20+i), node, make([]byte, 16))}, [][]byte{out})
		if st != fuse.OK || n < 16+16+64 {
			t.Fatalf("GETATTR %s: %d bytes, %v", c.name, n, st)
		}
		if got := binary.LittleEndian.Uint32(out[16+16+60:]); got != c.want {
			t.Errorf("GETATTR %s: mode %#o, want %#o", c.name, got, c.want)
		}
	}
}

// TestLookupAgainNoLeak: a guest that looks the same directory up again
// and again (its entries time out after a second) costs the daemon one
// descriptor, not one per LOOKUP. The virtio-fs transport never forgets
// an inode, and every LOOKUP used to leave a descriptor behind: a KIWI
// build with its tree on a share hit the daemon's limit (EMFILE) in
// dpkg.
func TestLookupAgainNoLeak(t *testing.T) {
	export := t.TempDir()
	if err := os.Mkdir(filepath.Join(export, "dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	ps, err := NewProtocolServer(Export{Source: export, Options: sharefs.Options{Mapped: true, Cache: sharefs.CacheMetadata}}, slog.New(slog.DiscardHandler), false)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, 8192)
	if n, st := ps.HandleRequest([][]byte{initRequest()}, [][]byte{out}); st != fuse.OK || n == 0 {
		t.Fatalf("INIT: %d bytes, %v", n, st)
	}
	fds := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	before := fds()
	for i := range 500 {
		if n, st := ps.HandleRequest([][]byte{request(opLookup, uint64(i+2), 1, []byte("dir\x00"))}, [][]byte{out}); st != fuse.OK || n == 0 {
			t.Fatalf("LOOKUP %d: %d bytes, %v", i, n, st)
		}
	}
	if got := fds(); got > before+1 {
		t.Errorf("500 LOOKUPs of one directory left %d more descriptors open, want at most 1", got-before)
	}
}

// TestOversizedRequest: a request that names more than any FUSE request
// of a Linux guest (a READ of 8 MiB into a reply buffer split over
// descriptors, a WRITE of 2 MiB) is refused before go-fuse sizes a
// buffer by it: a hostile guest could name 4 GiB per request. Requests
// up to the limit, split as the guest likes, are served.
func TestOversizedRequest(t *testing.T) {
	export := t.TempDir()
	if err := os.WriteFile(filepath.Join(export, "big"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(filepath.Join(export, "big"), 8<<20); err != nil {
		t.Fatal(err)
	}
	e := Export{Source: export}
	d, err := newDevice(e, slog.New(slog.DiscardHandler), false)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, 4096)
	handle := func(in, out [][]byte) int { return d.Handle(1, &vhostuser.Chain{Readable: in, Writable: out}) }
	if n := handle([][]byte{initRequest()}, [][]byte{out}); n == 0 {
		t.Fatal("INIT refused")
	}
	if n := handle([][]byte{request(opLookup, 2, 1, []byte("big\x00"))}, [][]byte{out}); n < 16+40 {
		t.Fatalf("LOOKUP big: %d bytes", n)
	}
	node := binary.LittleEndian.Uint64(out[16:])
	openIn := make([]byte, 8)
	binary.LittleEndian.PutUint32(openIn, uint32(os.O_RDWR))
	if n := handle([][]byte{request(opOpen, 3, node, openIn)}, [][]byte{out}); n < 16+16 {
		t.Fatalf("OPEN big: %d bytes", n)
	}
	fh := binary.LittleEndian.Uint64(out[16:])
	read := func(unique uint64, size int) []byte {
		body := make([]byte, 40)
		binary.LittleEndian.PutUint64(body, fh)
		binary.LittleEndian.PutUint32(body[16:], uint32(size))
		return request(opRead, unique, node, body)
	}
	// The reply's payload in two descriptors, so that go-fuse cannot
	// read into guest memory directly and allocates a buffer of its own.
	split := func(size int) [][]byte {
		b := make([]byte, 16+size)
		return [][]byte{b[:16], b[16 : 16+size/2], b[16+size/2:]}
	}

	if n := handle([][]byte{read(4, 1<<20)}, split(1<<20)); n != 16+1<<20 {
		t.Errorf("READ of 1 MiB: %d bytes, want %d", n, 16+1<<20)
	}

	bufs := split(8 << 20)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	n := handle([][]byte{read(5, 8<<20)}, bufs)
	runtime.ReadMemStats(&after)
	if n != 0 {
		t.Errorf("READ of 8 MiB: %d bytes, want it refused", n)
	}
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 1<<20 {
		t.Errorf("READ of 8 MiB: the daemon allocated %d bytes for it", grew)
	}

	writeIn := make([]byte, 40)
	binary.LittleEndian.PutUint64(writeIn, fh)
	binary.LittleEndian.PutUint32(writeIn[16:], 2<<20)
	data := make([]byte, 2<<20)
	if n := handle([][]byte{request(opWrite, 6, node, writeIn), data[:1<<20], data[1<<20:]}, [][]byte{out}); n != 0 {
		t.Errorf("WRITE of 2 MiB: %d bytes, want it refused", n)
	}
	binary.LittleEndian.PutUint32(writeIn[16:], 1<<20)
	if n := handle([][]byte{request(opWrite, 7, node, writeIn), data[:1<<19], data[1<<19 : 1<<20]}, [][]byte{out}); n != 16+8 {
		t.Errorf("WRITE of 1 MiB: %d bytes, want %d", n, 16+8)
	}
}

// TestInitDirectIOAllowMmap: a client that offers FUSE_DIRECT_IO_ALLOW_MMAP
// (Linux 6.6+, e.g. Debian's 6.12) gets it, so that it maps direct-I/O
// files MAP_SHARED instead of failing with ENODEV; one that does not
// (6.1) is not sent it.
func TestInitDirectIOAllowMmap(t *testing.T) {
	const initExt = 1 << 30 // FUSE_INIT_EXT: flags2 is valid
	const allowMmap2 = uint32(fuse.CAP_DIRECT_IO_ALLOW_MMAP >> 32)
	for _, tc := range []struct {
		name          string
		minor, flags2 uint32
		want          bool
	}{
		{"6.1 client (7.38, no offer)", 38, 0, false},
		{"6.12 client (7.41, offers it)", 41, allowMmap2, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ps, err := NewProtocolServer(Export{Source: t.TempDir(), Options: sharefs.Options{Cache: sharefs.CacheMetadata}}, slog.New(slog.DiscardHandler), false)
			if err != nil {
				t.Fatal(err)
			}
			body := make([]byte, 64)
			binary.LittleEndian.PutUint32(body, 7)
			binary.LittleEndian.PutUint32(body[4:], tc.minor)
			binary.LittleEndian.PutUint32(body[8:], 1<<20)
			binary.LittleEndian.PutUint32(body[12:], initExt)
			binary.LittleEndian.PutUint32(body[16:], tc.flags2)
			out := make([]byte, 4096)
			n, st := ps.HandleRequest([][]byte{request(opInit, 1, 0, body)}, [][]byte{out})
			if st != fuse.OK || n < 16+36 {
				t.Fatalf("INIT: %d bytes, %v", n, st)
			}
			// fuse_init_out after the 16-byte header: flags at 12,
			// flags2 at 32.
			reply := out[16:n]
			flags2 := binary.LittleEndian.Uint32(reply[32:])
			if got := flags2&allowMmap2 != 0; got != tc.want {
				t.Fatalf("DIRECT_IO_ALLOW_MMAP granted = %v, want %v (flags %#x, flags2 %#x)", got, tc.want, binary.LittleEndian.Uint32(reply[12:]), flags2)
			}
		})
	}
}
