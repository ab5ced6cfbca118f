package devcgroup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// V1 is a container's directory in the cgroup v1 devices controller.
// Allowing one more device is a write to devices.allow; the runtime's own
// rules are left as they are.
type V1 struct {
	dir     string
	allowed map[Dev]bool
}

// NewV1 returns the Access of the devices cgroup directory dir.
func NewV1(dir string) *V1 { return &V1{dir: dir, allowed: map[Dev]bool{}} }

func (v *V1) String() string { return "cgroup v1 devices " + v.dir }

// Set allows the devices of extra not yet allowed and denies those that
// left it. A device whose write failed is tried again by the next Set.
func (v *V1) Set(_ context.Context, extra []Dev) error {
	want := map[Dev]bool{}
	for _, d := range extra {
		want[d] = true
	}
	var errs []error
	// Deny first: a number that went may be handed to another device.
	for d := range v.allowed {
		if want[d] {
			continue
		}
		if err := os.WriteFile(filepath.Join(v.dir, "devices.deny"), []byte(d.String()), 0); err != nil {
			errs = append(errs, fmt.Errorf("deny %s: %w", d, err))
			continue
		}
		delete(v.allowed, d)
	}
	for d := range want {
		if v.allowed[d] {
			continue
		}
		if err := os.WriteFile(filepath.Join(v.dir, "devices.allow"), []byte(d.String()), 0); err != nil {
			errs = append(errs, fmt.Errorf("allow %s: %w", d, err))
			continue
		}
		v.allowed[d] = true
	}
	return errors.Join(errs...)
}
