package vm

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

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
// ports instead, and its RAM is a shared memfd as virtio-fs needs; the
// box's QEMU is started with the same command line plus the back ends of
// its devices, loads the template stopped, gets the devices hot-plugged
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
const templateLayout = "kiwi-shim template 1"

// Template files in a template directory.
const (
	templateExt     = ".tmpl"
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
// by path, size and modification time, so that a replaced one makes
// another template.
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
		fi, err := os.Stat(f.path)
		if err != nil {
			return "", fmt.Errorf("template key: %s: %w", f.what, err)
		}
		fmt.Fprintf(h, "%s %q %d %d\n", f.what, f.path, fi.Size(), fi.ModTime().UnixNano())
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
}

// templateMeta is the record beside a template file.
type templateMeta struct {
	Size   int64         `json:"size"`
	Made   time.Time     `json:"made"`
	MakeIn time.Duration `json:"makeIn"` // boot and save, for the benchmarks
	Key    string        `json:"key"`
}

// templatePaths returns the template file and its record for key in dir.
func templatePaths(dir, key string) (file, meta string) {
	return filepath.Join(dir, key+templateExt), filepath.Join(dir, key+templateMetaExt)
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
	if json.Unmarshal(b, &md) != nil || md.Key != key || md.Size <= 0 {
		return TemplateRef{}, false
	}
	fi, err := os.Stat(file)
	if err != nil || !fi.Mode().IsRegular() || fi.Size() != md.Size {
		return TemplateRef{}, false
	}
	return TemplateRef{Path: file, Size: md.Size}, true
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
	if err := os.Remove(t.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
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

// commitTemplate moves a finished migration stream at tmp into place as
// the template of key in dir and writes its record: first the file, then
// the record, so that a record always names a complete file
// (LookupTemplate checks the size).
func commitTemplate(dir, key, tmp string, makeIn time.Duration) (TemplateRef, error) {
	f, err := os.Open(tmp)
	if err != nil {
		return TemplateRef{}, err
	}
	fi, err := f.Stat()
	if err == nil {
		err = f.Sync()
	}
	f.Close()
	if err != nil {
		return TemplateRef{}, err
	}
	if fi.Size() == 0 {
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
	b, err := json.Marshal(templateMeta{Size: fi.Size(), Made: time.Now().UTC(), MakeIn: makeIn, Key: key})
	if err != nil {
		return TemplateRef{}, err
	}
	if err := writeFileAtomic(meta, b); err != nil {
		return TemplateRef{}, err
	}
	return TemplateRef{Path: file, Size: fi.Size()}, nil
}

// shellQuote quotes a path for the shell that QEMU's exec: migration
// runs; paths with a quote are refused.
func shellQuote(p string) (string, error) {
	if strings.ContainsAny(p, "'\n\x00") {
		return "", fmt.Errorf("path %q cannot be handed to QEMU's migration", p)
	}
	return "'" + p + "'", nil
}
