package devcgroup

import (
	"strings"
	"testing"

	"github.com/opencontainers/cgroups/devices/config"
)

// runcBase is what runc 1.1.5 records for a kiwi-shim container whose
// spec denies everything and allows its leased /dev/loop3: the spec's
// rules, then runc's default devices (testdata/runc-1.1.5-state.json).
func runcBase() []*config.Rule {
	r := func(t config.Type, maj, min int64, p string, allow bool) *config.Rule {
		return &config.Rule{Type: t, Major: maj, Minor: min, Permissions: config.Permissions(p), Allow: allow}
	}
	return []*config.Rule{
		r('a', -1, -1, "rwm", false),
		r('b', 7, 3, "rwm", true),
		r('c', -1, -1, "m", true),
		r('b', -1, -1, "m", true),
		r('c', 1, 3, "rwm", true),
		r('c', 1, 8, "rwm", true),
		r('c', 1, 7, "rwm", true),
		r('c', 5, 0, "rwm", true),
		r('c', 1, 5, "rwm", true),
		r('c', 1, 9, "rwm", true),
		r('c', 136, -1, "rwm", true),
		r('c', 5, 2, "rwm", true),
		r('c', 10, 200, "rwm", true),
	}
}

func cgroupStrings(rules []*config.Rule) []string {
	out := make([]string, len(rules))
	for i, r := range rules {
		a := "deny"
		if r.Allow {
			a = "allow"
		}
		out[i] = a + " " + r.CgroupString()
	}
	return out
}

func TestRules(t *testing.T) {
	base := runcBase()
	baseStrings := cgroupStrings(base)
	tests := []struct {
		name    string
		base    []*config.Rule
		extra   []Dev
		added   []string // rules after base
		wantErr string
	}{
		{name: "no partitions is runc's set", base: base},
		{name: "one partition", base: base, extra: []Dev{{259, 4}},
			added: []string{"allow b 259:4 rwm"}},
		{name: "sorted, duplicates once", base: base, extra: []Dev{{259, 9}, {259, 4}, {8, 1}, {259, 4}},
			added: []string{"allow b 8:1 rwm", "allow b 259:4 rwm", "allow b 259:9 rwm"}},
		{name: "minor 0 is a number, not a wildcard", base: base, extra: []Dev{{259, 0}},
			added: []string{"allow b 259:0 rwm"}},
		{name: "no base", extra: []Dev{{259, 1}}, wantErr: "no device rules"},
		{name: "null rule", base: []*config.Rule{nil}, wantErr: "empty"},
		{name: "bad type", base: []*config.Rule{{Type: 'p', Permissions: "rwm"}}, wantErr: "not a cgroup device type"},
		{name: "bad permissions", base: []*config.Rule{{Type: 'b', Major: 1, Minor: 1, Permissions: "rwx"}}, wantErr: "permissions"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Rules(tt.base, tt.extra)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err %v, want one with %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := append(append([]string{}, baseStrings...), tt.added...)
			if g := cgroupStrings(got); strings.Join(g, "\n") != strings.Join(want, "\n") {
				t.Errorf("rules\n%s\nwant\n%s", strings.Join(g, "\n"), strings.Join(want, "\n"))
			}
			for _, r := range got[len(base):] {
				if r.Major < 0 || r.Minor < 0 {
					t.Errorf("wildcard %s among the extra rules", r.CgroupString())
				}
			}
		})
	}
	// The caller's rules are copies, never the base's own.
	got, _ := Rules(base, nil)
	got[0].Allow = true
	if base[0].Allow {
		t.Error("Rules returned the base's own rule")
	}
}

func TestParseProcCgroup(t *testing.T) {
	tests := []struct {
		name, in string
		want     procCgroup
	}{
		{name: "v2", in: "0::/machine.slice/libpod-abc.scope\n",
			want: procCgroup{v2: "/machine.slice/libpod-abc.scope", hasV2: true}},
		{name: "hybrid: v1 devices wins", in: "12:devices:/kiwi/abc\n11:cpu,cpuacct:/kiwi/abc\n1:name=systemd:/x\n0::/x\n",
			want: procCgroup{v1Devices: "/kiwi/abc", v2: "/x", hasV2: true}},
		{name: "v1 only", in: "5:devices:/a\n",
			want: procCgroup{v1Devices: "/a"}},
		{name: "dot-dot stays below the mount", in: "0::/../../etc\n",
			want: procCgroup{v2: "/etc", hasV2: true}},
		{name: "garbage", in: "nonsense\n\n::\n", want: procCgroup{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseProcCgroup(strings.NewReader(tt.in))
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}
