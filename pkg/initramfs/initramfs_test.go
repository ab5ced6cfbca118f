package initramfs

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// readNewc parses a newc archive into name -> (mode, data).
func readNewc(t *testing.T, b []byte) map[string]struct {
	mode uint64
	data []byte
} {
	t.Helper()
	out := map[string]struct {
		mode uint64
		data []byte
	}{}
	for off := 0; ; {
		if string(b[off:off+6]) != "070701" {
			t.Fatalf("bad magic at %d", off)
		}
		field := func(i int) uint64 {
			v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
			if err != nil {
				t.Fatal(err)
			}
			return v
		}
		mode, size, nameSize := field(1), int(field(6)), int(field(11))
		name := string(b[off+110 : off+110+nameSize-1])
		off += (110 + nameSize + 3) &^ 3
		if name == "TRAILER!!!" {
			return out
		}
		out[name] = struct {
			mode uint64
			data []byte
		}{mode, b[off : off+size]}
		off += (size + 3) &^ 3
	}
}

func TestBuildWithoutModules(t *testing.T) {
	cache := t.TempDir()
	spec := Spec{Init: []byte("#!init"), Modules: []string{}}
	p, err := Build(spec, cache)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	files := readNewc(t, b)
	if f := files["init"]; string(f.data) != "#!init" || f.mode&0o777 != 0o755 {
		t.Fatalf("init entry %+v", f)
	}
	if f := files["dev/console"]; f.mode&0o170000 != modeChr {
		t.Fatalf("dev/console mode %o", f.mode)
	}
	// Cached: the same spec gives the same file without rebuilding.
	fi, _ := os.Stat(p)
	p2, err := Build(spec, cache)
	if err != nil || p2 != p {
		t.Fatalf("second build %s, %v", p2, err)
	}
	if fi2, _ := os.Stat(p2); !fi2.ModTime().Equal(fi.ModTime()) {
		t.Fatal("cached image was rebuilt")
	}
	// Another init binary is another image.
	p3, _ := Build(Spec{Init: []byte("#!other"), Modules: []string{}}, cache)
	if p3 == p {
		t.Fatal("different init, same cache entry")
	}
}

// TestBuildWithHostModules uses the guest kernels `make kernel` unpacked,
// when present, to check the module closure against real kernels.
func TestBuildWithHostModules(t *testing.T) {
	dirs, _ := filepath.Glob("/var/cache/kiwi-shim/kernels/x86_64/lib/modules/*")
	more, _ := filepath.Glob("/var/cache/kiwi-shim/kernels/x86_64/*/lib/modules/*")
	dirs = append(dirs, more...)
	if len(dirs) == 0 {
		t.Skip("no guest kernel unpacked (make kernel); the integration tests cover this path")
	}
	for _, dir := range dirs {
		p, err := Build(Spec{Init: []byte("x"), ModulesDir: dir}, t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(p)
		files := readNewc(t, b)
		load := string(files["lib/modules/kiwi-box.load"].data) + string(files["lib/modules/kiwi-box.later"].data)
		// Dependencies come first: virtio before virtio_pci, 9pnet
		// before 9p (where the kernel has them as modules).
		for _, pair := range [][2]string{{"/virtio.ko", "/virtio_pci.ko"}, {"/9pnet.ko", "/9p.ko"}, {"/jbd2.ko", "/ext4.ko"}} {
			a, b := bytes.Index([]byte(load), []byte(pair[0])), bytes.Index([]byte(load), []byte(pair[1]))
			if b >= 0 && (a < 0 || a > b) {
				t.Fatalf("%s: %s must be loaded before %s:\n%s", dir, pair[0], pair[1], load)
			}
		}
	}
}
