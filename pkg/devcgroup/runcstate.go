package devcgroup

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/opencontainers/cgroups/devices/config"
)

// RuncState is what the keeper needs from runc's state.json
// (<runc --root>/<id>/state.json): the device rules runc turned into the
// container's filter, which are the spec's linux.resources.devices
// followed by runc's default devices (/dev/null, /dev/zero, ..., /dev/pts),
// and how runc placed the container's cgroup.
type RuncState struct {
	// Devices are the rules in runc's order.
	Devices []*config.Rule
	// Systemd is true when runc ran with --systemd-cgroup.
	Systemd bool
	// Unit is the systemd unit runc made for the container ("" without
	// systemd): a scope, or a slice when the cgroup was named one.
	Unit string
	// Path is the container's cgroup v2 directory as runc recorded it,
	// "" when runc recorded none (cgroup v1 records one per controller).
	Path string
}

// stateJSON mirrors the parts of runc's libcontainer state that
// RuncState reads; the field names are runc's (libcontainer/configs).
type stateJSON struct {
	Config struct {
		Cgroups *struct {
			Name        string         `json:"name"`
			Parent      string         `json:"parent"`
			ScopePrefix string         `json:"scope_prefix"`
			Systemd     bool           `json:"Systemd"`
			Devices     []*config.Rule `json:"devices"`
		} `json:"cgroups"`
	} `json:"config"`
	CgroupPaths map[string]string `json:"cgroup_paths"`
}

// maxState bounds how much of a state file is read; runc's are a few KiB.
const maxState = 4 << 20

// ReadRuncState reads runc's state.json at path.
func ReadRuncState(path string) (*RuncState, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("runc state: %w", err)
	}
	defer f.Close()
	st, err := ParseRuncState(io.LimitReader(f, maxState))
	if err != nil {
		return nil, fmt.Errorf("runc state %s: %w", path, err)
	}
	return st, nil
}

// ParseRuncState decodes a runc state.json.
func ParseRuncState(r io.Reader) (*RuncState, error) {
	var s stateJSON
	if err := json.NewDecoder(r).Decode(&s); err != nil {
		return nil, err
	}
	cg := s.Config.Cgroups
	if cg == nil {
		return nil, fmt.Errorf("no cgroup config")
	}
	for i, d := range cg.Devices {
		if d == nil {
			return nil, fmt.Errorf("device rule %d is null", i)
		}
	}
	st := &RuncState{Devices: cg.Devices, Systemd: cg.Systemd, Path: s.CgroupPaths[""]}
	if cg.Systemd {
		st.Unit = unitName(cg.Name, cg.ScopePrefix)
	}
	return st, nil
}

// unitName is the systemd unit runc makes for a cgroup (runc's
// getUnitName): the name itself if it is a slice, else a scope.
func unitName(name, prefix string) string {
	if strings.HasSuffix(name, ".slice") {
		return name
	}
	return prefix + "-" + name + ".scope"
}
