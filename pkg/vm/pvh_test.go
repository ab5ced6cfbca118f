package vm

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestUnpackPVHDebian unpacks the guest kernels this machine has (Debian's
// 6.1, XZ, and 6.12, zstd) and checks their PVH note; the VM tests boot
// them.
func TestUnpackPVHDebian(t *testing.T) {
	images, _ := filepath.Glob("/var/cache/kiwi-shim/kernels/x86_64/boot/vmlinuz-*")
	more, _ := filepath.Glob("/var/cache/kiwi-shim/kernels/x86_64/*/boot/vmlinuz-*")
	images = append(images, more...)
	if len(images) == 0 {
		t.Skip("no guest kernel unpacked (make kernel); the integration tests boot it")
	}
	cache := t.TempDir()
	for _, img := range images {
		start := time.Now()
		p, err := UnpackPVH(img, cache)
		if err != nil {
			t.Fatalf("%s: %v", img, err)
		}
		t.Logf("%s -> %s in %s", filepath.Base(img), filepath.Base(p), time.Since(start).Round(time.Millisecond))
		again, err := UnpackPVH(img, cache)
		if err != nil || again != p {
			t.Fatalf("second unpack: %s, %v; want the cached %s", again, err, p)
		}
	}
}

// bzImage builds a minimal bzImage around payload.
func bzImage(payload []byte, version uint16) []byte {
	b := make([]byte, 5*512, 5*512+len(payload))
	copy(b[bzMagic:], "HdrS")
	binary.LittleEndian.PutUint16(b[bzVersion:], version)
	b[bzSetupSects] = 4
	binary.LittleEndian.PutUint32(b[bzPayloadOffset:], 0)
	binary.LittleEndian.PutUint32(b[bzPayloadLength:], uint32(len(payload)))
	return append(b, payload...)
}

func gzipped(t *testing.T, b []byte) []byte {
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	if _, err := w.Write(b); err != nil {
		t.Fatal(err)
	}
	w.Close()
	return buf.Bytes()
}

func TestUnpackBzImageRefuses(t *testing.T) {
	tests := []struct {
		name, want string
		image      []byte
	}{
		{"too short", "not a bzImage", []byte("MZ")},
		{"no magic", "not a bzImage", make([]byte, 4096)},
		{"old protocol", "before 2.08", bzImage([]byte("x"), 0x206)},
		{"lz4 payload", "not read here", bzImage([]byte{0x02, 0x21, 0x4c, 0x18, 0, 0, 0, 0, 0, 0}, 0x20f)},
		{"gzip cut short", "unpack bzImage payload", bzImage(append(gzipped(t, make([]byte, 1000))[:20], 0xe8, 3, 0, 0), 0x20f)},
		{"gzip of another size", "the image says 4", bzImage(append(gzipped(t, make([]byte, 1000)), 4, 0, 0, 0), 0x20f)},
		{"corrupt xz", "xz payload", bzImage([]byte("\xfd7zXZ\x00garbage\x01\x00\x00\x00"), 0x20f)},
		{"payload beyond the file", "outside the file", func() []byte {
			b := bzImage([]byte("abc"), 0x20f)
			binary.LittleEndian.PutUint32(b[bzPayloadLength:], 1<<30)
			return b
		}()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := unpackBzImage(tt.image)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("unpackBzImage: %v, want an error with %q", err, tt.want)
			}
		})
	}
}

func TestCheckPVHRefuses(t *testing.T) {
	if err := checkPVH([]byte("not elf")); err == nil {
		t.Fatal("checkPVH accepted a non-ELF file")
	}
	self, err := os.ReadFile("/proc/self/exe") // an x86-64 ELF file without Xen notes
	if err != nil {
		t.Fatal(err)
	}
	if err := checkPVH(self); err == nil || !strings.Contains(err.Error(), "no PVH entry point") {
		t.Fatalf("checkPVH of the test binary: %v", err)
	}
}

func TestHasNote(t *testing.T) {
	note := func(name string, typ uint32, desc []byte) []byte {
		var b bytes.Buffer
		n := append([]byte(name), 0)
		binary.Write(&b, binary.LittleEndian, []uint32{uint32(len(n)), uint32(len(desc)), typ})
		b.Write(n)
		for b.Len()%4 != 0 {
			b.WriteByte(0)
		}
		b.Write(desc)
		for b.Len()%4 != 0 {
			b.WriteByte(0)
		}
		return b.Bytes()
	}
	seg := append(note("GNU", 3, []byte("build-id")), note("Xen", 18, []byte{0, 0, 0, 1})...)
	if !hasNote(seg, "Xen", 18, binary.LittleEndian) {
		t.Fatal("PVH note not found")
	}
	if hasNote(seg[:len(seg)-3], "Xen", 18, binary.LittleEndian) {
		t.Fatal("a truncated note was taken")
	}
	if hasNote(note("Xen", 5, nil), "Xen", 18, binary.LittleEndian) {
		t.Fatal("another Xen note was taken for the entry point")
	}
}
