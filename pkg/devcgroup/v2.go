package devcgroup

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/opencontainers/cgroups"
	// The devices package installs the eBPF device filter code into
	// cgroups.DevicesSetV2 and systemd.GenerateDeviceProps.
	_ "github.com/opencontainers/cgroups/devices"
	"github.com/opencontainers/cgroups/devices/config"
)

// V2 is a container's cgroup v2 directory with the device filter runc
// attached to it.
//
// Set loads a new filter from the runtime's rules plus the extra devices
// and attaches it in place of the old one with opencontainers/cgroups, the
// code runc itself uses: when exactly one program is attached (runc's, or
// our earlier one) the kernel swaps it atomically (BPF_F_REPLACE);
// when systemd added one of its own beside it (it does whenever it
// applies the unit's properties), the new one is attached first and the
// old ones detached after, so there is never a moment without a filter
// either way.
type V2 struct {
	dir  string
	base []*config.Rule
	unit Unit // nil without systemd
	// filter and unitSet are the extra devices the filter and the unit
	// allow now: none at first, as runc set them up.
	filter, unitSet []Dev
}

// Unit is the systemd unit of a container whose cgroup systemd manages.
type Unit interface {
	// SetDeviceAllow makes the unit's device policy strict and its
	// DeviceAllow list exactly rules, in one call.
	SetDeviceAllow(ctx context.Context, rules []*config.Rule) error
	String() string
}

// NewV2 returns the Access of the cgroup v2 directory dir, whose runtime
// allowed base (runc's state.json, RuncState.Devices). unit is the
// container's systemd unit, or nil when systemd does not manage it.
func NewV2(dir string, base []*config.Rule, unit Unit) (*V2, error) {
	if _, err := Rules(base, nil); err != nil {
		return nil, err
	}
	return &V2{dir: dir, base: base, unit: unit}, nil
}

func (v *V2) String() string {
	if v.unit != nil {
		return "cgroup v2 device filter " + v.dir + " and " + v.unit.String()
	}
	return "cgroup v2 device filter " + v.dir
}

// Set replaces the device filter with one that allows the runtime's
// devices and extra. The filter is changed before the systemd unit: it is
// what confines the container (the programs are ANDed), so a device that
// goes is denied at once; systemd's list only has to keep up so that its
// own program, which it attaches whenever the unit's properties change,
// does not deny a partition that the filter allows.
func (v *V2) Set(ctx context.Context, extra []Dev) error {
	extra = normalize(extra)
	rules, err := Rules(v.base, extra)
	if err != nil {
		return err
	}
	if !slices.Equal(extra, v.filter) {
		if cgroups.DevicesSetV2 == nil {
			return errors.New("cgroup v2 device filter code not linked in")
		}
		if err := cgroups.DevicesSetV2(v.dir, &cgroups.Resources{Devices: rules}); err != nil {
			return fmt.Errorf("replace device filter of %s: %w", v.dir, err)
		}
		v.filter = extra
	}
	if v.unit != nil && !slices.Equal(extra, v.unitSet) {
		if err := v.unit.SetDeviceAllow(ctx, rules); err != nil {
			return fmt.Errorf("device filter replaced, but %s: %w", v.unit, err)
		}
		v.unitSet = extra
	}
	return nil
}
