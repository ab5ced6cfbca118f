package vm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestGuestCrash(t *testing.T) {
	for _, tc := range []struct {
		name, console, want string
	}{
		{"oops", "SeaBIOS\nBooting from ROM..[   21.228623] BUG: kernel NULL pointer dereference, address: 0000000000000000\n[   21.277470] #PF: supervisor instruction fetch\n[   21.69] Oops: Oops: 0010 [#1] PREEMPT SMP NOPTI\n",
			"BUG: kernel NULL pointer dereference, address: 0000000000000000"},
		{"panic", "[    9.1] sysrq: Trigger a crash\n[    9.2] Kernel panic - not syncing: sysrq triggered crash\n",
			"Kernel panic - not syncing: sysrq triggered crash"},
		{"gpf", "[ 3.0] general protection fault, probably for non-canonical address 0xdead: 0000 [#1]\n", "general protection fault, probably for non-canonical address 0xdead: 0000 [#1]"},
		{"clean", "SeaBIOS\n[    1.0] virtio_blk virtio1: [vda] 2048 512-byte logical blocks\n", ""},
		{"empty", "", ""},
		// Only the end of a long console is read.
		{"crash far back", "[ 1.0] BUG: early\n" + strings.Repeat("x\n", 40<<10), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "console.log")
			if err := os.WriteFile(p, []byte(tc.console), 0o600); err != nil {
				t.Fatal(err)
			}
			if got := guestCrash(p); got != tc.want {
				t.Errorf("guestCrash = %q, want %q", got, tc.want)
			}
		})
	}
	if got := guestCrash(filepath.Join(t.TempDir(), "none")); got != "" {
		t.Errorf("missing console: %q", got)
	}
}
