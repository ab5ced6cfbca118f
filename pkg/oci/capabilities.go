package oci

import (
	"slices"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// KIWICapabilities are the capabilities KIWI needs on top of a default
// container's: mount and losetup (SYS_ADMIN), making device nodes in the
// image root (MKNOD), and writing and controlling audit records (package
// scripts that run systemd or useradd).
var KIWICapabilities = []string{"CAP_SYS_ADMIN", "CAP_MKNOD", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL"}

// AddKIWICapabilities adds KIWICapabilities to p's bounding, effective and
// permitted sets.
func AddKIWICapabilities(p *specs.Process) {
	if p.Capabilities == nil {
		p.Capabilities = &specs.LinuxCapabilities{}
	}
	c := p.Capabilities
	c.Bounding = addAll(c.Bounding, KIWICapabilities)
	c.Effective = addAll(c.Effective, KIWICapabilities)
	c.Permitted = addAll(c.Permitted, KIWICapabilities)
}

func addAll(set, add []string) []string {
	out := slices.Clone(set)
	for _, a := range add {
		if !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	return out
}

// KIWIMaskedPaths returns masked without /sys/dev/block, which KIWI and
// lsblk read to find a loop device's partitions; masked is not changed.
func KIWIMaskedPaths(masked []string) []string {
	return slices.DeleteFunc(slices.Clone(masked), func(p string) bool { return p == "/sys/dev/block" })
}
