package sharefs

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// TestKillPrivOnWrite: a write the client marks FUSE_WRITE_KILL_SUIDGID
// clears the set-user-ID bit, and the set-group-ID bit of a
// group-executable file, before the data lands; an unmarked write (a
// writer with CAP_FSETID) keeps them, as on a local file system.
func TestKillPrivOnWrite(t *testing.T) {
	for _, tc := range []struct {
		name       string
		mode, want uint32
		flags      uint32
		vector     bool // Writev, as go-fuse's protocol server calls it
	}{
		{"setuid and setgid, group-executable", 06775, 0775, fuse.WRITE_KILL_SUIDGID, false},
		{"setgid without group execute stays", 06765, 02765, fuse.WRITE_KILL_SUIDGID, false},
		{"setuid only", 04755, 0755, fuse.WRITE_KILL_SUIDGID, false},
		{"no set-id bits", 0644, 0644, fuse.WRITE_KILL_SUIDGID, false},
		{"writer with CAP_FSETID", 06775, 06775, 0, false},
		{"Writev", 06775, 0775, fuse.WRITE_KILL_SUIDGID, true},
		{"Writev, writer with CAP_FSETID", 06775, 06775, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			j := newJail(t, Options{Cache: CacheAlways, Xattr: true})
			host := filepath.Join(j.export, "prog")
			if err := os.WriteFile(host, []byte("#!/bin/sh\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := unix.Chmod(host, tc.mode); err != nil {
				t.Fatal(err)
			}
			raw := KillPrivOnWrite(j.raw)
			node, st := j.lookup(t, 1, "prog")
			if !st.Ok() {
				t.Fatalf("lookup: %v", st)
			}
			var open fuse.OpenOut
			if st := raw.Open(nil, &fuse.OpenIn{InHeader: *hdr(node), Flags: unix.O_WRONLY}, &open); !st.Ok() {
				t.Fatalf("open: %v", st)
			}
			defer raw.Release(nil, &fuse.ReleaseIn{InHeader: *hdr(node), Fh: open.Fh})
			data := []byte("echo changed\n")
			in := &fuse.WriteIn{InHeader: *hdr(node), Fh: open.Fh, Offset: 10, Size: uint32(len(data)), WriteFlags: tc.flags}
			var n uint32
			if tc.vector {
				n, st = raw.Writev(nil, in, [][]byte{data[:5], data[5:]})
			} else {
				n, st = raw.Write(nil, in, data)
			}
			if !st.Ok() || int(n) != len(data) {
				t.Fatalf("write: %d, %v", n, st)
			}
			var fi unix.Stat_t
			if err := unix.Stat(host, &fi); err != nil {
				t.Fatal(err)
			}
			if got := fi.Mode & 07777; got != tc.want {
				t.Errorf("mode after the write %#o, want %#o", got, tc.want)
			}
			if b, _ := os.ReadFile(host); string(b) != "#!/bin/sh\necho changed\n" {
				t.Errorf("content %q", b)
			}
		})
	}
}
