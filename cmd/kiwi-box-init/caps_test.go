package main

import (
	"slices"
	"testing"

	"github.com/moby/sys/capability"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

func TestCapList(t *testing.T) {
	for _, tc := range []struct {
		names []string
		want  []capability.Cap
	}{
		{nil, nil},
		{[]string{"CAP_CHOWN", "CAP_SYS_ADMIN"}, []capability.Cap{capability.CAP_CHOWN, capability.CAP_SYS_ADMIN}},
		{[]string{"CAP_NO_SUCH_THING", "chown", "CAP_KILL"}, []capability.Cap{capability.CAP_KILL}},
	} {
		got := capList(tc.names)
		if len(got) != len(tc.want) {
			t.Fatalf("capList(%q) = %v, want %v", tc.names, got, tc.want)
		}
		for i := range got {
			if got[i] != tc.want[i] {
				t.Errorf("capList(%q) = %v, want %v", tc.names, got, tc.want)
			}
		}
	}
}

func TestRaisableAmbient(t *testing.T) {
	all := []string{"CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"}
	tests := []struct {
		name string
		caps vmproto.Capabilities
		want []string
	}{
		{name: "runc spec's default: no inheritable set", caps: vmproto.Capabilities{Permitted: all, Ambient: all}},
		{name: "permitted and inheritable", caps: vmproto.Capabilities{Permitted: all, Inheritable: all, Ambient: all}, want: all},
		{name: "only what both sets hold", caps: vmproto.Capabilities{Permitted: all[:2], Inheritable: all[1:], Ambient: all}, want: all[1:2]},
		{name: "no ambient set", caps: vmproto.Capabilities{Permitted: all, Inheritable: all}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := raisableAmbient(&tt.caps); !slices.Equal(got, tt.want) {
				t.Errorf("raisableAmbient = %v, want %v", got, tt.want)
			}
		})
	}
}
