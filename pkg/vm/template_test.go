package vm

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// templateFiles makes a QEMU, kernel and initramfs stand-in in a fresh
// directory and returns a machine that names them.
func templateFiles(t *testing.T) Machine {
	t.Helper()
	dir := t.TempDir()
	m := Machine{Arch: "x86_64", Accel: "tcg", MemoryMiB: 2048, CPUs: 2,
		QEMU: filepath.Join(dir, "qemu"), Kernel: filepath.Join(dir, "vmlinux"), Initrd: filepath.Join(dir, "initrd")}
	for _, p := range []string{m.QEMU, m.Kernel, m.Initrd} {
		if err := os.WriteFile(p, []byte(p), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return m
}

func TestTemplateKey(t *testing.T) {
	base := templateFiles(t)
	key, err := TemplateKey(base)
	if err != nil {
		t.Fatal(err)
	}
	again, err := TemplateKey(base)
	if err != nil || again != key {
		t.Fatalf("same machine, key %s then %s (%v)", key, again, err)
	}
	// The cache marks its files used by their modification time: that is
	// the same template.
	later := time.Now().Add(2 * time.Hour)
	for _, f := range []string{base.Initrd, base.Kernel, base.QEMU} {
		os.Chtimes(f, later, later)
	}
	if k, err := TemplateKey(base); err != nil || k != key {
		t.Errorf("a file marked used changed the key: %s, want %s (%v)", k, key, err)
	}
	// A container's devices are not part of the template.
	withDevices := base
	withDevices.Disks = []Disk{{Path: "/scratch", Serial: ScratchSerial}}
	withDevices.TapMACs = []string{"02:00:00:00:00:01"}
	withDevices.VirtioFS = []VirtioFS{{Tag: "rootfs", Socket: "/s"}}
	withDevices.ConsoleLog = "/elsewhere/console.log"
	if k, err := TemplateKey(withDevices); err != nil || k != key {
		t.Errorf("container devices changed the key: %s, want %s (%v)", k, key, err)
	}
	for _, tc := range []struct {
		name   string
		change func(m *Machine)
	}{
		{"memory", func(m *Machine) { m.MemoryMiB = 4096 }},
		{"cpus", func(m *Machine) { m.CPUs = 1 }},
		{"arch", func(m *Machine) { m.Arch = "aarch64" }},
		{"accel", func(m *Machine) { m.Accel = "kvm" }},
		{"cmdline", func(m *Machine) { m.Cmdline = "debug" }},
		{"kernel path", func(m *Machine) {
			p := m.Kernel + ".other"
			os.WriteFile(p, []byte("k"), 0o644)
			m.Kernel = p
		}},
		{"initrd content", func(m *Machine) {
			os.WriteFile(m.Initrd, []byte("another init, another size"), 0o644)
		}},
		{"qemu replaced by a file of the same size", func(m *Machine) {
			b, _ := os.ReadFile(m.QEMU)
			os.WriteFile(m.QEMU+".new", b, 0o755)
			os.Rename(m.QEMU+".new", m.QEMU)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := templateFiles(t)
			k0, err := TemplateKey(m)
			if err != nil {
				t.Fatal(err)
			}
			tc.change(&m)
			k1, err := TemplateKey(m)
			if err != nil {
				t.Fatal(err)
			}
			if k0 == k1 {
				t.Errorf("key unchanged after a change of %s", tc.name)
			}
		})
	}
	missing := base
	missing.Kernel = filepath.Join(t.TempDir(), "none")
	if _, err := TemplateKey(missing); err == nil || !strings.Contains(err.Error(), "kernel") {
		t.Errorf("missing kernel: %v", err)
	}
}

func TestTemplateFiles(t *testing.T) {
	dir := t.TempDir()
	const key = "0123456789abcdef0123456789abcdef"
	if _, ok := LookupTemplate(dir, key); ok {
		t.Fatal("found a template in an empty directory")
	}
	stream := []byte(strings.Repeat("QEVM", 1000))
	tmp := filepath.Join(dir, ".tmp-stream")
	if err := os.WriteFile(tmp, stream, 0o600); err != nil {
		t.Fatal(err)
	}
	const ramSize = 1 << 20
	tmpRAM := filepath.Join(dir, ".tmp-stream.ram")
	if err := os.WriteFile(tmpRAM, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	os.Truncate(tmpRAM, ramSize)
	ref, err := commitTemplate(dir, key, tmp, tmpRAM, 1500*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{tmp, tmpRAM} {
		if _, err := os.Stat(f); !os.IsNotExist(err) {
			t.Errorf("temporary file left: %v", err)
		}
	}
	if ref.Size != int64(len(stream)) || filepath.Dir(ref.Path) != dir || ref.RAMSize != ramSize || ref.RAM != filepath.Join(dir, key+".ram") {
		t.Errorf("ref %+v", ref)
	}
	// A lookup marks the template's files used (gc's cache age), once
	// their mark is older than cacheuse's interval.
	_, metaPath := templatePaths(dir, key)
	old := time.Now().Add(-48 * time.Hour)
	for _, f := range []string{ref.Path, ref.RAM, metaPath} {
		os.Chtimes(f, old, old)
	}
	got, ok := LookupTemplate(dir, key)
	if !ok || got != ref {
		t.Fatalf("lookup: %+v %v, want %+v", got, ok, ref)
	}
	for _, f := range []string{ref.Path, ref.RAM, metaPath} {
		if fi, err := os.Stat(f); err != nil || time.Since(fi.ModTime()) > time.Hour {
			t.Errorf("%s not marked used by the lookup: %v %v", f, fi.ModTime(), err)
		}
	}
	if d, err := TemplateMakeTime(dir, key); err != nil || d != 1500*time.Millisecond {
		t.Errorf("make time %s, %v", d, err)
	}
	f, err := openTemplate(ref)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	ram, err := openTemplateRAM(ref)
	if err != nil {
		t.Fatal(err)
	}
	ram.Close()
	// Only the template, its RAM and its record are left.
	ents, _ := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if want := fmt.Sprintf("[%s.json %s.ram %s.tmpl]", key, key, key); fmt.Sprint(names) != want {
		t.Errorf("directory holds %v, want %s", names, want)
	}

	// A truncated template is neither found nor opened.
	if err := os.Truncate(ref.Path, ref.Size/2); err != nil {
		t.Fatal(err)
	}
	if _, ok := LookupTemplate(dir, key); ok {
		t.Error("truncated template found")
	}
	if _, err := openTemplate(ref); err == nil || !strings.Contains(err.Error(), "truncated") {
		t.Errorf("truncated template opened: %v", err)
	}
	// So is one whose RAM file lost its end.
	os.WriteFile(ref.Path, stream, 0o600)
	os.Truncate(ref.RAM, ramSize/2)
	if _, ok := LookupTemplate(dir, key); ok {
		t.Error("template with a truncated RAM file found")
	}
	if _, err := openTemplateRAM(ref); err == nil || !strings.Contains(err.Error(), "truncated") {
		t.Errorf("truncated RAM file opened: %v", err)
	}
	os.Truncate(ref.RAM, ramSize)
	// A record that names another key, or is no record, is no template.
	if _, ok := LookupTemplate(dir, key); !ok {
		t.Fatal("restored template not found")
	}
	_, meta := templatePaths(dir, key)
	b, _ := json.Marshal(templateMeta{Size: ref.Size, RAMSize: ramSize, Key: "other"})
	os.WriteFile(meta, b, 0o600)
	if _, ok := LookupTemplate(dir, key); ok {
		t.Error("template found through another key's record")
	}
	os.WriteFile(meta, []byte("{"), 0o600)
	if _, ok := LookupTemplate(dir, key); ok {
		t.Error("template found through a broken record")
	}
	// An empty stream is refused.
	empty := filepath.Join(dir, ".tmp-empty")
	os.WriteFile(empty, nil, 0o600)
	if _, err := commitTemplate(dir, key, empty, ref.RAM, 0); err == nil {
		t.Error("empty stream committed")
	}
	// RemoveTemplate takes all three.
	if err := RemoveTemplate(ref); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{ref.Path, ref.RAM, meta} {
		if _, err := os.Stat(f); !os.IsNotExist(err) {
			t.Errorf("%s left after RemoveTemplate: %v", f, err)
		}
	}
}

// TestCopySparse: a box's RAM is a copy of the template's data segments;
// what the template's guest never touched stays a hole, so it takes no
// memory in the box's memfd.
func TestCopySparse(t *testing.T) {
	const size = 8 << 20
	dir := t.TempDir()
	src, err := os.Create(filepath.Join(dir, "ram"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	src.Truncate(size)
	want := make([]byte, size)
	for _, seg := range []struct{ off, n int64 }{{0, 4096}, {3 << 20, 200 << 10}, {size - 8192, 8192}} {
		b := bytes.Repeat([]byte{byte(seg.off>>12) | 1}, int(seg.n))
		if _, err := src.WriteAt(b, seg.off); err != nil {
			t.Fatal(err)
		}
		copy(want[seg.off:], b)
	}
	ref := TemplateRef{RAM: src.Name(), RAMSize: size}
	dst, err := openTemplateRAM(ref)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	got, err := io.ReadAll(io.NewSectionReader(dst, 0, size+1))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the copy differs from the template's RAM")
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(dst.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	// The three segments take 212 KiB; the file is 8 MiB. (The source's
	// file system may round its data segments up to its blocks.)
	if used := st.Blocks * 512; used > 1<<20 {
		t.Errorf("the copy takes %d bytes of memory, want the data only", used)
	}
}

func TestTemplateLock(t *testing.T) {
	p := filepath.Join(t.TempDir(), "k.lock")
	unlock, err := lockTemplate(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	got := make(chan error, 1)
	go func() {
		_, err := lockTemplate(ctx, p)
		got <- err
	}()
	cancel()
	if err := <-got; err == nil {
		t.Error("second lock taken while the first is held")
	}
	unlock()
	unlock2, err := lockTemplate(context.Background(), p)
	if err != nil {
		t.Fatalf("lock after release: %v", err)
	}
	unlock2()
}

func TestShellQuote(t *testing.T) {
	if q, err := shellQuote("/var/cache/kiwi-shim/templates/.k.tmp-1"); err != nil || q != "'/var/cache/kiwi-shim/templates/.k.tmp-1'" {
		t.Errorf("quote: %q %v", q, err)
	}
	for _, bad := range []string{"/a'b", "/a\nb"} {
		if _, err := shellQuote(bad); err == nil {
			t.Errorf("quoted %q", bad)
		}
	}
}

func TestTemplateMachineArgs(t *testing.T) {
	box := Machine{Arch: "x86_64", Accel: "tcg", MemoryMiB: 2048, CPUs: 2, Kernel: "/k", Initrd: "/i",
		ControlSocket: "/s/guest.sock", QMPSocket: "/s/qmp.sock", ConsoleLog: "/s/console.log",
		Network: NetTap, TapMACs: []string{"02:00:00:00:00:01"},
		VirtioFS: []VirtioFS{{Tag: "rootfs", Socket: "/s/v0.sock"}},
		Disks:    []Disk{{Path: "/scratch.img", Serial: ScratchSerial}},
		Shares:   []Share{{Tag: "kiwi1", Path: "/d"}}}
	tm := TemplateMachine(box)
	tm.RAMPath = "/t/k.ram"
	tmpl, err := tm.Args()
	if err != nil {
		t.Fatal(err)
	}
	restore := box
	restore.Hotplug, restore.IncomingFD, restore.RAMPath = true, 4, "/proc/self/fd/5"
	rargs, err := restore.Args()
	if err != nil {
		t.Fatal(err)
	}
	tj, rj := strings.Join(tmpl, " "), strings.Join(rargs, " ")
	// The template and the restore have the same machine: the restore
	// adds back ends only, and the incoming stream.
	for _, want := range []string{"q35,memory-backend=mem", "memory-backend-file,id=mem,share=on,mem-path=",
		"pcie-root-port,id=hp0,chassis=1", fmt.Sprintf("pcie-root-port,id=hp%d,chassis=%d", HotplugPorts-1, HotplugPorts)} {
		if !strings.Contains(tj, want) || !strings.Contains(rj, want) {
			t.Errorf("%q missing:\ntemplate: %s\nrestore: %s", want, tj, rj)
		}
	}
	// The guest's devices, in order, are the template's.
	devices := func(args []string) []string {
		var d []string
		for i, a := range args {
			if (a == "-device" || a == "-machine" || a == "-object") && i+1 < len(args) {
				d = append(d, args[i+1])
			}
		}
		return d
	}
	// The RAM is the template's file when it is made, the box's copy
	// when it is restored: the same RAM block either way.
	if !strings.Contains(tj, "mem-path=/t/k.ram,size=2048M") || !strings.Contains(rj, "mem-path=/proc/self/fd/5,size=2048M") {
		t.Errorf("RAM files:\ntemplate: %s\nrestore: %s", tj, rj)
	}
	sameRAM := strings.NewReplacer("/t/k.ram", "RAM", "/proc/self/fd/5", "RAM")
	if td, rd := sameRAM.Replace(fmt.Sprint(devices(tmpl))), sameRAM.Replace(fmt.Sprint(devices(rargs))); td != rd {
		t.Errorf("restore's devices differ from the template's:\ntemplate: %v\nrestore:  %v", td, rd)
	}
	for _, dev := range []string{"virtio-net-pci", "vhost-user-fs-pci", "virtio-blk-pci", "virtio-9p-pci", "socket,id=vfs0", "-S", "-incoming"} {
		if strings.Contains(tj, dev) {
			t.Errorf("template has %q: %s", dev, tj)
		}
	}
	for _, want := range []string{"-netdev tap,id=tap0,fd=3", "if=none,id=disk0", "-fsdev local,id=fs0", "-S -incoming defer"} {
		if !strings.Contains(rj, want) {
			t.Errorf("restore lacks %q: %s", want, rj)
		}
	}
	for _, dev := range []string{"-device virtio-net-pci", "-device vhost-user-fs-pci", "-device virtio-blk-pci", "-device virtio-9p-pci", "socket,id=vfs0"} {
		if strings.Contains(rj, dev) {
			t.Errorf("restore has %q on its command line: %s", dev, rj)
		}
	}
	cmds, err := restore.HotplugCommands()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range cmds {
		s := c.Execute
		if d, ok := c.Arguments["driver"]; ok {
			s += " " + fmt.Sprint(d) + "@" + fmt.Sprint(c.Arguments["bus"])
		}
		got = append(got, s)
	}
	want := "[chardev-add device_add vhost-user-fs-pci@hp0 device_add virtio-blk-pci@hp1 device_add virtio-net-pci@hp2 device_add virtio-9p-pci@hp3]"
	if fmt.Sprint(got) != want {
		t.Errorf("hot-plug commands %v, want %s", got, want)
	}
	if mac := cmds[3].Arguments["mac"]; mac != "02:00:00:00:00:01" {
		t.Errorf("NIC's MAC %v", mac)
	}
	// More devices than ports: the box boots cold.
	many := restore
	for i := range HotplugPorts {
		many.Shares = append(many.Shares, Share{Tag: fmt.Sprintf("s%d", i), Path: "/d"})
	}
	if _, err := many.HotplugCommands(); err == nil {
		t.Error("more devices than root ports accepted")
	}
	cold := box
	cold.IncomingFD = 4
	if _, err := cold.Args(); err == nil {
		t.Error("incoming stream into a machine without the template's layout accepted")
	}
}

// TestDrainListener: the connections queued on a listener are taken and
// closed; the listener then accepts a new one as before.
func TestDrainListener(t *testing.T) {
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for range 2 {
		c, err := net.Dial("unix", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	drainListener(l)
	c, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("new")); err != nil {
		t.Fatal(err)
	}
	got, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()
	b := make([]byte, 3)
	if _, err := io.ReadFull(got, b); err != nil || string(b) != "new" {
		t.Fatalf("accepted after the drain: %q %v, want the new connection", b, err)
	}
}

// TestLoadFailed: QEMU's log of a stream it refused, and others.
func TestLoadFailed(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		log  string
		want bool
	}{
		{"qemu-system-x86_64: Not a migration stream\nqemu-system-x86_64: load of migration failed: Invalid argument\n", true},
		{"qemu-system-x86_64: warning: netdev tap0 has no peer\n", false},
		{"", false},
	} {
		p := filepath.Join(dir, "qemu.log")
		if err := os.WriteFile(p, []byte(c.log), 0o600); err != nil {
			t.Fatal(err)
		}
		if got := loadFailed(p); got != c.want {
			t.Errorf("loadFailed(%q) = %v, want %v", c.log, got, c.want)
		}
	}
	if loadFailed(filepath.Join(dir, "none")) {
		t.Error("loadFailed of a missing log")
	}
}
