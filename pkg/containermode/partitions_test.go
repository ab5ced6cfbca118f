package containermode

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/devcgroup"
	"github.com/kiwi-shim/kiwi-shim/pkg/loopdev"
)

// recordingAccess is a device cgroup that records what it was told.
type recordingAccess struct {
	sets [][]devcgroup.Dev
	fail error
}

func (r *recordingAccess) Set(_ context.Context, extra []devcgroup.Dev) error {
	if r.fail != nil {
		return r.fail
	}
	r.sets = append(r.sets, slices.Clone(extra))
	return nil
}

func (r *recordingAccess) String() string { return "recording" }

func (r *recordingAccess) last() []devcgroup.Dev {
	if len(r.sets) == 0 {
		return nil
	}
	l := slices.Clone(r.sets[len(r.sets)-1])
	slices.SortFunc(l, func(a, b devcgroup.Dev) int { return int(a.Minor) - int(b.Minor) })
	return l
}

// partitionedLoop leases a loop device from a private allocator and binds
// a file with two partitions, registered as KIWI does (partx).
func partitionedLoop(t *testing.T) loopdev.Device {
	t.Helper()
	a, err := loopdev.New(loopdev.Options{Dir: t.TempDir(), Capacity: 1})
	if err != nil {
		t.Fatal(err)
	}
	l, err := a.Acquire(context.Background(), loopdev.Request{Owner: "partitions-test", Count: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Release(); err != nil {
			t.Errorf("release: %v", err)
		}
	})
	d := l.Devices()[0]
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 16<<20); err != nil {
		t.Fatal(err)
	}
	sf := exec.Command("sfdisk", "--quiet", img)
	sf.Stdin = strings.NewReader("label: gpt\n,4MiB\n,4MiB\n")
	if out, err := sf.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v: %s", err, out)
	}
	if err := loopdev.DefaultHost().Attach(d, img, loopdev.AttachOptions{}); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("partx", "-a", d.Path()).CombinedOutput(); err != nil {
		t.Fatalf("partx -a: %v: %s", err, out)
	}
	return d
}

func nodeNumber(t *testing.T, p string) (devcgroup.Dev, bool) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		return devcgroup.Dev{}, false
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		t.Fatalf("%s is not a block node", p)
	}
	return devcgroup.Dev{Major: unix.Major(st.Rdev), Minor: unix.Minor(st.Rdev)}, true
}

// TestPartitionSync drives the keeper's partition mirror over a real
// partitioned loop device, with a directory standing in for the
// container's /dev and a recording device cgroup: every partition gets
// a node with its number and is allowed, exactly those, and both go when
// the partition goes; a device cgroup that refuses leaves no node.
func TestPartitionSync(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for loop devices (run make test as root)")
	}
	d := partitionedLoop(t)
	dev := t.TempDir()
	acc := &recordingAccess{}
	ps := &partitionSync{devs: []loopdev.Device{d}, host: loopdev.DefaultHost(),
		log: slog.New(slog.NewTextHandler(io.Discard, nil)), access: acc, known: map[string]devcgroup.Dev{}}
	ps.devDir = func() (int, error) { return unix.Open(dev, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0) }
	number := func(name string) devcgroup.Dev {
		maj, min, err := partitionNumber(name)
		if err != nil {
			t.Fatal(err)
		}
		return devcgroup.Dev{Major: maj, Minor: min}
	}
	p1, p2 := number(d.Name()+"p1"), number(d.Name()+"p2")
	ctx := context.Background()

	ps.sync(ctx)
	if got := acc.last(); !slices.Equal(got, []devcgroup.Dev{p1, p2}) {
		t.Fatalf("allowed %v, want %v and %v", got, p1, p2)
	}
	for i, want := range []devcgroup.Dev{p1, p2} {
		if got, ok := nodeNumber(t, filepath.Join(dev, fmt.Sprintf("%sp%d", d.Name(), i+1))); !ok || got != want {
			t.Errorf("node p%d: %v (exists %v), want %v", i+1, got, ok, want)
		}
	}
	n := len(acc.sets)
	ps.sync(ctx)
	if len(acc.sets) != n {
		t.Errorf("an unchanged look changed the device cgroup: %v", acc.sets[n:])
	}

	// Partition 2 goes (partx -d, as KIWI's cleanup does).
	if out, err := exec.Command("partx", "-d", "--nr", "2", d.Path()).CombinedOutput(); err != nil {
		t.Fatalf("partx -d: %v: %s", err, out)
	}
	ps.sync(ctx)
	if got := acc.last(); !slices.Equal(got, []devcgroup.Dev{p1}) {
		t.Errorf("allowed %v after p2 went, want only %v", got, p1)
	}
	if _, ok := nodeNumber(t, filepath.Join(dev, d.Name()+"p2")); ok {
		t.Error("node p2 stays after the partition went")
	}

	// It comes back, but the device cgroup refuses: no node, and the
	// next look tries again.
	if out, err := exec.Command("partx", "-a", "--nr", "2", d.Path()).CombinedOutput(); err != nil {
		t.Fatalf("partx -a: %v: %s", err, out)
	}
	acc.fail = errors.New("refused")
	ps.sync(ctx)
	if _, ok := nodeNumber(t, filepath.Join(dev, d.Name()+"p2")); ok {
		t.Error("node p2 made although the device cgroup refused it")
	}
	acc.fail = nil
	ps.sync(ctx)
	p2 = number(d.Name() + "p2")
	if got := acc.last(); !slices.Equal(got, []devcgroup.Dev{p1, p2}) {
		t.Errorf("allowed %v after the retry, want %v and %v", got, p1, p2)
	}
	if got, ok := nodeNumber(t, filepath.Join(dev, d.Name()+"p2")); !ok || got != p2 {
		t.Errorf("node p2 after the retry: %v (exists %v), want %v", got, ok, p2)
	}

	// All go: nothing allowed, no node.
	if out, err := exec.Command("partx", "-d", d.Path()).CombinedOutput(); err != nil {
		t.Fatalf("partx -d: %v: %s", err, out)
	}
	ps.sync(ctx)
	if got := acc.last(); len(got) != 0 {
		t.Errorf("allowed %v after all partitions went", got)
	}
	if ents, _ := os.ReadDir(dev); len(ents) != 0 {
		t.Errorf("nodes left: %v", ents)
	}
}

// attachedLoops leases n loop devices from a private allocator and binds
// each to a file holding a DOS table with parts partitions of 1 MiB; no
// partition is registered yet.
func attachedLoops(t *testing.T, n, parts int) []loopdev.Device {
	t.Helper()
	a, err := loopdev.New(loopdev.Options{Dir: t.TempDir(), Capacity: n})
	if err != nil {
		t.Fatal(err)
	}
	l, err := a.Acquire(context.Background(), loopdev.Request{Owner: "partitions-test", Count: n})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, d := range l.Devices() {
			exec.Command("partx", "-d", d.Path()).Run()
		}
		if err := l.Release(); err != nil {
			t.Errorf("release: %v", err)
		}
	})
	table := "label: dos\n" + strings.Repeat(",1MiB,L\n", parts)
	for _, d := range l.Devices() {
		img := filepath.Join(t.TempDir(), "disk.img")
		if err := os.WriteFile(img, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(img, 16<<20); err != nil {
			t.Fatal(err)
		}
		sf := exec.Command("sfdisk", "--quiet", img)
		sf.Stdin = strings.NewReader(table)
		if out, err := sf.CombinedOutput(); err != nil {
			t.Fatalf("sfdisk: %v: %s", err, out)
		}
		if err := loopdev.DefaultHost().Attach(d, img, loopdev.AttachOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	return l.Devices()
}

func partx(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("partx", args...).CombinedOutput(); err != nil {
		t.Fatalf("partx %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// TestPartxWrapperWaitsForCurrentNode reproduces the ENXIO of
// TestParallelContainerBuilds (mkfs.ext4 on /dev/loop2p1 right after the
// kiwi box's partx wrapper) and checks its fix in the wrapper. The wrapper
// deletes the device's partitions and adds them again, which gives them
// new numbers (always on newer kernels; on older ones when a lower number
// is free); the container's node keeps the old number until the keeper
// has run. The wrapper used to wait only for the node to exist, so it
// could return with the stale node in place and mkfs then opened a number
// that no partition had. Here the keeper looks only when the test says:
// the wrapper, run in a mount namespace whose /dev is the keeper's, must
// not return before the node has the partition's current number.
func TestPartxWrapperWaitsForCurrentNode(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for loop devices and mount namespaces (run make test as root)")
	}
	wrapper, err := filepath.Abs("../../contrib/box/overlay/usr/local/sbin/partx")
	if err != nil {
		t.Fatal(err)
	}
	loops := attachedLoops(t, 2, 1)
	ours, other := loops[0], loops[1]
	// A lower number free than ours: older kernels give it to our
	// partition when the wrapper adds it again, newer ones a new one.
	partx(t, "-a", other.Path())
	partx(t, "-a", "--nr", "1", ours.Path())
	partx(t, "-d", other.Path())
	p1 := ours.Name() + "p1"

	// The container's /dev: the leased device and /dev/null, as runc
	// makes them, and the partition node from the keeper.
	dev := t.TempDir()
	maj, min, err := loopdev.DefaultHost().DevNumber(ours)
	if err != nil {
		t.Fatal(err)
	}
	for name, num := range map[string]uint64{ours.Name(): unix.Mkdev(maj, min), "null": unix.Mkdev(1, 3)} {
		mode := uint32(unix.S_IFBLK)
		if name == "null" {
			mode = unix.S_IFCHR
		}
		if err := unix.Mknod(filepath.Join(dev, name), mode|0o666, int(num)); err != nil {
			t.Fatal(err)
		}
	}
	ps := &partitionSync{devs: []loopdev.Device{ours}, host: loopdev.DefaultHost(),
		log: slog.New(slog.NewTextHandler(io.Discard, nil)), access: &recordingAccess{}, known: map[string]devcgroup.Dev{}}
	ps.devDir = func() (int, error) { return unix.Open(dev, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0) }
	ctx := context.Background()
	ps.sync(ctx)
	old, ok := nodeNumber(t, filepath.Join(dev, p1))
	if !ok {
		t.Fatal("the keeper made no partition node")
	}

	// KIWI's call, in a mount namespace where /dev is the container's;
	// then what the node is when the wrapper has returned.
	script := `mount --bind "$1" /dev || exit 1
"$2" --add "$3"; echo "rc=$?"
stat -c '%t %T' "$3p1"`
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", dev, wrapper, "/dev/"+ours.Name())
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	// The keeper does not run until the wrapper returns or waits (a
	// sleep of its loop).
	var waitErr error
	select {
	case waitErr = <-exited:
		t.Errorf("the wrapper returned before the keeper updated the node:\n%s", out.String())
	case <-waitingIn(cmd.Process.Pid, exited):
		ps.sync(ctx)
		waitErr = <-exited
	}
	if waitErr != nil {
		t.Fatalf("wrapper: %v\n%s", waitErr, out.String())
	}
	maj, min, err = partitionNumber(p1)
	if err != nil {
		t.Fatal(err)
	}
	cur := devcgroup.Dev{Major: maj, Minor: min}
	if cur == old {
		t.Fatalf("%s kept its number %v across the wrapper's delete and add; the test cannot tell", p1, old)
	}
	want := fmt.Sprintf("rc=0\n%x %x\n", cur.Major, cur.Minor)
	if out.String() != want {
		t.Errorf("after the wrapper: %q, want %q (the partition's number now; it was %v)", out.String(), want, old)
	}
}

// waitingIn is closed once a process below pid runs sleep (the wrapper's
// wait loop), unless exited fires first.
func waitingIn(pid int, exited chan error) <-chan struct{} {
	c := make(chan struct{})
	go func() {
		for {
			select {
			case err := <-exited:
				exited <- err // for the caller's select
				return
			default:
			}
			if sleepBelow(pid) {
				close(c)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	return c
}

// sleepBelow reports whether a descendant of pid runs sleep.
func sleepBelow(pid int) bool {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		if !strings.Contains(string(b), " (sleep) ") {
			continue
		}
		for p := e.Name(); p != "" && p != "0" && p != "1"; {
			pp := ppid(p)
			if pp == strconv.Itoa(pid) {
				return true
			}
			p = pp
		}
	}
	return false
}

func ppid(pid string) string {
	b, err := os.ReadFile(filepath.Join("/proc", pid, "stat"))
	if err != nil {
		return ""
	}
	// pid (comm) state ppid ...
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 2 {
		return ""
	}
	return f[1]
}
