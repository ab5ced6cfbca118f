package main

import (
	"testing"

	"github.com/moby/sys/capability"
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
