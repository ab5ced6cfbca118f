package loopdev

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// fakeHost is a loop driver made of plain files: nodes loop0..loop(n-1)
// under a temporary /dev and their sysfs entries, none bound. It lets
// the hand-over tests run without root and without touching the host's
// devices or its host-wide claim directory.
func fakeHost(t *testing.T, n int) *Host {
	t.Helper()
	root := t.TempDir()
	h := &Host{
		DevDir:   filepath.Join(root, "dev"),
		SysBlock: filepath.Join(root, "sys"),
		ClaimDir: filepath.Join(root, "claims"),
	}
	for i := range n {
		name := "loop" + strconv.Itoa(i)
		if err := os.MkdirAll(filepath.Join(h.SysBlock, name), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(h.SysBlock, name, "dev"), []byte("7:"+strconv.Itoa(i)+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(h.DevDir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(h.DevDir, name), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return h
}

func newFakeAllocator(t *testing.T, h *Host, capacity int) *Allocator {
	t.Helper()
	a, err := New(Options{Dir: t.TempDir(), Capacity: capacity, Host: h})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// handOver duplicates the lease's files as a unix socket's SCM_RIGHTS
// would: new descriptors of the same open files.
func handOver(t *testing.T, l *Lease) []*os.File {
	t.Helper()
	var out []*os.File
	for _, f := range l.Files() {
		fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, os.NewFile(uintptr(fd), f.Name()))
	}
	return out
}

func TestAdoptKeepsTheLeaseAfterTheGiverCloses(t *testing.T) {
	h := fakeHost(t, 4)
	a := newFakeAllocator(t, h, 4)
	giver, err := a.Acquire(t.Context(), Request{Owner: "plugin", Count: 2})
	if err != nil {
		t.Fatal(err)
	}
	devs := append([]Device(nil), giver.Devices()...)
	files := handOver(t, giver)
	giver.Close()

	l, err := a.Adopt("box1", devs, files)
	if err != nil {
		t.Fatal(err)
	}
	st, err := a.Status()
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Held) != 2 {
		t.Fatalf("held %+v, want the two adopted devices", st.Held)
	}
	for i, hd := range st.Held {
		if hd.Stale || hd.Owner != "box1" || hd.PID != os.Getpid() || hd.Device != devs[i].Path() {
			t.Errorf("holder %+v: want %s held by box1, pid %d", hd, devs[i], os.Getpid())
		}
	}
	// Nobody else can take them while the adopter holds them.
	if _, err := a.AcquireDevices("thief", devs); !errors.Is(err, ErrBusy) {
		t.Errorf("AcquireDevices of adopted devices: %v, want ErrBusy", err)
	}
	if err := l.Release(); err != nil {
		t.Fatal(err)
	}
	if st, _ := a.Status(); len(st.Held) != 0 {
		t.Errorf("after release: held %+v", st.Held)
	}
}

func TestAdoptRefuses(t *testing.T) {
	h := fakeHost(t, 4)
	a := newFakeAllocator(t, h, 4)
	tests := []struct {
		name  string
		setup func(t *testing.T) ([]Device, []*os.File)
	}{
		{"released before the hand-over", func(t *testing.T) ([]Device, []*os.File) {
			l, err := a.Acquire(t.Context(), Request{Owner: "p", Count: 1})
			if err != nil {
				t.Fatal(err)
			}
			devs := append([]Device(nil), l.Devices()...)
			files := handOver(t, l)
			l.Release()
			return devs, files
		}},
		{"another device's files", func(t *testing.T) ([]Device, []*os.File) {
			l, err := a.Acquire(t.Context(), Request{Owner: "p", Count: 1})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Release() })
			return []Device{{Index: l.Devices()[0].Index + 1}}, handOver(t, l)
		}},
		{"files opened anew, not the holder's", func(t *testing.T) ([]Device, []*os.File) {
			l, err := a.Acquire(t.Context(), Request{Owner: "p", Count: 1})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Release() })
			var files []*os.File
			for _, f := range l.Files() {
				g, err := os.Open(f.Name())
				if err != nil {
					t.Fatal(err)
				}
				files = append(files, g)
			}
			return l.Devices(), files
		}},
		{"one file per device", func(t *testing.T) ([]Device, []*os.File) {
			l, err := a.Acquire(t.Context(), Request{Owner: "p", Count: 1})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Release() })
			return l.Devices(), handOver(t, l)[:1]
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			devs, files := tt.setup(t)
			if l, err := a.Adopt("box", devs, files); err == nil {
				l.Close()
				t.Fatal("Adopt succeeded")
			}
		})
	}
}

func TestAcquireDevices(t *testing.T) {
	h := fakeHost(t, 4)
	a := newFakeAllocator(t, h, 3)
	other, err := a.AcquireDevices("other", []Device{{Index: 1}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.AcquireDevices("me", []Device{{Index: 0}, {Index: 1}}); !errors.Is(err, ErrBusy) {
		t.Fatalf("loop1 held by other: %v, want ErrBusy", err)
	}
	// The failed attempt must not have kept loop0.
	if st, _ := a.Status(); len(st.Held) != 1 {
		t.Fatalf("held %+v, want only other's loop1", st.Held)
	}
	if _, err := a.AcquireDevices("me", []Device{{Index: 0}, {Index: 2}, {Index: 3}}); !errors.Is(err, ErrBusy) {
		t.Fatalf("over capacity: %v, want ErrBusy", err)
	}
	if _, err := a.AcquireDevices("me", []Device{{Index: 0}, {Index: 0}}); err == nil {
		t.Fatal("a device named twice was accepted")
	}
	// A holder that dies leaves a stale lease; the named devices are
	// taken again.
	abandon(other)
	l, err := a.AcquireDevices("me", []Device{{Index: 0}, {Index: 1}})
	if err != nil {
		t.Fatal(err)
	}
	if got := l.Devices(); len(got) != 2 || got[0].Index != 0 || got[1].Index != 1 {
		t.Errorf("devices %v, want loop0 loop1", got)
	}
	l.Release()
}
