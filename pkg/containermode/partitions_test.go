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
	"strings"
	"testing"

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
