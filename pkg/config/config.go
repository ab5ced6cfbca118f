// Package config reads kiwi-shim's host configuration, a TOML file
// (/etc/kiwi-shim/config.toml by default), and applies defaults and
// environment overrides. Per-container settings come from OCI annotations
// and are layered on top by the callers.
package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
)

// DefaultPath is where the host configuration lives unless --config or
// KIWI_SHIM_CONFIG names another file.
const DefaultPath = "/etc/kiwi-shim/config.toml"

// Environment variables that override the file.
const (
	EnvConfig       = "KIWI_SHIM_CONFIG"
	EnvLoopCapacity = "KIWI_SHIM_LOOP_CAPACITY"
	EnvLoopDir      = "KIWI_SHIM_LOOP_DIR"
	// EnvCacheDir overrides cache_dir: a private cache of kernels and
	// initramfs images, e.g. to try another kernel beside running VMs.
	EnvCacheDir = "KIWI_SHIM_CACHE_DIR"
	// EnvKernelVersion and EnvKernelFlavour override vm.kernel_version
	// and vm.kernel_flavour.
	EnvKernelVersion = "KIWI_SHIM_KERNEL_VERSION"
	EnvKernelFlavour = "KIWI_SHIM_KERNEL_FLAVOUR"
	// EnvTemplate overrides vm.template (auto or off): the test suite
	// runs both ways with it.
	EnvTemplate = "KIWI_SHIM_VM_TEMPLATE"
)

// EnvOverrides are the environment variables that override the file.
var EnvOverrides = []string{EnvLoopCapacity, EnvLoopDir, EnvCacheDir, EnvKernelVersion, EnvKernelFlavour, EnvTemplate}

// The guest kernel VM mode boots unless vm.kernel_version and
// vm.kernel_flavour name another: Debian 12's 6.12 (from its security
// archive), generic flavour. 6.12 has FUSE, virtio-fs, virtio-pci and the
// virtio console built in (ten fewer modules to load) and lets virtio-fs
// clients map direct-I/O files shared (FUSE_DIRECT_IO_ALLOW_MMAP, 6.6+).
// Generic rather than cloud because cloud has no 9p at all
// (CONFIG_NET_9P unset), which vm.share = "9p" and the
// io.kiwi-shim.share=9p annotation need. 6.1 stays selectable.
const (
	DefaultKernelVersion = "6.12"
	DefaultKernelFlavour = "generic"
)

// Mode is how a container runs: in a VM of its own (ModeVM) or through
// runc with leased host loop devices (ModeContainer).
type Mode string

// Modes a container can run in.
const (
	ModeVM        Mode = "vm"
	ModeContainer Mode = "container"
)

// Valid reports whether m is one of the modes.
func (m Mode) Valid() bool { return m == ModeVM || m == ModeContainer }

// ShareKind is how host directories (the container's root and its bind
// mounts) reach a VM's guest.
type ShareKind string

// Share kinds.
const (
	// ShareVirtioFS serves them over virtio-fs from kiwi-sharefs.
	ShareVirtioFS ShareKind = "virtiofs"
	// Share9P serves them over 9p from QEMU's built-in server.
	Share9P ShareKind = "9p"
)

// Valid reports whether k is one of the share kinds.
func (k ShareKind) Valid() bool { return k == ShareVirtioFS || k == Share9P }

// Config is the host configuration.
type Config struct {
	// DefaultMode is the mode of containers without an io.kiwi-shim.mode
	// annotation: "vm" or "container".
	DefaultMode Mode `toml:"default_mode"`
	// CacheDir holds guest kernels, initramfs images and boxes.
	CacheDir string `toml:"cache_dir"`
	// WorkDir holds boxbuild's unpacked boxes while they run; like the
	// scratch disks it must be on a disk.
	WorkDir string `toml:"work_dir"`
	// Loop configures the host loop-device allocator.
	Loop Loop `toml:"loop"`
	// Container configures container mode.
	Container Container `toml:"container"`
	// VM configures VM mode.
	VM VM `toml:"vm"`
}

// Loop configures the loop-device allocator.
type Loop struct {
	// Capacity caps the devices leased at once; 0 means the host's number
	// of loop nodes.
	Capacity int `toml:"capacity"`
	// Dir holds the allocator's leases. It is host-wide on purpose and not
	// under the runtime's --root: podman, containerd and people may each
	// pass a different --root, but they share one set of loop devices.
	Dir string `toml:"dir"`
	// DefaultCount is how many devices a container-mode container leases
	// without an io.kiwi-shim.loop.count annotation.
	DefaultCount int `toml:"default_count"`
}

// Container configures container mode.
type Container struct {
	// Runtime is the OCI runtime that runs the container: a name looked up
	// in PATH or an absolute path. Empty means runc, else crun.
	Runtime string `toml:"runtime"`
}

// VM configures VM mode.
type VM struct {
	// Accel is "auto", "kvm" or "tcg".
	Accel string `toml:"accel"`
	// Memory is the default guest memory, e.g. "2G".
	Memory string `toml:"memory"`
	// CPUs is the default number of guest CPUs.
	CPUs int `toml:"cpus"`
	// KernelVersion is the series of Debian's guest kernel that setup
	// fetches and VM mode boots: "6.12" (DefaultKernelVersion) or "6.1".
	KernelVersion string `toml:"kernel_version"`
	// KernelFlavour is its flavour: "generic" (default; has 9p) or
	// "cloud" (no 9p).
	KernelFlavour string `toml:"kernel_flavour"`
	// Kernel maps a guest architecture (x86_64, aarch64) to a kernel
	// image; it overrides KernelVersion and KernelFlavour.
	Kernel map[string]string `toml:"kernel"`
	// QEMU maps a guest architecture to its qemu-system binary.
	QEMU map[string]string `toml:"qemu"`
	// Share is how host directories reach the guest: "virtiofs"
	// (kiwi-sharefs, the default) or "9p" (QEMU's built-in server).
	Share ShareKind `toml:"share"`
	// ShareFS is the kiwi-sharefs binary (default: next to kiwi-shim,
	// then PATH).
	ShareFS string `toml:"sharefs"`
	// ScratchDir holds the sparse images of scratch disks
	// (io.kiwi-shim.vm.scratch). It must be on a disk, not a tmpfs: the
	// guest's writes land there.
	ScratchDir string `toml:"scratch_dir"`
	// Template is whether boxes start from a saved, booted guest
	// (package vm's templates) instead of a cold boot: "auto" restores a
	// template, making it on first use (the default), "off" always
	// boots cold.
	Template string `toml:"template"`
	// TemplateDir holds the templates; "" is cache_dir/templates.
	TemplateDir string `toml:"template_dir"`
}

// Template settings.
const (
	TemplateAuto = "auto"
	TemplateOff  = "off"
)

// Default returns the configuration used when no file exists.
func Default() Config {
	return Config{
		DefaultMode: ModeVM,
		CacheDir:    "/var/cache/kiwi-shim",
		WorkDir:     "/var/tmp/kiwi-shim/boxbuild",
		Loop:        Loop{Dir: "/run/kiwi-shim/loop", DefaultCount: 2},
		VM:          VM{Accel: "auto", Memory: "2G", CPUs: 2, KernelVersion: DefaultKernelVersion, KernelFlavour: DefaultKernelFlavour, Share: ShareVirtioFS, ScratchDir: "/var/tmp/kiwi-shim/scratch", Template: TemplateAuto},
	}
}

// TemplateDirPath is where VM templates are kept: vm.template_dir, or
// templates below the cache directory.
func (c *Config) TemplateDirPath() string {
	if c.VM.TemplateDir != "" {
		return c.VM.TemplateDir
	}
	return filepath.Join(c.CacheDir, "templates")
}

// DefaultRootless returns the defaults for an unprivileged user: the
// caches, scratch disks and boxbuild's work below cacheDir (the user's
// $XDG_CACHE_HOME/kiwi-shim) instead of /var.
func DefaultRootless(cacheDir string) Config {
	c := Default()
	c.CacheDir = cacheDir
	c.WorkDir = filepath.Join(cacheDir, "boxbuild")
	c.VM.ScratchDir = filepath.Join(cacheDir, "scratch")
	return c
}

// Path returns the configuration file to read: flag, then $KIWI_SHIM_CONFIG,
// then DefaultPath. explicit reports whether the user named it, in which
// case a missing file is an error.
func Path(flag string) (path string, explicit bool) {
	if flag != "" {
		return flag, true
	}
	if p := os.Getenv(EnvConfig); p != "" {
		return p, true
	}
	return DefaultPath, false
}

// Load reads the file at path over the defaults base (Default or
// DefaultRootless), then applies environment overrides. A missing file is
// fine unless explicit.
func Load(path string, explicit bool, base Config) (Config, error) {
	c := base
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		if err := Parse(b, &c); err != nil {
			return Config{}, fmt.Errorf("config %s: %w", path, err)
		}
	case errors.Is(err, os.ErrNotExist) && !explicit:
	default:
		return Config{}, fmt.Errorf("config: %w", err)
	}
	if err := c.applyEnv(); err != nil {
		return Config{}, err
	}
	if err := c.Validate(); err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// Parse decodes TOML into c, rejecting keys it does not know so that a
// typo is an error rather than a silently ignored setting.
func Parse(b []byte, c *Config) error {
	md, err := toml.Decode(string(b), c)
	if err != nil {
		return err
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		return fmt.Errorf("unknown key(s) %s", strings.Join(keys, ", "))
	}
	return nil
}

func (c *Config) applyEnv() error {
	if v := os.Getenv(EnvLoopCapacity); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return fmt.Errorf("%s=%q: want a number of loop devices >= 0", EnvLoopCapacity, v)
		}
		c.Loop.Capacity = n
	}
	if v := os.Getenv(EnvLoopDir); v != "" {
		c.Loop.Dir = v
	}
	if v := os.Getenv(EnvCacheDir); v != "" {
		if !filepath.IsAbs(v) {
			return fmt.Errorf("%s=%q: want an absolute path", EnvCacheDir, v)
		}
		c.CacheDir = v
	}
	if v := os.Getenv(EnvKernelVersion); v != "" {
		c.VM.KernelVersion = v
	}
	if v := os.Getenv(EnvKernelFlavour); v != "" {
		c.VM.KernelFlavour = v
	}
	if v := os.Getenv(EnvTemplate); v != "" {
		c.VM.Template = v
	}
	return nil
}

// kernelSeries is the form of vm.kernel_version: major.minor.
var kernelSeries = regexp.MustCompile(`^[0-9]+\.[0-9]+$`)

// Validate checks values that the TOML types cannot.
func (c *Config) Validate() error {
	switch c.DefaultMode {
	case ModeVM, ModeContainer:
	default:
		return fmt.Errorf("default_mode %q: want %q or %q", c.DefaultMode, ModeVM, ModeContainer)
	}
	if c.Loop.Capacity < 0 {
		return fmt.Errorf("loop.capacity %d: must not be negative", c.Loop.Capacity)
	}
	if c.Loop.DefaultCount < 1 {
		return fmt.Errorf("loop.default_count %d: must be at least 1", c.Loop.DefaultCount)
	}
	if c.Loop.Dir == "" || !strings.HasPrefix(c.Loop.Dir, "/") {
		return fmt.Errorf("loop.dir %q: want an absolute path", c.Loop.Dir)
	}
	switch c.VM.Accel {
	case "auto", "kvm", "tcg":
	default:
		return fmt.Errorf("vm.accel %q: want auto, kvm or tcg", c.VM.Accel)
	}
	if c.VM.CPUs < 1 {
		return fmt.Errorf("vm.cpus %d: must be at least 1", c.VM.CPUs)
	}
	if !kernelSeries.MatchString(c.VM.KernelVersion) {
		return fmt.Errorf("vm.kernel_version %q: want a kernel series such as \"6.12\" or \"6.1\"", c.VM.KernelVersion)
	}
	if c.VM.KernelFlavour != "generic" && c.VM.KernelFlavour != "cloud" {
		return fmt.Errorf("vm.kernel_flavour %q: want \"generic\" or \"cloud\"", c.VM.KernelFlavour)
	}
	if !c.VM.Share.Valid() {
		return fmt.Errorf("vm.share %q: want %q or %q", c.VM.Share, ShareVirtioFS, Share9P)
	}
	if c.VM.Template != TemplateAuto && c.VM.Template != TemplateOff {
		return fmt.Errorf("vm.template %q: want %q or %q", c.VM.Template, TemplateAuto, TemplateOff)
	}
	if c.VM.TemplateDir != "" && !filepath.IsAbs(c.VM.TemplateDir) {
		return fmt.Errorf("vm.template_dir %q: want an absolute path", c.VM.TemplateDir)
	}
	if _, err := ParseSize(c.VM.Memory); err != nil {
		return fmt.Errorf("vm.memory: %w", err)
	}
	return nil
}

// ParseSize parses a size such as "512M", "2G" or "1073741824" into bytes.
// Suffixes are binary (K = 1024) as in QEMU's -m.
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(strings.ToUpper(s))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "B"), "I")
	mult := int64(1)
	if t != "" {
		switch t[len(t)-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		}
		if mult > 1 {
			t = t[:len(t)-1]
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n <= 0 || n > (1<<50)/mult {
		return 0, fmt.Errorf("size %q: want a positive number with an optional K, M, G or T suffix", s)
	}
	return n * mult, nil
}
