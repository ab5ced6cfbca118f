package initramfs

import (
	"bufio"
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Modules a box needs before its process starts, by purpose. Names use
// underscores, as the kernel does. Modules the kernel has built in, or
// does not have at all, are skipped: whether a share type works is
// checked when it is mounted.
var Modules = []string{
	// first: libcrc32c (ext4, xfs, btrfs) asks the crypto API for crc32c
	// when it loads, a soft dependency that modinfo's depends= omits
	"crc32c_generic",
	// devices QEMU gives the box
	"virtio_pci", "virtio_mmio", "virtio_console", "virtio_blk", "virtio_net", "virtio_rng",
	// the default share
	"virtiofs", "fuse",
	// device nodes a build opens rather than mounts: nothing would load
	// them on first use (/dev/loop-control, /dev/mapper/control)
	"loop", "dm_mod", "af_packet",
}

// LaterModules are file systems, which the kernel asks for when they are
// mounted: the guest loads them in the background, in this order, while
// the box is set up and starts (btrfs alone benchmarks RAID6 and XOR
// routines for seconds under TCG when it loads), and a mount that asks
// the kernel for one of them meanwhile waits until it is there
// (kiwi-box-init answers the kernel's module requests).
var LaterModules = []string{
	// first, as a box's setup may mount them: the scratch disk's file
	// system, 9p shares (io.kiwi-shim.share=9p), overlay
	"ext4", "9pnet_virtio", "9p", "overlay",
	"xfs", "btrfs", "squashfs", "vfat", "isofs",
	// Debian's kernels mount FAT with iocharset=ascii by default
	// (CONFIG_FAT_DEFAULT_IOCHARSET): KIWI's EFI partition needs it
	"nls_cp437", "nls_iso8859_1", "nls_utf8", "nls_ascii",
}

// modIndex maps module names to their files below a modules directory.
type modIndex struct {
	root    string // lib/modules/<release>
	byName  map[string]string
	builtin map[string]bool
	// images holds the decompressed modules read so far, by path: the
	// closure reads each one for its dependencies, the archive again.
	images map[string][]byte
}

// image returns the ELF image of the module file at path.
func (idx *modIndex) image(path string) ([]byte, error) {
	if b, ok := idx.images[path]; ok {
		return b, nil
	}
	b, err := readModule(path)
	if err != nil {
		return nil, err
	}
	idx.images[path] = b
	return b, nil
}

// moduleSuffixes are the file name endings of kernel modules: plain, and
// compressed as Debian's kernels since 6.x ship them (.ko.xz).
var moduleSuffixes = []string{".ko", ".ko.xz", ".ko.zst", ".ko.gz"}

// moduleBase returns a module file's name without its compression
// suffix (name.ko), or "" if the file is no module.
func moduleBase(file string) string {
	n := filepath.Base(file)
	for _, suf := range moduleSuffixes {
		if b, ok := strings.CutSuffix(n, suf); ok {
			return b + ".ko"
		}
	}
	return ""
}

func modName(file string) string {
	n := strings.TrimSuffix(filepath.Base(file), ".ko")
	if b := moduleBase(file); b != "" {
		n = strings.TrimSuffix(b, ".ko")
	}
	return strings.ReplaceAll(n, "-", "_")
}

func indexModules(root string) (*modIndex, error) {
	idx := &modIndex{root: root, byName: map[string]string{}, builtin: map[string]bool{}, images: map[string][]byte{}}
	err := filepath.WalkDir(filepath.Join(root, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && moduleBase(p) != "" {
			idx.byName[modName(p)] = p
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("index kernel modules in %s: %w", root, err)
	}
	if b, err := os.ReadFile(filepath.Join(root, "modules.builtin")); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			idx.builtin[modName(sc.Text())] = true
		}
	}
	return idx, nil
}

// modinfoDeps reads a module's hard dependencies and "pre:" soft
// dependencies from the .modinfo section of its ELF image.
func modinfoDeps(path string, image []byte) ([]string, error) {
	f, err := elf.NewFile(bytes.NewReader(image))
	if err != nil {
		return nil, fmt.Errorf("read module %s: %w", path, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, nil
	}
	info, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("read module %s: %w", path, err)
	}
	var deps []string
	for _, kv := range bytes.Split(info, []byte{0}) {
		k, v, ok := strings.Cut(string(kv), "=")
		if !ok {
			continue
		}
		switch k {
		case "depends":
			for _, d := range strings.Split(v, ",") {
				if d != "" {
					deps = append(deps, strings.ReplaceAll(d, "-", "_"))
				}
			}
		case "softdep":
			// "pre: crc32c post: ..." : take what must come before.
			fields := strings.Fields(v)
			pre := false
			for _, f := range fields {
				switch {
				case strings.HasSuffix(f, ":"):
					pre = f == "pre:"
				case pre:
					deps = append(deps, strings.ReplaceAll(f, "-", "_"))
				}
			}
		}
	}
	return deps, nil
}

// closure returns the files of the wanted modules and everything they
// depend on, each after its dependencies.
func (idx *modIndex) closure(want []string) ([]string, error) {
	var order []string
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name string) error
	visit = func(name string) error {
		if idx.builtin[name] || state[name] == 2 {
			return nil
		}
		if state[name] == 1 {
			return nil // cycles do not happen in modules.dep; do not loop if they do
		}
		p, ok := idx.byName[name]
		if !ok {
			return nil // not in this kernel
		}
		state[name] = 1
		image, err := idx.image(p)
		if err != nil {
			return err
		}
		deps, err := modinfoDeps(p, image)
		if err != nil {
			return err
		}
		sort.Strings(deps)
		for _, d := range deps {
			if err := visit(d); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, p)
		return nil
	}
	for _, w := range want {
		if err := visit(w); err != nil {
			return nil, err
		}
	}
	if len(order) == 0 && len(idx.byName) == 0 {
		return nil, errors.New("no kernel modules found")
	}
	return order, nil
}
