package devcgroup

import (
	"os"
	"strings"
	"testing"
)

func TestParseRuncState(t *testing.T) {
	tests := []struct {
		name     string
		in       string
		wantErr  string
		systemd  bool
		unit     string
		path     string
		nDevices int
	}{
		{name: "cgroupfs on v2",
			in: `{"id":"c","config":{"cgroups":{"path":"/kiwi/c","devices":[
				{"type":97,"major":-1,"minor":-1,"permissions":"rwm","allow":false},
				{"type":98,"major":7,"minor":3,"permissions":"rwm","allow":true}]}},
				"cgroup_paths":{"":"/sys/fs/cgroup/kiwi/c"}}`,
			path: "/sys/fs/cgroup/kiwi/c", nDevices: 2},
		{name: "systemd scope",
			in: `{"config":{"cgroups":{"name":"abc","parent":"machine.slice","scope_prefix":"libpod","Systemd":true,
				"devices":[{"type":97,"major":-1,"minor":-1,"permissions":"rwm","allow":false}]}},
				"cgroup_paths":{"":"/sys/fs/cgroup/machine.slice/libpod-abc.scope"}}`,
			systemd: true, unit: "libpod-abc.scope", path: "/sys/fs/cgroup/machine.slice/libpod-abc.scope", nDevices: 1},
		{name: "systemd slice",
			in:      `{"config":{"cgroups":{"name":"x.slice","Systemd":true,"devices":[]}}}`,
			systemd: true, unit: "x.slice"},
		{name: "v1 paths are per controller",
			in:       `{"config":{"cgroups":{"devices":[{"type":97,"major":-1,"minor":-1,"permissions":"rwm","allow":false}]}},"cgroup_paths":{"devices":"/sys/fs/cgroup/devices/c"}}`,
			nDevices: 1},
		{name: "no cgroup config", in: `{"config":{}}`, wantErr: "no cgroup config"},
		{name: "null rule", in: `{"config":{"cgroups":{"devices":[null]}}}`, wantErr: "null"},
		{name: "not JSON", in: `state`, wantErr: "invalid"},
		{name: "type as a string", in: `{"config":{"cgroups":{"devices":[{"type":"b"}]}}}`, wantErr: "cannot unmarshal"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, err := ParseRuncState(strings.NewReader(tt.in))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err %v, want one with %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if st.Systemd != tt.systemd || st.Unit != tt.unit || st.Path != tt.path || len(st.Devices) != tt.nDevices {
				t.Errorf("got systemd %v unit %q path %q %d rules, want %v %q %q %d",
					st.Systemd, st.Unit, st.Path, len(st.Devices), tt.systemd, tt.unit, tt.path, tt.nDevices)
			}
		})
	}
}

// TestRealRuncState reads a state.json that runc 1.1.5 (Debian 12) wrote
// for a container whose spec denies all devices and allows b 7:3: the
// rules of its filter are the spec's, then runc's defaults.
func TestRealRuncState(t *testing.T) {
	st, err := ReadRuncState("testdata/runc-1.1.5-state.json")
	if err != nil {
		t.Fatal(err)
	}
	// Written on this project's hybrid machine: runc records the unified
	// directory too, and no systemd.
	if st.Systemd || st.Unit != "" || st.Path != "/sys/fs/cgroup/unified/wt21probe" {
		t.Errorf("systemd %v unit %q path %q", st.Systemd, st.Unit, st.Path)
	}
	got := cgroupStrings(st.Devices)
	want := cgroupStrings(runcBase())
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("rules\n%s\nwant (the spec's, then runc's defaults)\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if _, err := Rules(st.Devices, []Dev{{259, 1}}); err != nil {
		t.Error(err)
	}
}

func FuzzParseRuncState(f *testing.F) {
	if b, err := os.ReadFile("testdata/runc-1.1.5-state.json"); err == nil {
		f.Add(string(b))
	}
	f.Add(`{"config":{"cgroups":{"name":"abc","scope_prefix":"libpod","Systemd":true,"devices":[{"type":97,"major":-1,"minor":-1,"permissions":"rwm","allow":false}]}}}`)
	f.Fuzz(func(t *testing.T, in string) {
		st, err := ParseRuncState(strings.NewReader(in))
		if err != nil {
			return
		}
		// Whatever parsed either builds rules or is refused, never
		// panics, and never gains a wildcard from the extra devices.
		if rules, err := Rules(st.Devices, []Dev{{259, 1}}); err == nil {
			last := rules[len(rules)-1]
			if last.Major != 259 || last.Minor != 1 || !last.Allow {
				t.Fatalf("last rule %v", last.CgroupString())
			}
		}
	})
}
