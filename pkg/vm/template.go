package vm

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/cacheuse"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// A template is a guest booted to the point where kiwi-box-init waits for
// its configuration, saved with QEMU's migration stream into a file.
// A box restored from it skips the kernel's boot and the module loading
// (a cold boot under TCG takes seconds; a restore a fraction of one).
//
// The template's machine has no device of any container: vhost-user-fs
// devices cannot be migrated by QEMU 7.2, and a container's shares, NICs
// and scratch disk are its own. It has HotplugPorts empty PCIe root
// ports instead. Its RAM is a file (shared, as virtio-fs needs), saved
// beside the stream and left out of it (QEMU's x-ignore-shared): a box
// gets a memfd holding a copy of that file's data (a sparse copy: only
// the pages the template's guest touched) as its RAM. So a restore reads
// only what the guest used, and a restored box holds only that much host
// memory, where a stream with the RAM in it makes QEMU touch, and so
// allocate, every page of the shared RAM. The box's QEMU is started with
// the same command line plus the back ends of its devices, loads the
// template stopped, gets the devices hot-plugged
// on those ports (HotplugCommands), continues, and only then gets the
// container's configuration. The guest waits (bounded) for the devices
// its configuration names.
//
// Everything a template is made of is in its key (TemplateKey): a
// different QEMU, kernel, initramfs (which holds kiwi-box-init), memory
// size, CPU count or machine layout is another template, made on its
// first use.

// HotplugPorts is the number of empty PCIe root ports of a template's
// machine: a box restored from it gets at most this many devices (its
// shares, NICs and disks); one that needs more boots cold.
const HotplugPorts = 12

// hotplugPortPrefix names the root ports (hp0, hp1, ...).
const hotplugPortPrefix = "hp"

// templateLayout versions the template machine's layout and the guest's
// state at the save: a change of either makes other templates.
const templateLayout = "kiwi-shim template 2"

// Template files in a template directory.
const (
	templateExt     = ".tmpl"
	templateRAMExt  = ".ram"
	templateMetaExt = ".json"
)

// QMPCommand is one QMP command with its arguments.
type QMPCommand struct {
	Execute   string         `json:"execute"`
	Arguments map[string]any `json:"arguments,omitempty"`
}

// HotplugCommands returns the QMP commands that attach the machine's
// container devices (its virtio-fs shares, disks, NICs and 9p shares)
// to a guest restored into it, one per root port. Their back ends are on
// QEMU's command line (Args), except the virtio-fs sockets, which the
// first commands connect.
func (m Machine) HotplugCommands() ([]QMPCommand, error) {
	if _, err := m.Args(); err != nil {
		return nil, err
	}
	var cmds []QMPCommand
	port := 0
	add := func(args map[string]any) error {
		if port >= HotplugPorts {
			return fmt.Errorf("the box needs more than the template's %d device slots", HotplugPorts)
		}
		args["bus"] = hotplugPortPrefix + strconv.Itoa(port)
		port++
		cmds = append(cmds, QMPCommand{Execute: "device_add", Arguments: args})
		return nil
	}
	for i, v := range m.VirtioFS {
		id := "vfs" + strconv.Itoa(i)
		cmds = append(cmds, QMPCommand{Execute: "chardev-add", Arguments: map[string]any{
			"id": id,
			"backend": map[string]any{"type": "socket", "data": map[string]any{
				"addr":   map[string]any{"type": "unix", "data": map[string]any{"path": v.Socket}},
				"server": false,
			}},
		}})
		if err := add(map[string]any{"driver": "vhost-user-fs-pci", "id": "dev-" + id, "chardev": id, "tag": v.Tag, "queue-size": vhostQueueSize}); err != nil {
			return nil, err
		}
	}
	for i, d := range m.Disks {
		id := "disk" + strconv.Itoa(i)
		if err := add(map[string]any{"driver": "virtio-blk-pci", "id": "dev-" + id, "drive": id, "serial": d.Serial}); err != nil {
			return nil, err
		}
	}
	if m.Network == NetUser {
		if err := add(map[string]any{"driver": "virtio-net-pci", "id": "dev-net0", "netdev": "net0", "mac": userMAC}); err != nil {
			return nil, err
		}
	}
	for i, mac := range m.TapMACs {
		id := "tap" + strconv.Itoa(i)
		if err := add(map[string]any{"driver": "virtio-net-pci", "id": "dev-" + id, "netdev": id, "mac": mac}); err != nil {
			return nil, err
		}
	}
	for i, s := range m.Shares {
		id := "fs" + strconv.Itoa(i)
		if err := add(map[string]any{"driver": "virtio-9p-pci", "id": "dev-" + id, "fsdev": id, "mount_tag": s.Tag}); err != nil {
			return nil, err
		}
	}
	return cmds, nil
}

// TemplateMachine returns the machine a template of m is made from:
// m's QEMU, architecture, accelerator, size, kernel, initramfs and
// command line, the template's layout, and no container device.
func TemplateMachine(m Machine) Machine {
	return Machine{
		QEMU: m.QEMU, Arch: m.Arch, Accel: m.Accel, MemoryMiB: m.MemoryMiB, CPUs: m.CPUs,
		Kernel: m.Kernel, Initrd: m.Initrd, Cmdline: m.Cmdline, Network: NetNone, Hotplug: true,
	}
}

// TemplateKey names the template of machine m: a hash of everything the
// saved guest depends on. Files (QEMU, the kernel, the initramfs) count
// by path, size, device and inode, so that a replaced one (written anew
// and renamed into place, as setup, the caches and package managers do)
// makes another template. Not by modification time: the cache moves the
// initramfs' and unpacked kernel's forward to mark them used (cacheuse).
func TemplateKey(m Machine) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "%s\nprotocol %d\narch %s\naccel %s\nmemory %d\ncpus %d\ncmdline %q\nports %d\n",
		templateLayout, vmproto.Version, m.Arch, m.Accel, m.MemoryMiB, m.CPUs, m.Cmdline, HotplugPorts)
	qemu := m.QEMU
	if !filepath.IsAbs(qemu) {
		p, err := exec.LookPath(qemu)
		if err != nil {
			return "", fmt.Errorf("template key: %w", err)
		}
		qemu = p
	}
	for _, f := range []struct{ what, path string }{{"qemu", qemu}, {"kernel", m.Kernel}, {"initrd", m.Initrd}} {
		var st unix.Stat_t
		if err := unix.Stat(f.path, &st); err != nil {
			return "", fmt.Errorf("template key: %s %s: %w", f.what, f.path, err)
		}
		fmt.Fprintf(h, "%s %q %d %d %d\n", f.what, f.path, st.Size, st.Dev, st.Ino)
	}
	return hex.EncodeToString(h.Sum(nil)[:16]), nil
}

// TemplateRef is a template a box is restored from.
type TemplateRef struct {
	// Path is the template file.
	Path string `json:"path"`
	// Size is its size when it was made: a file of another size is
	// truncated or replaced, and not loaded.
	Size int64 `json:"size"`
	// RAM is the guest's RAM file, of RAMSize bytes.
	RAM     string `json:"ram"`
	RAMSize int64  `json:"ramSize"`
}

// templateMeta is the record beside a template file.
type templateMeta struct {
	Size    int64         `json:"size"`
	RAMSize int64         `json:"ramSize"`
	Made    time.Time     `json:"made"`
	MakeIn  time.Duration `json:"makeIn"` // boot and save, for the benchmarks
	Key     string        `json:"key"`
}

// templatePaths returns the template file and its record for key in dir.
func templatePaths(dir, key string) (file, meta string) {
	return filepath.Join(dir, key+templateExt), filepath.Join(dir, key+templateMetaExt)
}

// templateRAMPath returns the RAM file of the template file.
func templateRAMPath(file string) string {
	return strings.TrimSuffix(file, templateExt) + templateRAMExt
}

// LookupTemplate returns the template of key in dir, if there is a
// complete one: its file and its record, of the size the record says.
func LookupTemplate(dir, key string) (TemplateRef, bool) {
	file, meta := templatePaths(dir, key)
	b, err := os.ReadFile(meta)
	if err != nil {
		return TemplateRef{}, false
	}
	var md templateMeta
	if json.Unmarshal(b, &md) != nil || md.Key != key || md.Size <= 0 || md.RAMSize <= 0 {
		return TemplateRef{}, false
	}
	ram := templateRAMPath(file)
	for _, f := range []struct {
		path string
		size int64
	}{{file, md.Size}, {ram, md.RAMSize}} {
		fi, err := os.Stat(f.path)
		if err != nil || !fi.Mode().IsRegular() || fi.Size() != f.size {
			return TemplateRef{}, false
		}
	}
	// Used now: gc removes templates unused for its cache age.
	for _, f := range []string{meta, file, ram} {
		cacheuse.Hit(f, time.Now())
	}
	return TemplateRef{Path: file, Size: md.Size, RAM: ram, RAMSize: md.RAMSize}, true
}

// TemplateMakeTime returns how long the template of key in dir took to
// make (boot and save), as recorded when it was made.
func TemplateMakeTime(dir, key string) (time.Duration, error) {
	_, meta := templatePaths(dir, key)
	b, err := os.ReadFile(meta)
	if err != nil {
		return 0, err
	}
	var md templateMeta
	if err := json.Unmarshal(b, &md); err != nil {
		return 0, fmt.Errorf("template record %s: %w", meta, err)
	}
	return md.MakeIn, nil
}

// RemoveTemplate removes a template that failed to load, its record
// first, so that it is made again on its next use.
func RemoveTemplate(t TemplateRef) error {
	dir, base := filepath.Split(t.Path)
	key := strings.TrimSuffix(base, templateExt)
	_, meta := templatePaths(dir, key)
	if err := os.Remove(meta); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	for _, f := range []string{t.Path, templateRAMPath(t.Path)} {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return nil
}

// openTemplate opens a template for QEMU to load and checks that it is
// the file that was made (its size): a truncated one is refused here,
// before QEMU starts.
func openTemplate(t TemplateRef) (*os.File, error) {
	f, err := os.Open(t.Path)
	if err != nil {
		return nil, fmt.Errorf("template: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("template: %w", err)
	}
	if !fi.Mode().IsRegular() || fi.Size() != t.Size {
		f.Close()
		return nil, fmt.Errorf("template %s has %d bytes, %d were saved: truncated or replaced", t.Path, fi.Size(), t.Size)
	}
	return f, nil
}

// writeFileAtomic writes b to path through a temporary file in the same
// directory and a rename, so that a reader sees the old file or the new
// one, never part of one.
func writeFileAtomic(path string, b []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// commitTemplate moves a finished migration stream at tmp and the RAM
// file at tmpRAM into place as the template of key in dir and writes its
// record: first the files, then the record, so that a record always
// names complete files (LookupTemplate checks the sizes).
func commitTemplate(dir, key, tmp, tmpRAM string, makeIn time.Duration) (TemplateRef, error) {
	size, err := syncedSize(tmp)
	if err != nil {
		return TemplateRef{}, err
	}
	ramSize, err := syncedSize(tmpRAM)
	if err != nil {
		return TemplateRef{}, err
	}
	if size == 0 || ramSize == 0 {
		return TemplateRef{}, errors.New("QEMU saved an empty template")
	}
	file, meta := templatePaths(dir, key)
	// A record of an older file goes first: it would name the new one
	// with the old size until it is replaced.
	if err := os.Remove(meta); err != nil && !errors.Is(err, os.ErrNotExist) {
		return TemplateRef{}, err
	}
	if err := os.Rename(tmp, file); err != nil {
		return TemplateRef{}, err
	}
	if err := os.Rename(tmpRAM, templateRAMPath(file)); err != nil {
		return TemplateRef{}, err
	}
	b, err := json.Marshal(templateMeta{Size: size, RAMSize: ramSize, Made: time.Now().UTC(), MakeIn: makeIn, Key: key})
	if err != nil {
		return TemplateRef{}, err
	}
	if err := writeFileAtomic(meta, b); err != nil {
		return TemplateRef{}, err
	}
	return TemplateRef{Path: file, Size: size, RAM: templateRAMPath(file), RAMSize: ramSize}, nil
}

// syncedSize flushes the file at path to disk and returns its size.
func syncedSize(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err == nil {
		err = f.Sync()
	}
	if err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	return fi.Size(), nil
}

// openTemplateRAM returns a memfd that holds a copy of the template's
// RAM file: its data only (SEEK_DATA/SEEK_HOLE), the holes stay holes,
// so the copy takes the host memory the template's guest used, not its
// RAM size. A file of another size than the template's record is
// refused.
func openTemplateRAM(t TemplateRef) (*os.File, error) {
	src, err := os.Open(t.RAM)
	if err != nil {
		return nil, fmt.Errorf("template RAM: %w", err)
	}
	defer src.Close()
	fi, err := src.Stat()
	if err != nil {
		return nil, fmt.Errorf("template RAM: %w", err)
	}
	if !fi.Mode().IsRegular() || fi.Size() != t.RAMSize {
		return nil, fmt.Errorf("template RAM %s has %d bytes, %d were saved: truncated or replaced", t.RAM, fi.Size(), t.RAMSize)
	}
	fd, err := unix.MemfdCreate("kiwi-guest-ram", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("template RAM: memfd: %w", err)
	}
	dst := os.NewFile(uintptr(fd), "kiwi-guest-ram")
	if err := copySparse(dst, src, t.RAMSize); err != nil {
		dst.Close()
		return nil, fmt.Errorf("template RAM %s: %w", t.RAM, err)
	}
	return dst, nil
}

// copySparse makes dst a copy of the size bytes of src, writing only
// src's data segments.
func copySparse(dst, src *os.File, size int64) error {
	if err := dst.Truncate(size); err != nil {
		return err
	}
	sfd := int(src.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(sfd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // only a hole up to the end
		}
		if err != nil {
			return fmt.Errorf("seek data: %w", err)
		}
		hole, err := unix.Seek(sfd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("seek hole: %w", err)
		}
		hole = min(hole, size)
		if _, err := io.Copy(io.NewOffsetWriter(dst, data), io.NewSectionReader(src, data, hole-data)); err != nil {
			return err
		}
		off = hole
	}
	return nil
}

// shellQuote quotes a path for the shell that QEMU's exec: migration
// runs; paths with a quote are refused.
func shellQuote(p string) (string, error) {
	if strings.ContainsAny(p, "'\n\x00") {
		return "", fmt.Errorf("path %q cannot be handed to QEMU's migration", p)
	}
	return "'" + p + "'", nil
}
