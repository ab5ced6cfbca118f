package initramfs

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ulikunitz/xz"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// fakeModule returns a minimal relocatable ELF file whose .modinfo
// section holds the given key=value pairs, as a module's does.
func fakeModule(modinfo ...string) []byte {
	le := binary.LittleEndian
	info := []byte(strings.Join(modinfo, "\x00") + "\x00")
	shstr := "\x00.modinfo\x00.shstrtab\x00"
	const ehsize, shentsize = 64, 64
	infoOff := ehsize
	shstrOff := infoOff + len(info)
	shoff := (shstrOff + len(shstr) + 7) &^ 7
	buf := make([]byte, shoff+3*shentsize)
	copy(buf, "\x7fELF\x02\x01\x01")
	le.PutUint16(buf[16:], 1)  // ET_REL
	le.PutUint16(buf[18:], 62) // EM_X86_64
	le.PutUint32(buf[20:], 1)
	le.PutUint64(buf[40:], uint64(shoff))
	le.PutUint16(buf[52:], ehsize)
	le.PutUint16(buf[58:], shentsize)
	le.PutUint16(buf[60:], 3) // null, .modinfo, .shstrtab
	le.PutUint16(buf[62:], 2)
	copy(buf[infoOff:], info)
	copy(buf[shstrOff:], shstr)
	section := func(i int, name, typ uint32, off, size int) {
		h := buf[shoff+i*shentsize:]
		le.PutUint32(h[0:], name)
		le.PutUint32(h[4:], typ)
		le.PutUint64(h[24:], uint64(off))
		le.PutUint64(h[32:], uint64(size))
		le.PutUint64(h[48:], 1)
	}
	section(1, 1, 1, infoOff, len(info))    // PROGBITS
	section(2, 10, 3, shstrOff, len(shstr)) // STRTAB
	return buf
}

func xzBytes(t *testing.T, b []byte) []byte {
	t.Helper()
	var out bytes.Buffer
	w, err := xz.NewWriter(&out)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// TestBuildCompressedModules: a kernel that ships its modules as .ko.xz
// (Debian's 6.12) gets them decompressed into the initramfs, in
// dependency order, and what it has built in is neither looked for nor
// loaded.
func TestBuildCompressedModules(t *testing.T) {
	mods := filepath.Join(t.TempDir(), "lib", "modules", "6.12.1+deb12-amd64")
	fsDir := filepath.Join(mods, "kernel", "fs")
	os.MkdirAll(fsDir, 0o755)
	a := fakeModule("name=a", "depends=b-dep")
	b := fakeModule("name=b_dep", "depends=")
	plain := fakeModule("name=plain", "softdep=pre: b_dep")
	os.WriteFile(filepath.Join(fsDir, "a.ko.xz"), xzBytes(t, a), 0o644)
	os.WriteFile(filepath.Join(fsDir, "b-dep.ko.xz"), xzBytes(t, b), 0o644)
	os.WriteFile(filepath.Join(fsDir, "plain.ko"), plain, 0o644)
	os.WriteFile(filepath.Join(mods, "modules.builtin"), []byte("kernel/fs/fuse/fuse.ko\nkernel/drivers/virtio/virtio_pci.ko\n"), 0o644)

	p, err := Build(Spec{Init: []byte("x"), ModulesDir: mods, Modules: []string{"virtio_pci", "a", "fuse", "plain", "missing"}}, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(p)
	files := readNewc(t, raw)
	load := strings.Fields(string(files["lib/modules/kiwi-box.load"].data))
	want := []string{"/lib/modules/kiwi-box/kernel/fs/b-dep.ko", "/lib/modules/kiwi-box/kernel/fs/a.ko", "/lib/modules/kiwi-box/kernel/fs/plain.ko"}
	if strings.Join(load, " ") != strings.Join(want, " ") {
		t.Fatalf("load list %q, want %q", load, want)
	}
	for name, data := range map[string][]byte{"b-dep.ko": b, "a.ko": a, "plain.ko": plain} {
		if got := files["lib/modules/kiwi-box/kernel/fs/"+name].data; !bytes.Equal(got, data) {
			t.Errorf("%s in the archive is not the decompressed module (%d bytes, want %d)", name, len(got), len(data))
		}
	}
}

func TestReadModuleCorrupt(t *testing.T) {
	p := filepath.Join(t.TempDir(), "bad.ko.xz")
	os.WriteFile(p, []byte("not xz at all"), 0o644)
	if _, err := readModule(p); err == nil || !strings.Contains(err.Error(), "bad.ko.xz") {
		t.Fatalf("corrupt module: %v", err)
	}
}

// TestBuildLaterModules: the modules asked for later are listed apart,
// in dependency order, without what the box loads before its process (a
// shared dependency loads once, early).
func TestBuildLaterModules(t *testing.T) {
	mods := filepath.Join(t.TempDir(), "lib", "modules", "6.1.0-99-amd64")
	fsDir := filepath.Join(mods, "kernel", "fs")
	os.MkdirAll(fsDir, 0o755)
	for name, info := range map[string][]string{
		"shared.ko": {"name=shared", "depends="},
		"early.ko":  {"name=early", "depends=shared"},
		"bench.ko":  {"name=bench", "depends="},
		"big.ko":    {"name=big", "depends=shared,bench"},
		"small.ko":  {"name=small", "depends="},
	} {
		os.WriteFile(filepath.Join(fsDir, name), fakeModule(info...), 0o644)
	}
	p, err := Build(Spec{Init: []byte("x"), ModulesDir: mods, Modules: []string{"early"}, Later: []string{"big", "small", "early"}}, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(p)
	files := readNewc(t, raw)
	dir := "/lib/modules/kiwi-box/kernel/fs/"
	for list, want := range map[string][]string{
		vmproto.ModuleLoadList:  {dir + "shared.ko", dir + "early.ko"},
		vmproto.ModuleLaterList: {dir + "bench.ko", dir + "big.ko", dir + "small.ko"},
	} {
		if got := strings.Fields(string(files[strings.TrimPrefix(list, "/")].data)); strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("%s = %q, want %q", list, got, want)
		}
	}
	for _, f := range []string{"shared.ko", "early.ko", "bench.ko", "big.ko", "small.ko"} {
		if _, ok := files["lib/modules/kiwi-box/kernel/fs/"+f]; !ok {
			t.Errorf("%s not in the archive", f)
		}
	}
}
