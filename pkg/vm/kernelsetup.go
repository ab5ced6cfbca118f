package vm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
)

// Setup puts Debian's kernel of choice c for arch into the cache: the
// newest unsigned image package of that series and flavour is downloaded
// with apt-get and unpacked with dpkg-deb, never installed, so the host's
// /boot is untouched. It goes into a directory of its own per choice,
// so that it changes no VM that boots another. It is a no-op when a
// kernel of that choice is already there.
func Setup(ctx context.Context, cacheDir, arch string, c KernelChoice, out io.Writer) (Kernel, error) {
	if err := c.Validate(); err != nil {
		return Kernel{}, err
	}
	if k, err := FindKernel("", c, arch, cacheDir); err == nil && strings.HasPrefix(k.Image, kernelsDir(cacheDir, arch)) {
		return k, nil
	}
	pkgs, err := imagePackages(ctx, c, arch)
	if err != nil {
		return Kernel{}, err
	}
	dir := choiceDir(cacheDir, arch, c)
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return Kernel{}, fmt.Errorf("kernel cache: %w", err)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".setup-")
	if err != nil {
		return Kernel{}, fmt.Errorf("kernel cache: %w", err)
	}
	// apt-get download drops privileges to _apt where it can.
	if err := os.Chmod(tmp, 0o755); err != nil {
		return Kernel{}, fmt.Errorf("kernel cache: %w", err)
	}
	defer os.RemoveAll(tmp)
	// The newest first; an index can list a version its archive no
	// longer serves, so an older one is tried when a download fails.
	var deb string
	var errs []error
	for _, pkg := range pkgs[:min(len(pkgs), 3)] {
		dl := exec.CommandContext(ctx, "apt-get", "download", "-q", pkg)
		dl.Dir, dl.Stdout, dl.Stderr = tmp, out, out
		if err := dl.Run(); err != nil {
			errs = append(errs, fmt.Errorf("apt-get download %s: %w", pkg, err))
			continue
		}
		debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
		if len(debs) != 1 {
			return Kernel{}, fmt.Errorf("apt-get download %s: %d package files", pkg, len(debs))
		}
		deb = debs[0]
		break
	}
	if deb == "" {
		return Kernel{}, errors.Join(errs...)
	}
	unpack := filepath.Join(tmp, "root")
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", deb, unpack).CombinedOutput(); err != nil {
		return Kernel{}, fmt.Errorf("dpkg-deb -x %s: %v: %s", deb, err, out)
	}
	if err := os.RemoveAll(dir); err != nil {
		return Kernel{}, fmt.Errorf("kernel cache: %w", err)
	}
	if err := os.Rename(unpack, dir); err != nil {
		return Kernel{}, fmt.Errorf("kernel cache: %w", err)
	}
	k, err := FindKernel("", c, arch, cacheDir)
	if err != nil {
		return Kernel{}, fmt.Errorf("unpacked %s: %w", filepath.Base(deb), err)
	}
	if k.ModulesDir == "" {
		return Kernel{}, fmt.Errorf("unpacked %s has no modules", filepath.Base(deb))
	}
	return k, nil
}

// imagePackages lists the unsigned image packages of choice c for arch
// that apt knows, newest first, as apt-get download wants their names
// (with :arch for a foreign architecture). Debian has no metapackage for
// 6.12 on bookworm (it comes from the security archive), so the
// versioned names are searched for every series alike.
func imagePackages(ctx context.Context, c KernelChoice, arch string) ([]string, error) {
	da := DebArch(arch)
	pattern := "^linux-image-" + regexp.QuoteMeta(c.Version) + `\.[0-9][^ ]*-` + regexp.QuoteMeta(c.flavourSuffix(arch)) + "-unsigned$"
	b, err := exec.CommandContext(ctx, "apt-cache", "search", "--names-only", pattern).Output()
	if err != nil {
		return nil, fmt.Errorf("apt-cache search %s: %w", pattern, err)
	}
	rels := releasesIn(string(b), c, arch)
	if len(rels) == 0 {
		hint := ""
		if da != DebArch(HostArch()) {
			hint = fmt.Sprintf(" (for a foreign architecture: dpkg --add-architecture %s && apt-get update)", da)
		}
		return nil, fmt.Errorf("apt knows no package %s%s", c.packagePattern(arch), hint)
	}
	pkgs := make([]string, len(rels))
	for i, r := range rels {
		pkgs[i] = "linux-image-" + r + "-unsigned"
		if da != DebArch(HostArch()) {
			pkgs[i] += ":" + da
		}
	}
	return pkgs, nil
}

// releasesIn picks the releases of choice c out of apt-cache search's
// output ("name - description" lines), newest first.
func releasesIn(search string, c KernelChoice, arch string) []string {
	var rels []string
	for _, l := range strings.Split(search, "\n") {
		name, _, _ := strings.Cut(l, " ")
		rel, ok := strings.CutPrefix(name, "linux-image-")
		if !ok {
			continue
		}
		if rel, ok = strings.CutSuffix(rel, "-unsigned"); ok && c.Matches(rel, arch) {
			rels = append(rels, rel)
		}
	}
	sort.Slice(rels, func(i, j int) bool { return compareReleases(rels[i], rels[j]) > 0 })
	return rels
}
