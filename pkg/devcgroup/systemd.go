package devcgroup

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	sd "github.com/coreos/go-systemd/v22/dbus"
	"github.com/opencontainers/cgroups"
	"github.com/opencontainers/cgroups/devices/config"
	"github.com/opencontainers/cgroups/systemd"
)

// SystemdUnit is a unit on the system manager, reached over D-Bus.
type SystemdUnit struct {
	name string
}

// NewSystemdUnit returns the unit called name (e.g. runc's
// "libpod-ID.scope").
func NewSystemdUnit(name string) *SystemdUnit { return &SystemdUnit{name: name} }

func (u *SystemdUnit) String() string { return "systemd unit " + u.name }

// SetDeviceAllow sets DevicePolicy=strict and the DeviceAllow list made
// from rules, as runc does for the unit it creates (the same conversion),
// at runtime only (nothing is written to /etc). The empty DeviceAllow
// that starts the list resets the old one within the same call, so
// systemd builds its new program from the complete list once.
func (u *SystemdUnit) SetDeviceAllow(ctx context.Context, rules []*config.Rule) error {
	conn, err := sd.NewSystemConnectionContext(ctx)
	if err != nil {
		return fmt.Errorf("connect to systemd: %w", err)
	}
	defer conn.Close()
	props, err := deviceProps(rules, version(conn))
	if err != nil {
		return err
	}
	if err := conn.SetUnitPropertiesContext(ctx, u.name, true, props...); err != nil {
		return fmt.Errorf("set DeviceAllow of %s: %w", u.name, err)
	}
	return nil
}

// deviceProps are the unit properties that allow rules, for systemd
// version ver: runc's conversion, which starts with an empty DeviceAllow
// (reset) and DevicePolicy=strict.
func deviceProps(rules []*config.Rule, ver int) ([]sd.Property, error) {
	if systemd.GenerateDeviceProps == nil {
		return nil, errors.New("systemd device properties code not linked in")
	}
	props, err := systemd.GenerateDeviceProps(&cgroups.Resources{Devices: rules}, ver)
	if err != nil {
		return nil, fmt.Errorf("device properties: %w", err)
	}
	return props, nil
}

// version is systemd's major version, 0 if unknown. Before 240 systemd
// needs device group names for "b MAJOR:*" rules instead of numbers.
func version(conn *sd.Conn) int {
	v, err := conn.GetManagerProperty("Version")
	if err != nil {
		return 0
	}
	v = strings.TrimLeft(strings.Trim(v, `"`), "v")
	end := strings.IndexFunc(v, func(r rune) bool { return r < '0' || r > '9' })
	if end >= 0 {
		v = v[:end]
	}
	n, _ := strconv.Atoi(v)
	return n
}
