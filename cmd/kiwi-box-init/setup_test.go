package main

import (
	"testing"

	"golang.org/x/sys/unix"
)

func TestParseOptions(t *testing.T) {
	for _, tc := range []struct {
		opts  []string
		flags uintptr
		data  string
		prop  uintptr
	}{
		{nil, 0, "", 0},
		{[]string{"nosuid", "strictatime", "mode=755", "size=1k"}, unix.MS_NOSUID | unix.MS_STRICTATIME, "mode=755,size=1k", 0},
		{[]string{"rbind", "ro", "rslave"}, unix.MS_BIND | unix.MS_REC | unix.MS_RDONLY, "", unix.MS_SLAVE | unix.MS_REC},
		{[]string{"bind", "shared"}, unix.MS_BIND, "", unix.MS_SHARED},
		// The last propagation word wins.
		{[]string{"private", "unbindable"}, 0, "", unix.MS_UNBINDABLE},
		{[]string{"rw", "z", "nodev"}, unix.MS_NODEV, "", 0},
	} {
		flags, data := parseOptions(tc.opts)
		if flags != tc.flags || data != tc.data {
			t.Errorf("parseOptions(%q) = %#x, %q; want %#x, %q", tc.opts, flags, data, tc.flags, tc.data)
		}
		if p := propagation(tc.opts); p != tc.prop {
			t.Errorf("propagation(%q) = %#x, want %#x", tc.opts, p, tc.prop)
		}
	}
}
