package devcgroup

import (
	"fmt"

	"github.com/opencontainers/cgroups/devices/config"
)

// Rules returns the device rules of a container whose runtime allowed
// base and that may also use extra: base in its order (later rules win,
// as in the devices controller), then one allow rule per extra device,
// sorted. base is not changed. An empty base is refused: runc always
// has rules, so none means they were not found, and a filter built from
// none would allow every device.
func Rules(base []*config.Rule, extra []Dev) ([]*config.Rule, error) {
	if len(base) == 0 {
		return nil, fmt.Errorf("no device rules from the runtime")
	}
	for i, r := range base {
		if r == nil {
			return nil, fmt.Errorf("device rule %d is empty", i)
		}
		if !r.Type.CanCgroup() {
			return nil, fmt.Errorf("device rule %d: type %q is not a cgroup device type", i, r.Type)
		}
		if !r.Permissions.IsValid() {
			return nil, fmt.Errorf("device rule %d: permissions %q", i, r.Permissions)
		}
	}
	out := make([]*config.Rule, 0, len(base)+len(extra))
	for _, r := range base {
		c := *r
		out = append(out, &c)
	}
	for _, d := range normalize(extra) {
		out = append(out, &config.Rule{
			Type: config.BlockDevice, Major: int64(d.Major), Minor: int64(d.Minor),
			Permissions: "rwm", Allow: true,
		})
	}
	return out, nil
}
