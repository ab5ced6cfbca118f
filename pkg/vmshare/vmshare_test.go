package vmshare

import (
	"encoding/binary"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/kiwi-shim/kiwi-shim/pkg/sharefs"
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
	return request(26, 1, 0, body)
}

// FuzzHandleRequest sends arbitrary FUSE requests (as a guest could put
// them in a virtqueue) to an export: the server answers or refuses, never
// panics, never replies more than the buffer holds, and never touches
// anything outside the export.
func FuzzHandleRequest(f *testing.F) {
	f.Add(request(1, 2, 1, []byte("file\x00")))                             // LOOKUP
	f.Add(request(1, 2, 1, []byte("../canary/secret\x00")))                 // LOOKUP escape
	f.Add(request(9, 3, 1, append(make([]byte, 8), []byte("../x\x00")...))) // MKDIR escape
	f.Add(request(6, 4, 1, []byte("/etc/passwd\x00link\x00")))              // SYMLINK
	f.Add(request(45, 5, 1, append(make([]byte, 16), []byte("file\x00../moved\x00")...)))
	f.Add([]byte{1, 2, 3})
	// One export for the whole run, as one guest sends a stream of
	// requests (and every root holds a descriptor).
	base := f.TempDir()
	export, canary := filepath.Join(base, "export"), filepath.Join(base, "canary")
	os.Mkdir(export, 0o755)
	os.Mkdir(canary, 0o755)
	os.WriteFile(filepath.Join(export, "file"), []byte("inside"), 0o644)
	os.WriteFile(filepath.Join(canary, "secret"), []byte("canary"), 0o644)
	ps, err := NewProtocolServer(Export{Source: export, Options: sharefs.Options{Xattr: true}}, slog.New(slog.DiscardHandler))
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
	ps, err := NewProtocolServer(Export{Source: t.TempDir()}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, 4096)
	ps.HandleRequest([][]byte{initRequest()}, [][]byte{out})
	// GETATTR of a node id the guest never looked up.
	n, st := ps.HandleRequest([][]byte{request(3, 9, 12345, make([]byte, 16))}, [][]byte{out})
	if st == fuse.OK && n > 16 {
		t.Fatalf("GETATTR of an unknown node answered %d bytes", n)
	}
}
