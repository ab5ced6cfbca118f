package vm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
)

// Kernel is a guest kernel and its modules.
type Kernel struct {
	// Image is the kernel to boot.
	Image string
	// Release is its version string (uname -r).
	Release string
	// ModulesDir is lib/modules/<release>, or "" if there is none.
	ModulesDir string
}

// HostArch is the host's architecture in kernel terms.
func HostArch() string {
	switch runtime.GOARCH {
	case "arm64":
		return "aarch64"
	case "amd64":
		return "x86_64"
	default:
		return runtime.GOARCH
	}
}

// DebArch maps a kernel architecture name to Debian's (aarch64: arm64).
func DebArch(arch string) string {
	if arch == "aarch64" {
		return "arm64"
	}
	return "amd64"
}

// kernelsDir is where `kiwi-shim setup` unpacks guest kernels for arch.
// Each choice has a directory of its own below it (6.12-generic, ...);
// kernels/<arch>/boot and lib directly below it are the layout of older
// releases, which put one kernel (Debian's 6.1) there.
func kernelsDir(cacheDir, arch string) string { return filepath.Join(cacheDir, "kernels", arch) }

// choiceDir is where setup unpacks the kernel of choice c.
func choiceDir(cacheDir, arch string, c KernelChoice) string {
	return filepath.Join(kernelsDir(cacheDir, arch), c.String())
}

// FindKernel returns the guest kernel for arch: the configured image if
// any, else the kernel of choice c that setup unpacked into the first of
// the cache directories that has one, else the host's own
// /boot/vmlinuz-* with matching /lib/modules if it is of choice c (same
// arch only). Only kernels of choice c count, and of those the newest
// release: unpacking another series or flavour into a cache switches no
// VM.
func FindKernel(configured string, c KernelChoice, arch string, cacheDirs ...string) (Kernel, error) {
	if configured != "" {
		return kernelAt(configured, "")
	}
	if err := c.Validate(); err != nil {
		return Kernel{}, err
	}
	if len(cacheDirs) == 0 {
		return Kernel{}, errors.New("no kernel cache directory")
	}
	for _, cacheDir := range cacheDirs {
		for _, root := range []string{choiceDir(cacheDir, arch, c), kernelsDir(cacheDir, arch)} {
			if image := newestOf(c, arch, filepath.Join(root, "boot")); image != "" {
				return kernelAt(image, filepath.Join(root, "lib", "modules"))
			}
		}
	}
	if arch == HostArch() {
		if image := newestOf(c, arch, "/boot"); image != "" {
			if k, err := kernelAt(image, "/lib/modules"); err == nil && k.ModulesDir != "" {
				return k, nil
			}
		}
	}
	return Kernel{}, fmt.Errorf("no guest kernel %s for %s: run 'kiwi-shim setup --arch %s' (puts Debian's %s into %s), choose another with vm.kernel_version and vm.kernel_flavour, or set vm.kernel.%s in the config",
		c, arch, arch, c.packagePattern(arch), choiceDir(cacheDirs[0], arch, c), arch)
}

// newestOf returns the newest vmlinuz-* of choice c in dir, or "".
func newestOf(c KernelChoice, arch, dir string) string {
	images, _ := filepath.Glob(filepath.Join(dir, "vmlinuz-*"))
	best := ""
	for _, image := range images {
		rel := strings.TrimPrefix(filepath.Base(image), "vmlinuz-")
		if !c.Matches(rel, arch) {
			continue
		}
		if best == "" || compareReleases(rel, strings.TrimPrefix(filepath.Base(best), "vmlinuz-")) > 0 {
			best = image
		}
	}
	return best
}

func kernelAt(image, modulesRoot string) (Kernel, error) {
	fi, err := os.Stat(image)
	if err != nil {
		return Kernel{}, fmt.Errorf("guest kernel %s: %w", image, err)
	}
	if !fi.Mode().IsRegular() {
		return Kernel{}, fmt.Errorf("guest kernel %s is not a file", image)
	}
	k := Kernel{Image: image, Release: strings.TrimPrefix(filepath.Base(image), "vmlinuz-")}
	if modulesRoot == "" {
		// <root>/boot/vmlinuz-R next to <root>/lib/modules/R
		modulesRoot = filepath.Join(filepath.Dir(filepath.Dir(image)), "lib", "modules")
	}
	if d := filepath.Join(modulesRoot, k.Release); dirExists(d) {
		k.ModulesDir = d
	}
	return k, nil
}

func dirExists(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}
