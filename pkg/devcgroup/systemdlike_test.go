package devcgroup

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	ccg2 "github.com/containerd/cgroups/v3/cgroup2"
	"github.com/opencontainers/cgroups"
	"github.com/opencontainers/cgroups/devices/config"
	"github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// fakeSystemd plays systemd's part for a unit on a private cgroup v2
// directory: SetDeviceAllow builds a program of its own from the rules,
// attaches it beside whatever is there (BPF_F_ALLOW_MULTI) and then
// detaches the one it attached before, as systemd's bpf-devices does. Its
// program is built by another library (containerd's) than the keeper's.
type fakeSystemd struct {
	dir  string
	prog *ebpf.Program // attached now, nil before the first call
}

func (f *fakeSystemd) String() string { return "fake systemd unit" }

func (f *fakeSystemd) SetDeviceAllow(_ context.Context, rules []*config.Rule) error {
	var spec []specs.LinuxDeviceCgroup
	for _, r := range rules {
		// containerd's filter takes -1 for a wildcard number.
		maj, min := r.Major, r.Minor
		spec = append(spec, specs.LinuxDeviceCgroup{Allow: r.Allow, Type: string(r.Type), Major: &maj, Minor: &min, Access: string(r.Permissions)})
	}
	insts, license, err := ccg2.DeviceFilter(spec)
	if err != nil {
		return err
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.CGroupDevice, Instructions: insts, License: license})
	if err != nil {
		return err
	}
	dirf, err := os.Open(f.dir)
	if err != nil {
		prog.Close()
		return err
	}
	defer dirf.Close()
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{Target: int(dirf.Fd()), Program: prog,
		Attach: ebpf.AttachCGroupDevice, Flags: unix.BPF_F_ALLOW_MULTI}); err != nil {
		prog.Close()
		return err
	}
	if f.prog != nil {
		// systemd ignores a failed detach (someone else took it off).
		link.RawDetachProgram(link.RawDetachProgramOptions{Target: int(dirf.Fd()), Program: f.prog, Attach: ebpf.AttachCGroupDevice})
		f.prog.Close()
	}
	f.prog = prog
	return nil
}

// TestV2BesideSystemdProgram: on a cgroup with runc's filter and a
// systemd-like program beside it (programs on a cgroup are ANDed), the
// keeper's Set must open exactly the partitions it hands over, and at no
// look may the cgroup be without a program or the foreign partition open.
// The guest of make test-cgroup2 runs the same against real systemd
// (TestV2SystemdScope, TestV2SystemdRuncSequence).
func TestV2BesideSystemdProgram(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount cgroup2, load BPF programs and attach loop devices")
	}
	dir := cgroup2(t)
	loop, loopNum, parts := partitionedLoop(t)
	nodes := t.TempDir()
	mk := func(name string, d Dev) string {
		p := filepath.Join(nodes, name)
		if err := unix.Mknod(p, unix.S_IFBLK|0o600, int(unix.Mkdev(d.Major, d.Minor))); err != nil {
			t.Fatal(err)
		}
		return p
	}
	loopNode := mk(loop.Name(), loopNum)
	p1 := mk(loop.Name()+"p1", parts[0])
	foreign := mk(loop.Name()+"p2", parts[1])
	base := runcBase()
	base[1].Major, base[1].Minor = int64(loopNum.Major), int64(loopNum.Minor)

	sd := &fakeSystemd{dir: dir}
	t.Cleanup(func() {
		if sd.prog != nil {
			sd.prog.Close()
		}
	})
	// runc with --systemd-cgroup: the unit's properties, then its filter.
	if err := sd.SetDeviceAllow(context.Background(), base); err != nil {
		t.Fatal(err)
	}
	if err := cgroups.DevicesSetV2(dir, &cgroups.Resources{Devices: base}); err != nil {
		t.Fatal(err)
	}
	// Which is what runc 1.1 does when systemd has attached first: it
	// replaces systemd's program in place. Attach systemd's again, as
	// systemd does at its next look at the unit.
	if err := sd.SetDeviceAllow(context.Background(), base); err != nil {
		t.Fatal(err)
	}
	if ids, err := attached(dir); err != nil || len(ids) != 2 {
		t.Fatalf("before the keeper: programs %v, %v; want runc's and systemd's", ids, err)
	}
	op := startOpener(t)
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(fmt.Sprint(op.cmd.Process.Pid)), 0); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	w := watch(dir, stop, &wg)

	v2, err := NewV2(dir, base, sd)
	if err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		name  string
		extra []Dev
		p1    string
	}{
		{"runc's and systemd's", nil, "EPERM"},
		{"partition 1 handed over", []Dev{parts[0]}, "ok"},
		{"partition 1 gone", nil, "EPERM"},
		{"handed over again", []Dev{parts[0]}, "ok"},
	}
	for _, s := range steps {
		if err := v2.Set(context.Background(), s.extra); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		ids, _ := attached(dir)
		for p, want := range map[string]string{loopNode: "ok", p1: s.p1, foreign: "EPERM"} {
			if got := op.open(t, p); got != want {
				t.Errorf("%s: open %s (%s): %s, want %s (programs %v)", s.name, filepath.Base(p), devOf(p), got, want, ids)
			}
		}
	}
	close(stop)
	wg.Wait()
	if err, _ := w.err.Load().(error); err != nil {
		t.Fatalf("watcher: %v", err)
	}
	t.Logf("watcher: %d looks, between %d and %d programs", w.looks.Load(), w.fewest.Load(), w.most.Load())
	if w.looks.Load() == 0 || w.fewest.Load() < 1 {
		t.Errorf("the cgroup was without a device program at some look (fewest %d)", w.fewest.Load())
	}
}
