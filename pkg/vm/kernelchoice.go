package vm

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
)

// Guest kernel flavours, as Debian builds them.
const (
	// FlavourGeneric is Debian's generic kernel (linux-image-amd64's):
	// 9p as modules, and in 6.12 FUSE, virtio-fs, virtio-pci and the
	// virtio console built in.
	FlavourGeneric = "generic"
	// FlavourCloud is Debian's cloud kernel: fewer drivers, no 9p.
	FlavourCloud = "cloud"
)

// DefaultKernelVersion is the kernel series VM mode boots unless the
// config names another: config.DefaultKernelVersion (6.12), whose
// comment gives the reasons. 6.1 stays selectable.
const DefaultKernelVersion = config.DefaultKernelVersion

// KernelChoice selects the guest kernel among those Debian serves: a
// series (major.minor) and a flavour.
type KernelChoice struct {
	// Version is the series, e.g. "6.12" or "6.1".
	Version string
	// Flavour is FlavourGeneric or FlavourCloud.
	Flavour string
}

// DefaultKernelChoice is the kernel VM mode boots by default: Debian's
// generic flavour of DefaultKernelVersion. Generic rather than cloud
// because it keeps 9p (the cloud flavour has none), although cloud
// starts a box sooner under TCG (README, Benchmarks).
func DefaultKernelChoice() KernelChoice {
	return KernelChoice{Version: DefaultKernelVersion, Flavour: config.DefaultKernelFlavour}
}

var seriesRE = regexp.MustCompile(`^[0-9]+\.[0-9]+$`)

// Validate checks the version's form and the flavour's name.
func (c KernelChoice) Validate() error {
	if !seriesRE.MatchString(c.Version) {
		return fmt.Errorf("kernel version %q: want a series such as %q or \"6.1\"", c.Version, DefaultKernelVersion)
	}
	if c.Flavour != FlavourGeneric && c.Flavour != FlavourCloud {
		return fmt.Errorf("kernel flavour %q: want %q or %q", c.Flavour, FlavourGeneric, FlavourCloud)
	}
	return nil
}

// String names the choice as its cache directory does: "6.12-generic".
func (c KernelChoice) String() string { return c.Version + "-" + c.Flavour }

// Matches reports whether a Debian kernel release (uname -r: 6.1.0-57-amd64,
// 6.12.118+deb12-cloud-amd64, ...) is of this series and flavour for arch.
// Other flavours (rt, arm64-16k) never match.
func (c KernelChoice) Matches(release, arch string) bool {
	rest, ok := strings.CutPrefix(release, c.Version+".")
	if !ok || rest == "" || rest[0] < '0' || rest[0] > '9' {
		return false
	}
	rest, ok = strings.CutSuffix(rest, "-"+DebArch(arch))
	if !ok {
		return false
	}
	// rest is now "0-57", "0-57-cloud", "118+deb12", "118+deb12-rt".
	i := strings.LastIndexByte(rest, '-')
	last := rest[i+1:]
	named := last != "" && strings.Trim(last, "abcdefghijklmnopqrstuvwxyz") == ""
	if c.Flavour == FlavourGeneric {
		return !named
	}
	return named && last == c.Flavour
}

// packagePattern is the name of Debian's unsigned image package of this
// choice, as a pattern for people to read.
func (c KernelChoice) packagePattern(arch string) string {
	return "linux-image-" + c.Version + ".*-" + c.flavourSuffix(arch) + "-unsigned"
}

// flavourSuffix is how a release of this choice ends: "amd64", "cloud-arm64".
func (c KernelChoice) flavourSuffix(arch string) string {
	if c.Flavour == FlavourGeneric {
		return DebArch(arch)
	}
	return c.Flavour + "-" + DebArch(arch)
}

// compareReleases orders two kernel releases by their numbers, in
// order (6.12.118+deb12 after 6.12.99+deb12): -1, 0 or 1.
func compareReleases(a, b string) int {
	na, nb := releaseNumbers(a), releaseNumbers(b)
	for i := 0; i < len(na) && i < len(nb); i++ {
		if na[i] != nb[i] {
			if na[i] < nb[i] {
				return -1
			}
			return 1
		}
	}
	switch {
	case len(na) < len(nb):
		return -1
	case len(na) > len(nb):
		return 1
	}
	return strings.Compare(a, b)
}

// releaseNumbers returns the runs of digits in a release, as numbers.
func releaseNumbers(s string) []uint64 {
	var out []uint64
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r < '0' || r > '9' }) {
		n, err := strconv.ParseUint(f, 10, 64)
		if err != nil {
			n = ^uint64(0)
		}
		out = append(out, n)
	}
	return out
}
