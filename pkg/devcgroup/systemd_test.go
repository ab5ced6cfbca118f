package devcgroup

import (
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// TestDeviceProps checks the DeviceAllow list the keeper gives a systemd
// scope: reset first, strict policy, runc's devices and exactly the
// partitions, by number. (systemd is not running on the CI machine kind;
// the real D-Bus call is exercised on a cgroup v2 host.)
func TestDeviceProps(t *testing.T) {
	tests := []struct {
		name    string
		extra   []Dev
		want    []string // entries that must be there
		notWant []string // entries that must not
	}{
		{name: "runc's set", want: []string{"/dev/block/7:3 rwm", "/dev/char/1:3 rwm", "char-136 rwm"},
			notWant: []string{"/dev/block/259:"}},
		{name: "one partition", extra: []Dev{{259, 4}},
			want: []string{"/dev/block/7:3 rwm", "/dev/block/259:4 rwm"}, notWant: []string{"/dev/block/259:5", "block-259"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rules, err := Rules(runcBase(), tt.extra)
			if err != nil {
				t.Fatal(err)
			}
			props, err := deviceProps(rules, 252)
			if err != nil {
				t.Fatal(err)
			}
			if len(props) < 3 || props[0].Name != "DeviceAllow" || props[1].Name != "DevicePolicy" {
				t.Fatalf("properties %v: want the DeviceAllow reset, then DevicePolicy, first", props)
			}
			if s := props[0].Value.String(); s != "@a(ss) []" {
				t.Errorf("first DeviceAllow %s, want the empty reset", s)
			}
			if s := props[1].Value.String(); s != `"strict"` {
				t.Errorf("DevicePolicy %s, want strict", s)
			}
			var entries []string
			for _, p := range props[2:] {
				if p.Name != "DeviceAllow" {
					continue
				}
				// The library's entries are structs of (path, perms),
				// which godbus sends as a(ss).
				if sig := p.Value.Signature().String(); sig != "a(ss)" {
					t.Fatalf("DeviceAllow signature %s, want a(ss)", sig)
				}
				list := reflect.ValueOf(p.Value.Value())
				for i := range list.Len() {
					e := list.Index(i)
					entries = append(entries, fmt.Sprintf("%s %s", e.Field(0).String(), e.Field(1).String()))
				}
			}
			all := strings.Join(entries, "\n")
			for _, w := range tt.want {
				if !strings.Contains(all, w) && !slices.Contains(entries, w) {
					t.Errorf("DeviceAllow lacks %q:\n%s", w, all)
				}
			}
			for _, w := range tt.notWant {
				if strings.Contains(all, w) {
					t.Errorf("DeviceAllow has %q:\n%s", w, all)
				}
			}
		})
	}
}
