package sharefs

import (
	"path/filepath"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// TestCreateKeepsSetID: a regular file a client creates with set-id bits
// has them on the host, owned by the client's ids, as open(O_CREAT) or
// mknod would make it on a local disk: the daemon's chown of the new file
// (which clears set-id bits) does not take them. A mapped export keeps
// them in its mapping instead (TestMappedSetID).
func TestCreateKeepsSetID(t *testing.T) {
	caller := fuse.Caller{Owner: fuse.Owner{Uid: 1000, Gid: 1000}}
	for _, tc := range []struct {
		name  string
		mknod bool
		mode  uint32
	}{
		{"create set-user-ID", false, 04755},
		{"create set-user-ID and set-group-ID", false, 06755},
		{"create plain", false, 0o644},
		{"mknod set-user-ID", true, 04755},
	} {
		t.Run(tc.name, func(t *testing.T) {
			j := newJail(t, Options{Cache: CacheAlways, Xattr: true})
			h := fuse.InHeader{NodeId: 1, Caller: caller}
			var st fuse.Status
			if tc.mknod {
				var out fuse.EntryOut
				st = j.raw.Mknod(nil, &fuse.MknodIn{InHeader: h, Mode: unix.S_IFREG | tc.mode}, "new", &out)
			} else {
				var out fuse.CreateOut
				st = j.raw.Create(nil, &fuse.CreateIn{InHeader: h, Flags: unix.O_WRONLY, Mode: tc.mode}, "new", &out)
			}
			if !st.Ok() {
				t.Fatalf("create: %v", st)
			}
			var s unix.Stat_t
			if err := unix.Stat(filepath.Join(j.export, "new"), &s); err != nil {
				t.Fatal(err)
			}
			if s.Mode&07777 != tc.mode || s.Uid != 1000 || s.Gid != 1000 {
				t.Errorf("host file %#o %d:%d, want %#o 1000:1000", s.Mode&07777, s.Uid, s.Gid, tc.mode)
			}
		})
	}
}
