package initramfs

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/renameio/v2"

	"github.com/kiwi-shim/kiwi-shim/pkg/cacheuse"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// formatVersion changes whenever the archive's layout changes, so that old
// cached images are not reused.
const formatVersion = "2"

// Spec says what goes into an initramfs.
type Spec struct {
	// Init is the kiwi-box-init binary for the guest architecture.
	Init []byte
	// ModulesDir is lib/modules/<release> of the guest kernel; empty for a
	// kernel without modules (everything built in).
	ModulesDir string
	// Modules are the module names the guest loads before the box's
	// process starts, Later those it loads afterwards (both default to
	// Modules and LaterModules when Modules is nil).
	Modules []string
	Later   []string
}

// CacheSubdir is the directory under the cache directory that holds the
// images Build makes. They are derived: kiwi-shim gc removes the ones no
// container has used for a while (see package cacheuse).
const CacheSubdir = "initramfs"

// Build returns the path of the initramfs for spec under cacheDir, making
// it if no cached copy exists. The cache key covers the init binary, the
// kernel's module tree identity and the module list.
func Build(spec Spec, cacheDir string) (string, error) {
	if spec.Modules == nil {
		spec.Modules = Modules
		if spec.Later == nil {
			spec.Later = LaterModules
		}
	}
	key, err := cacheKey(spec)
	if err != nil {
		return "", err
	}
	dir := filepath.Join(cacheDir, CacheSubdir)
	out := filepath.Join(dir, key+".cpio")
	if cacheuse.Hit(out, time.Now()) {
		return out, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("initramfs cache: %w", err)
	}
	var buf bytes.Buffer
	if err := write(&buf, spec); err != nil {
		return "", err
	}
	// Concurrent builders produce identical files; the rename is atomic.
	if err := renameio.WriteFile(out, buf.Bytes(), 0o644, renameio.IgnoreUmask()); err != nil {
		return "", fmt.Errorf("write initramfs: %w", err)
	}
	return out, nil
}

func cacheKey(spec Spec) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "format %s\n", formatVersion)
	h.Write(spec.Init)
	fmt.Fprintf(h, "\nmodules %s\nlater %s\n", strings.Join(spec.Modules, ","), strings.Join(spec.Later, ","))
	if spec.ModulesDir != "" {
		// The release name plus modules.order/builtin identify the build
		// well enough; a rebuilt kernel of the same release changes their
		// modification times.
		fmt.Fprintf(h, "dir %s\n", spec.ModulesDir)
		for _, f := range []string{"modules.order", "modules.builtin"} {
			fi, err := os.Stat(filepath.Join(spec.ModulesDir, f))
			if err == nil {
				fmt.Fprintf(h, "%s %d %d\n", f, fi.Size(), fi.ModTime().UnixNano())
			}
		}
	}
	return hex.EncodeToString(h.Sum(nil))[:32], nil
}

func write(buf *bytes.Buffer, spec Spec) error {
	c := &cpioWriter{w: buf}
	for _, d := range []string{"dev", "proc", "sys", "run", "newroot", "lib", "lib/modules"} {
		c.Dir(d, 0o755)
	}
	// The kernel opens /dev/console for init's stdio before devtmpfs is
	// mounted; without the node init's early errors would be lost.
	c.CharDev("dev/console", 0o600, 5, 1)
	c.File("init", 0o755, spec.Init)
	var load []string
	nBoot := 0 // load[:nBoot] before the process, the rest later
	if spec.ModulesDir != "" {
		idx, err := indexModules(spec.ModulesDir)
		if err != nil {
			return err
		}
		files, err := idx.closure(spec.Modules)
		if err != nil {
			return err
		}
		nBoot = len(files)
		// The later closure without what the box loaded already, in
		// its own dependency order.
		all, err := idx.closure(append(append([]string{}, spec.Modules...), spec.Later...))
		if err != nil {
			return err
		}
		boot := map[string]bool{}
		for _, f := range files {
			boot[f] = true
		}
		for _, f := range all {
			if !boot[f] {
				files = append(files, f)
			}
		}
		made := map[string]bool{}
		for _, f := range files {
			rel, err := filepath.Rel(spec.ModulesDir, f)
			if err != nil {
				return err
			}
			// Stored decompressed (readModule), under name.ko.
			dst := filepath.Join("lib/modules/kiwi-box", filepath.Dir(rel), moduleBase(rel))
			for d := filepath.Dir(dst); d != "." && d != "lib/modules" && !made[d]; d = filepath.Dir(d) {
				made[d] = true
			}
			load = append(load, "/"+dst)
		}
		// Parents before children.
		dirs := make([]string, 0, len(made))
		for d := range made {
			dirs = append(dirs, d)
		}
		sortByDepth(dirs)
		for _, d := range dirs {
			c.Dir(d, 0o755)
		}
		for i, f := range files {
			data, err := idx.image(f)
			if err != nil {
				return err
			}
			c.File(strings.TrimPrefix(load[i], "/"), 0o644, data)
		}
	}
	c.File(strings.TrimPrefix(vmproto.ModuleLoadList, "/"), 0o644, []byte(strings.Join(load[:nBoot], "\n")+"\n"))
	c.File(strings.TrimPrefix(vmproto.ModuleLaterList, "/"), 0o644, []byte(strings.Join(load[nBoot:], "\n")+"\n"))
	return c.Close()
}

func sortByDepth(dirs []string) {
	depth := func(s string) int { return strings.Count(s, "/") }
	for i := 1; i < len(dirs); i++ {
		for j := i; j > 0 && (depth(dirs[j]) < depth(dirs[j-1]) || depth(dirs[j]) == depth(dirs[j-1]) && dirs[j] < dirs[j-1]); j-- {
			dirs[j], dirs[j-1] = dirs[j-1], dirs[j]
		}
	}
}
