package vm

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
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

// kernelsDir is where `kiwi-shim setup` unpacks guest kernels.
func kernelsDir(cacheDir, arch string) string { return filepath.Join(cacheDir, "kernels", arch) }

// FindKernel returns the guest kernel for arch: the configured image if
// any, else the newest kernel unpacked by setup into the first of the
// cache directories that has one, else the host's own /boot/vmlinuz-*
// with matching /lib/modules (same arch only).
func FindKernel(configured, arch string, cacheDirs ...string) (Kernel, error) {
	if configured != "" {
		return kernelAt(configured, "")
	}
	for _, cacheDir := range cacheDirs {
		if ks, _ := filepath.Glob(filepath.Join(kernelsDir(cacheDir, arch), "boot", "vmlinuz-*")); len(ks) > 0 {
			sort.Strings(ks)
			return kernelAt(ks[len(ks)-1], filepath.Join(kernelsDir(cacheDir, arch), "lib", "modules"))
		}
	}
	if len(cacheDirs) == 0 {
		return Kernel{}, errors.New("no kernel cache directory")
	}
	cacheDir := cacheDirs[0]
	if arch == HostArch() {
		if ks, _ := filepath.Glob("/boot/vmlinuz-*"); len(ks) > 0 {
			sort.Strings(ks)
			for i := len(ks) - 1; i >= 0; i-- {
				if k, err := kernelAt(ks[i], "/lib/modules"); err == nil && k.ModulesDir != "" {
					return k, nil
				}
			}
		}
	}
	return Kernel{}, fmt.Errorf("no guest kernel for %s: run 'kiwi-shim setup' (puts Debian's linux-image-%s into %s) or set vm.kernel.%s in the config",
		arch, DebArch(arch), kernelsDir(cacheDir, arch), arch)
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

// Setup puts Debian's generic kernel for arch into the cache: the package
// is downloaded with apt-get and unpacked with dpkg-deb, never installed,
// so the host's /boot is untouched. The generic flavour is used because
// it has 9p (the cloud flavour does not). It is a no-op when a kernel is
// already there.
func Setup(cacheDir, arch string, out *os.File) (Kernel, error) {
	if k, err := FindKernel("", arch, cacheDir); err == nil && strings.HasPrefix(k.Image, kernelsDir(cacheDir, arch)) {
		return k, nil
	}
	dir := kernelsDir(cacheDir, arch)
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return Kernel{}, fmt.Errorf("kernel cache: %w", err)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".setup-")
	if err != nil {
		return Kernel{}, fmt.Errorf("kernel cache: %w", err)
	}
	// apt-get download drops privileges to _apt where it can.
	os.Chmod(tmp, 0o755)
	defer os.RemoveAll(tmp)
	da := DebArch(arch)
	meta := "linux-image-" + da
	if da != DebArch(HostArch()) {
		meta += ":" + da
	}
	// Resolve the metapackage to the versioned image package.
	depOut, err := exec.Command("apt-cache", "depends", meta).Output()
	if err != nil {
		return Kernel{}, fmt.Errorf("apt-cache depends %s: %v (for a foreign arch run: dpkg --add-architecture %s && apt-get update)", meta, err, da)
	}
	pkg := ""
	for _, l := range strings.Split(string(depOut), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), "Depends: linux-image-"); ok {
			pkg = "linux-image-" + strings.TrimSpace(v)
			break
		}
	}
	if pkg == "" {
		return Kernel{}, fmt.Errorf("cannot resolve %s to a kernel package", meta)
	}
	if da != DebArch(HostArch()) && !strings.Contains(pkg, ":") {
		pkg += ":" + da
	}
	dl := exec.Command("apt-get", "download", "-q", pkg)
	dl.Dir, dl.Stdout, dl.Stderr = tmp, out, out
	if err := dl.Run(); err != nil {
		return Kernel{}, fmt.Errorf("apt-get download %s: %w", pkg, err)
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(debs) != 1 {
		return Kernel{}, fmt.Errorf("apt-get download %s: no package file", pkg)
	}
	unpack := filepath.Join(tmp, "root")
	if out, err := exec.Command("dpkg-deb", "-x", debs[0], unpack).CombinedOutput(); err != nil {
		return Kernel{}, fmt.Errorf("dpkg-deb -x %s: %v: %s", debs[0], err, out)
	}
	os.RemoveAll(dir)
	if err := os.Rename(unpack, dir); err != nil {
		return Kernel{}, fmt.Errorf("kernel cache: %w", err)
	}
	k, err := FindKernel("", arch, cacheDir)
	if err != nil {
		return Kernel{}, err
	}
	if k.ModulesDir == "" {
		return Kernel{}, errors.New("unpacked kernel has no modules")
	}
	return k, nil
}
