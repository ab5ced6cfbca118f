package oci

import (
	"fmt"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
)

// Annotation keys kiwi-shim reads. Any other io.kiwi-shim.* key is an
// error, so that a typo does not silently fall back to a default.
const (
	AnnotationMode        = "io.kiwi-shim.mode"
	AnnotationLoopCount   = "io.kiwi-shim.loop.count"
	AnnotationLoopTimeout = "io.kiwi-shim.loop.timeout"
	AnnotationLoopControl = "io.kiwi-shim.loop.control"
	AnnotationVMMemory    = "io.kiwi-shim.vm.memory"
	AnnotationVMCPUs      = "io.kiwi-shim.vm.cpus"
	AnnotationVMArch      = "io.kiwi-shim.vm.arch"
	AnnotationVMScratch   = "io.kiwi-shim.vm.scratch"
	AnnotationVMDNS       = "io.kiwi-shim.vm.dns"
	AnnotationShare       = "io.kiwi-shim.share"
	AnnotationShareCache  = "io.kiwi-shim.share.cache"
	AnnotationShareMapped = "io.kiwi-shim.share.mapped"
)

const annotationPrefix = "io.kiwi-shim."

var knownAnnotations = map[string]bool{
	AnnotationMode: true, AnnotationLoopCount: true, AnnotationLoopTimeout: true,
	AnnotationLoopControl: true, AnnotationVMMemory: true, AnnotationVMCPUs: true,
	AnnotationVMArch: true, AnnotationVMScratch: true, AnnotationVMDNS: true, AnnotationShare: true,
	AnnotationShareCache: true, AnnotationShareMapped: true,
}

// Settings are the per-container choices made with annotations. Zero
// values mean "not set": callers fall back to the config file.
type Settings struct {
	// Mode is the container's mode, or "".
	Mode config.Mode
	// LoopCount is the number of loop devices to lease (container mode).
	LoopCount int
	// LoopTimeout bounds the wait for loop devices; 0 waits for ever.
	LoopTimeout time.Duration
	// LoopControl gives the container /dev/loop-control.
	LoopControl bool
	// VMMemory, VMCPUs and VMArch configure VM mode.
	VMMemory, VMArch string
	// Share is how host directories reach the guest, or "".
	Share config.ShareKind
	// ShareCache is the guest's caching of bind mounts served over
	// virtio-fs: a kiwi-sharefs cache mode (auto, always, metadata,
	// never) or "".
	ShareCache string
	// ShareMapped chooses whether bind mounts served over virtio-fs keep
	// device nodes and set-id bits in extended attributes (kiwi-sharefs
	// --mapped); nil: the default.
	ShareMapped *bool
	VMCPUs      int
	// ScratchSize is the size of the guest-local scratch disk (0: none),
	// mounted at ScratchPath in the container.
	ScratchSize int64
	ScratchPath string
	// VMDNS is how the box resolves names: "forward" (through the guest's
	// DNS forwarder, the default), "direct" (straight to the container's
	// nameservers) or "".
	VMDNS string
	// LoopLease is the lease Kubernetes allocated through kiwi-shim's
	// device plugin (AnnotationLoopLease), or nil.
	LoopLease *LoopLease
}

// DefaultScratchPath is where the scratch disk is mounted when the
// annotation names only a size.
const DefaultScratchPath = "/scratch"

// ParseAnnotations extracts and checks the io.kiwi-shim.* annotations.
func ParseAnnotations(a map[string]string) (Settings, error) {
	var s Settings
	keys := make([]string, 0, len(a))
	for k := range a {
		keys = append(keys, k)
	}
	sort.Strings(keys) // report the first bad key deterministically
	for _, k := range keys {
		if !strings.HasPrefix(k, annotationPrefix) {
			continue
		}
		v := a[k]
		bad := func(want string) error {
			return fmt.Errorf("annotation %s=%.64q: want %s", k, v, want)
		}
		switch k {
		case AnnotationMode:
			if !config.Mode(v).Valid() {
				return s, bad(`"vm" or "container"`)
			}
			s.Mode = config.Mode(v)
		case AnnotationLoopCount:
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 256 {
				return s, bad("a number of loop devices from 1 to 256")
			}
			s.LoopCount = n
		case AnnotationLoopTimeout:
			d, err := time.ParseDuration(v)
			if err != nil || d < 0 {
				return s, bad(`a duration such as "10m" (0 waits for ever)`)
			}
			s.LoopTimeout = d
		case AnnotationLoopControl:
			b, err := strconv.ParseBool(v)
			if err != nil {
				return s, bad("true or false")
			}
			s.LoopControl = b
		case AnnotationVMCPUs:
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 256 {
				return s, bad("a number of CPUs from 1 to 256")
			}
			s.VMCPUs = n
		case AnnotationVMMemory:
			if _, err := config.ParseSize(v); err != nil {
				return s, bad(`a size such as "4G"`)
			}
			s.VMMemory = v
		case AnnotationVMArch:
			switch v {
			case "x86_64", "amd64", "aarch64", "arm64":
			default:
				return s, bad("x86_64 (amd64) or aarch64 (arm64)")
			}
			s.VMArch = v
		case AnnotationVMScratch:
			size, path, _ := strings.Cut(v, ":")
			n, err := config.ParseSize(size)
			if path == "" {
				path = DefaultScratchPath
			}
			if err != nil || n < 16<<20 || !filepath.IsAbs(path) || filepath.Clean(path) == "/" {
				return s, bad(`a size of at least 16M, optionally with an absolute mount point: "20G" or "20G:/build"`)
			}
			s.ScratchSize, s.ScratchPath = n, filepath.Clean(path)
		case AnnotationVMDNS:
			if v != "forward" && v != "direct" {
				return s, bad(`"forward" or "direct"`)
			}
			s.VMDNS = v
		case AnnotationShare:
			if !config.ShareKind(v).Valid() {
				return s, bad(`"virtiofs" or "9p"`)
			}
			s.Share = config.ShareKind(v)
		case AnnotationShareCache:
			if v != "auto" && v != "always" && v != "metadata" && v != "never" {
				return s, bad(`"auto", "always", "metadata" or "never"`)
			}
			s.ShareCache = v
		case AnnotationLoopLease:
			l, err := ParseLoopLease(v)
			if err != nil {
				return s, fmt.Errorf("annotation %s=%.64q: %w", k, v, err)
			}
			s.LoopLease = &l
		case AnnotationShareMapped:
			b, err := strconv.ParseBool(v)
			if err != nil {
				return s, bad("true or false")
			}
			s.ShareMapped = &b
		default:
			if !knownAnnotations[k] {
				return s, fmt.Errorf("unknown annotation %s (known: mode, loop.count, loop.timeout, loop.control, vm.memory, vm.cpus, vm.arch, vm.scratch, vm.dns, share, share.cache, share.mapped, loop.lease)", k)
			}
		}
	}
	return s, nil
}
