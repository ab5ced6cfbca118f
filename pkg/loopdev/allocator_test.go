package loopdev

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// These tests use the host's real loop driver and need root. Each test
// has an allocator directory of its own and checks at the end that every
// device it touched is detached again.

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		// The loop driver is root-only; CI runs as root, so this only
		// skips on a developer's unprivileged run.
		t.Skip("needs root for /dev/loop-control (run make test as root)")
	}
}

func newTestAllocator(t *testing.T, capacity int) *Allocator {
	t.Helper()
	needRoot(t)
	a, err := New(Options{Dir: t.TempDir(), Capacity: capacity})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// backing makes a sparse file to bind to a device.
func backing(t *testing.T, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return p
}

// assertClean fails if any of devs is still bound or has partitions.
func assertClean(t *testing.T, devs ...Device) {
	t.Helper()
	h := DefaultHost()
	for _, d := range devs {
		if b, _ := h.Bound(d); b {
			bf, _ := h.BackingFile(d)
			t.Errorf("%s still bound to %q", d, bf)
		}
		if p, _ := h.Partitions(d); len(p) > 0 {
			t.Errorf("%s still has partitions %v", d, p)
		}
	}
}

// abandon simulates the holder dying: its lease files close without any
// cleanup, exactly what the kernel does on kill -9.
func abandon(l *Lease) {
	for _, f := range l.Files() {
		f.Close()
	}
	l.files, l.devs, l.claims = nil, nil, nil
}

// TestSeparateDirectoriesShareTheHost: two allocators with their own lease
// directories (a test's private one beside the host's) never lease the
// same device, and a stale lease in one never detaches a device that the
// other has leased and attached since.
func TestSeparateDirectoriesShareTheHost(t *testing.T) {
	a := newTestAllocator(t, 2)
	b := newTestAllocator(t, 2)
	ctx := context.Background()
	la, err := a.Acquire(ctx, Request{Owner: "a", Count: 2})
	if err != nil {
		t.Fatal(err)
	}
	lb, err := b.Acquire(ctx, Request{Owner: "b", Count: 2})
	if err != nil {
		t.Fatal(err)
	}
	for _, da := range la.Devices() {
		for _, db := range lb.Devices() {
			if da == db {
				t.Fatalf("%s leased by both allocators (a %v, b %v)", da, la.Devices(), lb.Devices())
			}
		}
	}
	// a's holder dies before attaching; b takes the device over and binds
	// a file to it. a's next look at its leases must leave it bound.
	first := la.Devices()[0]
	abandon(la)
	if err := lb.Release(); err != nil {
		t.Fatal(err)
	}
	lb, err = b.Acquire(ctx, Request{Owner: "b", Count: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer assertClean(t, first)
	defer lb.Release()
	if got := lb.Devices()[0]; got != first {
		t.Fatalf("b got %s, want the free %s", got, first)
	}
	h := DefaultHost()
	if err := h.Attach(first, backing(t, 1<<20), AttachOptions{}); err != nil {
		t.Fatal(err)
	}
	st, err := a.Status() // reaps a's stale lease of first
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Held) != 0 {
		t.Errorf("a still accounts %+v", st.Held)
	}
	if bound, _ := h.Bound(first); !bound {
		t.Fatalf("a's stale lease detached %s, which b holds", first)
	}
	if _, err := os.Stat(a.leasePath(first)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a's stale lease file of %s stays: %v", first, err)
	}
}

func TestAcquireGivesFreeDevicesAndReleaseDetaches(t *testing.T) {
	a := newTestAllocator(t, 3)
	l, err := a.Acquire(context.Background(), Request{Owner: "t", Count: 2})
	if err != nil {
		t.Fatal(err)
	}
	devs := append([]Device(nil), l.Devices()...)
	if len(devs) != 2 || devs[0] == devs[1] {
		t.Fatalf("got devices %v, want two distinct", devs)
	}
	assertClean(t, devs...)
	h := DefaultHost()
	img := backing(t, 8<<20)
	if err := h.Attach(devs[0], img, AttachOptions{}); err != nil {
		t.Fatal(err)
	}
	if bf, _ := h.BackingFile(devs[0]); bf != img {
		t.Fatalf("backing file %q, want %q", bf, img)
	}
	st, err := a.Status()
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Held) != 2 || st.Held[0].Owner != "t" || st.Held[0].PID != os.Getpid() || st.Capacity != 3 {
		t.Fatalf("status %+v", st)
	}
	if err := l.Release(); err != nil {
		t.Fatal(err)
	}
	if err := l.Release(); err != nil {
		t.Fatalf("second release: %v", err)
	}
	assertClean(t, devs...)
	if st, _ := a.Status(); len(st.Held) != 0 {
		t.Fatalf("still held after release: %+v", st)
	}
}

func TestRequestValidation(t *testing.T) {
	a := newTestAllocator(t, 2)
	for _, tc := range []struct {
		name string
		req  Request
	}{
		{"zero", Request{Owner: "x", Count: 0}},
		{"above capacity", Request{Owner: "x", Count: 3}},
		{"no owner", Request{Count: 1}},
		{"newline owner", Request{Owner: "a\nb", Count: 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if l, err := a.Acquire(context.Background(), tc.req); err == nil {
				l.Release()
				t.Fatal("accepted")
			}
		})
	}
	if st, _ := a.Status(); len(st.Held) != 0 || st.Waiting != 0 {
		t.Fatalf("bad requests left state: %+v", st)
	}
}

func TestFailFastAndTimeout(t *testing.T) {
	a := newTestAllocator(t, 1)
	l, err := a.Acquire(context.Background(), Request{Owner: "holder", Count: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Release()
	if _, err := a.Acquire(context.Background(), Request{Owner: "x", Count: 1}); !errors.Is(err, ErrBusy) {
		t.Fatalf("no-wait acquire: %v, want ErrBusy", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := a.Acquire(ctx, Request{Owner: "x", Count: 1, Wait: true}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("waiting acquire: %v, want deadline exceeded", err)
	}
	if st, _ := a.Status(); st.Waiting != 0 {
		t.Fatalf("timed-out waiter still queued: %+v", st)
	}
}

// TestFIFO queues waiters one at a time and checks they are served in
// arrival order, with never more devices out than the capacity.
func TestFIFO(t *testing.T) {
	const capacity, waiters = 2, 6
	a := newTestAllocator(t, capacity)
	var held []*Lease
	for range capacity {
		l, err := a.Acquire(context.Background(), Request{Owner: "first", Count: 1})
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, l)
	}
	var (
		mu     sync.Mutex
		grants = make([]time.Time, waiters)
		active int
		peak   int
		wg     sync.WaitGroup
	)
	for i := range waiters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l, err := a.Acquire(context.Background(), Request{Owner: "w", Count: 1, Wait: true})
			if err != nil {
				t.Error(err)
				return
			}
			grants[i] = l.Since()
			mu.Lock()
			active++
			peak = max(peak, active)
			mu.Unlock()
			time.Sleep(20 * time.Millisecond)
			mu.Lock()
			active--
			mu.Unlock()
			if err := l.Release(); err != nil {
				t.Error(err)
			}
		}()
		waitFor(t, func(st Status) bool { return st.Waiting == i+1 }, a)
	}
	for _, l := range held {
		l.Release()
	}
	wg.Wait()
	for i := 1; i < waiters; i++ {
		if grants[i].Before(grants[i-1]) {
			t.Fatalf("waiter %d served at %v before waiter %d at %v", i, grants[i], i-1, grants[i-1])
		}
	}
	if peak > capacity {
		t.Fatalf("%d leases at once, capacity %d", peak, capacity)
	}
}

func waitFor(t *testing.T, cond func(Status) bool, a *Allocator) {
	t.Helper()
	for range 500 {
		st, err := a.Status()
		if err != nil {
			t.Fatal(err)
		}
		if cond(st) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("condition not reached in 5s")
}

func TestStaleLeaseIsCleaned(t *testing.T) {
	a := newTestAllocator(t, 1)
	l, err := a.Acquire(context.Background(), Request{Owner: "crasher", Count: 1})
	if err != nil {
		t.Fatal(err)
	}
	d := l.Devices()[0]
	if err := DefaultHost().Attach(d, backing(t, 8<<20), AttachOptions{}); err != nil {
		t.Fatal(err)
	}
	abandon(l)
	// The next acquirer gets the device back, detached.
	l2, err := a.Acquire(context.Background(), Request{Owner: "next", Count: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Release()
	assertClean(t, d)
}

// TestStalePartitionIsCleaned reproduces what a failed KIWI build leaves:
// a detached device that still has a partition node registered by BLKPG.
func TestStalePartitionIsCleaned(t *testing.T) {
	a := newTestAllocator(t, 1)
	l, err := a.Acquire(context.Background(), Request{Owner: "crasher", Count: 1})
	if err != nil {
		t.Fatal(err)
	}
	d := l.Devices()[0]
	h := DefaultHost()
	if err := h.Attach(d, backing(t, 16<<20), AttachOptions{}); err != nil {
		t.Fatal(err)
	}
	addPartition(t, d, 1, 1<<20, 4<<20)
	if p, _ := h.Partitions(d); len(p) != 1 {
		t.Fatalf("partitions %v after BLKPG add", p)
	}
	// Detach the backing file only, as `losetup -d` does, and die.
	f, err := os.Open(d.Path())
	if err != nil {
		t.Fatal(err)
	}
	unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0)
	f.Close()
	abandon(l)
	if _, err := a.Status(); err != nil {
		t.Fatal(err)
	}
	assertClean(t, d)
}

func addPartition(t *testing.T, d Device, pno int, start, length int64) {
	t.Helper()
	f, err := os.Open(d.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := blkpgPartition{Start: start, Length: length, Pno: int32(pno)}
	arg := unix.BlkpgIoctlArg{Op: unix.BLKPG_ADD_PARTITION, Datalen: int32(unsafe.Sizeof(p)), Data: (*byte)(unsafe.Pointer(&p))}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), blkpg, uintptr(unsafe.Pointer(&arg))); errno != 0 {
		t.Fatalf("BLKPG add partition: %v", errno)
	}
}

func TestAttachOptions(t *testing.T) {
	a := newTestAllocator(t, 1)
	l, err := a.Acquire(context.Background(), Request{Owner: "t", Count: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Release()
	d := l.Devices()[0]
	h := DefaultHost()
	// Autoclear detaches on last close; Attach closes its own handle, so
	// with nobody else holding the device it is free again at once.
	if err := h.Attach(d, backing(t, 8<<20), AttachOptions{Autoclear: true}); err != nil {
		t.Fatal(err)
	}
	waitUnbound(t, d)
	if err := h.Attach(d, backing(t, 8<<20), AttachOptions{ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	ro, err := os.ReadFile(filepath.Join("/sys/block", d.Name(), "ro"))
	if err != nil || string(ro) != "1\n" {
		t.Fatalf("ro = %q, %v", ro, err)
	}
	if err := h.Attach(d, backing(t, 8<<20), AttachOptions{}); !errors.Is(err, unix.EBUSY) {
		t.Fatalf("second attach: %v, want EBUSY", err)
	}
}

func waitUnbound(t *testing.T, d Device) {
	t.Helper()
	for range 100 {
		if b, _ := DefaultHost().Bound(d); !b {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s still bound", d)
}

// TestHolderProcessDeath kills a real process that holds a lease.
func TestHolderProcessDeath(t *testing.T) {
	a := newTestAllocator(t, 1)
	l, err := a.Acquire(context.Background(), Request{Owner: "parent", Count: 1})
	if err != nil {
		t.Fatal(err)
	}
	// A child inherits the lease; our own copy goes away as if we had
	// handed it over.
	cmd := exec.Command("sleep", "60")
	cmd.ExtraFiles = l.Files()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	abandon(l)
	if _, err := a.Acquire(context.Background(), Request{Owner: "x", Count: 1}); !errors.Is(err, ErrBusy) {
		t.Fatalf("lease inherited by a live child was handed out again: %v", err)
	}
	cmd.Process.Kill()
	cmd.Wait()
	l2, err := a.Acquire(context.Background(), Request{Owner: "x", Count: 1})
	if err != nil {
		t.Fatalf("after the holder died: %v", err)
	}
	l2.Release()
}

func TestParseDevice(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int
		ok   bool
	}{
		{"loop0", 0, true}, {"/dev/loop12", 12, true}, {"loop", 0, false},
		{"loop-1", 0, false}, {"sda", 0, false}, {"loop1p1", 0, false},
	} {
		d, err := ParseDevice(tc.in)
		if (err == nil) != tc.ok || (tc.ok && d.Index != tc.want) {
			t.Errorf("ParseDevice(%q) = %v, %v", tc.in, d, err)
		}
	}
}
