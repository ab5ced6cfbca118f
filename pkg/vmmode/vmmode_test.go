//lint:file-ignore SA1019 prestart hooks are deprecated, but engines still use them

package vmmode

import (
	"context"
	"encoding/json"
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
	"sync"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/gc"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmnet"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// The fakes stand at the process boundary: fakeMonitor for the monitor's
// socket (and vm.Stop), fakeHost for starting and killing processes and
// for the cgroup, scratch disk and network. Nothing here starts QEMU.

// fakeMonitor answers for one box.
type fakeMonitor struct {
	mu    sync.Mutex
	state vmproto.State
	// err is returned by every request; stateErr by State only.
	err, stateErr error
	calls         []string
}

var _ Monitor = (*fakeMonitor)(nil)

func (f *fakeMonitor) record(c string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, c)
}

func (f *fakeMonitor) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

func (f *fakeMonitor) State(string) (vmproto.State, error) {
	f.record("state")
	if f.stateErr != nil {
		return vmproto.State{}, f.stateErr
	}
	return f.state, f.err
}
func (f *fakeMonitor) Start(string) error { f.record("start"); return f.err }
func (f *fakeMonitor) Signal(_ string, sig int, all bool) error {
	f.record(fmt.Sprintf("signal %d %v", sig, all))
	return f.err
}
func (f *fakeMonitor) Pause(string) error  { f.record("pause"); return f.err }
func (f *fakeMonitor) Resume(string) error { f.record("resume"); return f.err }
func (f *fakeMonitor) Stop(dir string, pid int, timeout time.Duration) {
	f.record(fmt.Sprintf("stop %s %d %s", filepath.Base(dir), pid, timeout))
}

// fakeHost records what was done to the host. Its StartProcess runs the
// monitor as a shell script (monitorScript) that speaks the monitor's
// pipe protocol (the go-ahead on fd 4, ready on fd 3), instead of
// kiwi-shim vm-monitor.
type fakeHost struct {
	mu sync.Mutex
	// helpers are the processes Helpers reports.
	helpers []gc.Proc
	// monitorScript is the monitor's body; startErr fails the start.
	monitorScript string
	startErr      error
	// scratchDir receives scratch images; scratchErr fails them.
	scratchDir string
	scratchErr error
	// cgroupCreateErr, cgroupRemoveErr, cpuErr and teardownErr fail
	// those steps.
	cgroupCreateErr, cgroupRemoveErr, cpuErr, teardownErr error

	calls   []string
	started []*exec.Cmd
	pids    []int
	// joined and cloneflags are the namespaces the last monitor was to
	// join and to get new.
	joined     map[int]string
	cloneflags uintptr
}

var _ Host = (*fakeHost)(nil)

func (f *fakeHost) record(c string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, c)
}

func (f *fakeHost) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

func (f *fakeHost) StartProcess(cmd *exec.Cmd, join map[int]string) error {
	f.record("start " + strings.Join(cmd.Args[1:], " "))
	f.mu.Lock()
	f.joined = join
	f.cloneflags = cmd.SysProcAttr.Cloneflags
	f.mu.Unlock()
	if f.startErr != nil {
		return f.startErr
	}
	// The script stands in for the monitor: same descriptors (the ready
	// pipe at 3, the go-ahead pipe at 4), none of the namespaces.
	cmd.Path, cmd.Args = "/bin/sh", []string{"sh", "-c", f.monitorScript}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, nil, nil
	cmd.SysProcAttr.Cloneflags = 0
	if err := cmd.Start(); err != nil {
		return err
	}
	f.mu.Lock()
	f.started = append(f.started, cmd)
	f.pids = append(f.pids, cmd.Process.Pid)
	f.mu.Unlock()
	return nil
}

func (f *fakeHost) Helpers(string) []gc.Proc { f.record("helpers"); return f.helpers }
func (f *fakeHost) Kill(pid int) error       { f.record("kill " + strconv.Itoa(pid)); return nil }
func (f *fakeHost) CreateCgroup(p string) error {
	f.record("cgroup create " + p)
	return f.cgroupCreateErr
}
func (f *fakeHost) RemoveCgroup(p string, timeout time.Duration) error {
	f.record(fmt.Sprintf("cgroup remove %s %s", p, timeout))
	return f.cgroupRemoveErr
}
func (f *fakeHost) LeaveCgroup() error { f.record("cgroup leave"); return nil }
func (f *fakeHost) CreateScratch(_ context.Context, _, id string, size int64) (string, error) {
	f.record(fmt.Sprintf("scratch %s %d", id, size))
	if f.scratchErr != nil {
		return "", f.scratchErr
	}
	p := filepath.Join(f.scratchDir, id+".img")
	return p, os.WriteFile(p, nil, 0o600)
}
func (f *fakeHost) SetCPU(p string, cpu *specs.LinuxCPU) error {
	f.record(fmt.Sprintf("cgroup cpu %s %d", p, *cpu.Shares))
	return f.cpuErr
}
func (f *fakeHost) PlanNetwork(ns string) vm.NetworkPlan {
	f.record("net plan " + ns)
	return vm.NetworkPlan{Mode: vm.NetTap, Why: "fake", NetNS: ns}
}
func (f *fakeHost) TeardownNetwork(st *vmnet.State) error {
	f.record("net teardown " + st.NetNS)
	return f.teardownErr
}

// has reports whether calls holds one starting with prefix.
func has(calls []string, prefix string) bool {
	return slices.ContainsFunc(calls, func(c string) bool { return strings.HasPrefix(c, prefix) })
}

func newManager(t *testing.T, h *fakeHost, mon *fakeMonitor) *Manager {
	t.Helper()
	return &Manager{
		Config: config.Default(),
		Store:  state.NewStore(t.TempDir()),
		Log:    slog.New(slog.NewTextHandler(io.Discard, nil)),
		Host:   h, Monitor: mon,
	}
}

// newRecord stores a VM record for id.
func newRecord(t *testing.T, m *Manager, id string) *state.Container {
	t.Helper()
	rec := &state.Container{ID: id, Bundle: "/bundle", Mode: config.ModeVM, Created: time.Unix(1700000000, 0).UTC(), Annotations: map[string]string{"a": "b"}}
	if err := m.Store.Create(rec); err != nil {
		t.Fatal(err)
	}
	if err := m.Store.Save(rec); err != nil {
		t.Fatal(err)
	}
	return rec
}

// hookTo is a hook that appends its stage and the state it got to out,
// and fails when fail is set.
func hookTo(out, stage string, fail bool) specs.Hook {
	script := fmt.Sprintf(`{ printf '%s '; cat; echo; } >> %q`, stage, out)
	if fail {
		script += "; exit 3"
	}
	return specs.Hook{Path: "/bin/sh", Args: []string{"sh", "-c", script}}
}

// hookLog returns the stages and states the hooks of hookTo got.
func hookLog(t *testing.T, out string) map[string]specs.State {
	t.Helper()
	got := map[string]specs.State{}
	b, err := os.ReadFile(out)
	if errors.Is(err, os.ErrNotExist) {
		return got
	}
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		stage, js, _ := strings.Cut(line, " ")
		var st specs.State
		if err := json.Unmarshal([]byte(js), &st); err != nil {
			t.Fatalf("hook %s got %q: %v", stage, js, err)
		}
		got[stage] = st
	}
	return got
}

func TestState(t *testing.T) {
	for _, tc := range []struct {
		name       string
		mon        *fakeMonitor
		wantStatus string
		wantPid    int
	}{
		{"running", &fakeMonitor{state: vmproto.State{Status: "running", Pid: 42}}, "running", 42},
		{"paused", &fakeMonitor{state: vmproto.State{Status: "paused", Pid: 42}}, "paused", 42},
		{"monitor gone", &fakeMonitor{stateErr: vm.ErrMonitorGone}, "stopped", 0},
		{"monitor broken", &fakeMonitor{stateErr: errors.New("garbled")}, "stopped", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newManager(t, &fakeHost{}, tc.mon)
			rec := newRecord(t, m, "box")
			st, err := m.State(context.Background(), rec)
			if err != nil {
				t.Fatal(err)
			}
			if st.Status != tc.wantStatus || st.Pid != tc.wantPid {
				t.Errorf("state = %s pid %d, want %s pid %d", st.Status, st.Pid, tc.wantStatus, tc.wantPid)
			}
			if st.ID != "box" || st.Bundle != "/bundle" || st.Annotations["a"] != "b" || st.Created != "2023-11-14T22:13:20Z" || st.Owner != "root" || st.OCIVersion != specs.Version {
				t.Errorf("state = %+v", st)
			}
		})
	}
}

// TestRequests: a monitor that is gone is a container that is not
// running, in runc's words; other errors pass as they are.
func TestRequests(t *testing.T) {
	other := errors.New("other")
	ops := map[string]func(*Manager, *state.Container) error{
		"signal 9 true": func(m *Manager, rec *state.Container) error {
			return m.Signal(context.Background(), rec, 9, true)
		},
		"pause":  func(m *Manager, rec *state.Container) error { return m.Pause(context.Background(), rec) },
		"resume": func(m *Manager, rec *state.Container) error { return m.Resume(context.Background(), rec) },
	}
	for call, op := range ops {
		for _, tc := range []struct {
			name       string
			err        error
			notRunning bool
		}{
			{"ok", nil, false},
			{"gone", vm.ErrMonitorGone, true},
			{"other", other, false},
		} {
			t.Run(call+"/"+tc.name, func(t *testing.T) {
				mon := &fakeMonitor{err: tc.err}
				m := newManager(t, &fakeHost{}, mon)
				err := op(m, newRecord(t, m, "box"))
				if !errors.Is(err, tc.err) {
					t.Fatalf("err = %v, want %v", err, tc.err)
				}
				if got := err != nil && strings.HasPrefix(err.Error(), "container not running: "); got != tc.notRunning {
					t.Errorf("err = %v: 'container not running' %v, want %v", err, got, tc.notRunning)
				}
				if c := mon.Calls(); !slices.Equal(c, []string{call}) {
					t.Errorf("monitor calls = %q, want %q", c, call)
				}
			})
		}
	}
}

func TestStart(t *testing.T) {
	for _, tc := range []struct {
		name     string
		err      error
		hookFail bool
		wantErr  bool
		wantHook bool
	}{
		{"started", nil, false, false, true},
		{"poststart fails: logged, started", nil, true, false, true},
		{"monitor refuses: no poststart", errors.New("not created"), false, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mon := &fakeMonitor{err: tc.err}
			m := newManager(t, &fakeHost{}, mon)
			rec := newRecord(t, m, "box")
			rec.Pid = 77
			out := filepath.Join(t.TempDir(), "hooks")
			rec.Hooks = &specs.Hooks{Poststart: []specs.Hook{hookTo(out, "poststart", tc.hookFail)}}
			if err := m.Start(context.Background(), rec); (err != nil) != tc.wantErr {
				t.Fatalf("Start = %v, want error %v", err, tc.wantErr)
			}
			st, ran := hookLog(t, out)["poststart"]
			if ran != tc.wantHook {
				t.Fatalf("poststart ran %v, want %v", ran, tc.wantHook)
			}
			if ran && (st.Status != specs.StateRunning || st.Pid != 77 || st.Bundle != "/bundle") {
				t.Errorf("poststart state = %+v", st)
			}
		})
	}
}

// TestDelete: the state decides whether delete without force may go;
// then the box is released, poststop runs and the record goes.
func TestDelete(t *testing.T) {
	for _, tc := range []struct {
		status  string
		force   bool
		wantErr bool
	}{
		{"running", false, true},
		{"creating", false, true},
		{"paused", false, true},
		{"created", false, false},
		{"stopped", false, false},
		{"running", true, false},
		{"paused", true, false},
	} {
		t.Run(fmt.Sprintf("%s/force=%v", tc.status, tc.force), func(t *testing.T) {
			mon := &fakeMonitor{state: vmproto.State{Status: tc.status, Pid: 5}}
			h := &fakeHost{}
			m := newManager(t, h, mon)
			rec := newRecord(t, m, "box")
			rec.Pid = 1234
			out := filepath.Join(t.TempDir(), "hooks")
			rec.Hooks = &specs.Hooks{Poststop: []specs.Hook{hookTo(out, "poststop", true)}}
			err := m.Delete(context.Background(), rec, tc.force)
			if (err != nil) != tc.wantErr {
				t.Fatalf("Delete = %v, want error %v", err, tc.wantErr)
			}
			_, loadErr := m.Store.Load("box")
			stopped := has(mon.Calls(), "stop ")
			st, ran := hookLog(t, out)["poststop"]
			if tc.wantErr {
				if loadErr != nil || stopped || ran {
					t.Errorf("refused delete: record err %v, stopped %v, poststop %v", loadErr, stopped, ran)
				}
				if !strings.Contains(err.Error(), "that is "+tc.status) {
					t.Errorf("err = %v", err)
				}
				return
			}
			if !errors.Is(loadErr, state.ErrNotExist) {
				t.Errorf("record after delete: %v", loadErr)
			}
			if want := fmt.Sprintf("stop box 1234 %s", ReleaseTimeout); !slices.Contains(mon.Calls(), want) {
				t.Errorf("monitor calls %q, want %q", mon.Calls(), want)
			}
			// A failing poststop hook is logged; delete goes on.
			if !ran || st.Status != specs.StateStopped || st.Pid != 0 {
				t.Errorf("poststop ran %v with %+v", ran, st)
			}
		})
	}
}

// TestRelease covers the one release path: what it stops, kills, tears
// down and removes, and what it keeps in the record when a step fails.
func TestRelease(t *testing.T) {
	for _, tc := range []struct {
		name                      string
		scratch, cgroup, network  bool
		scratchGone               bool
		cgroupRemoveErr, netErr   error
		wantScratch, wantCgroup   bool // still recorded afterwards
		wantNetFile, wantTeardown bool
	}{
		{name: "nothing held"},
		{name: "everything", scratch: true, cgroup: true, network: true, wantTeardown: true},
		{name: "scratch already gone", scratch: true, scratchGone: true},
		{name: "cgroup stays", cgroup: true, cgroupRemoveErr: errors.New("busy"), wantCgroup: true},
		{name: "network teardown fails", network: true, netErr: errors.New("no netns"), wantNetFile: true, wantTeardown: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			self := os.Getpid()
			h := &fakeHost{
				helpers:         []gc.Proc{{Pid: 4001, Argv: []string{"/usr/bin/qemu-system-x86_64"}}, {Pid: self, Argv: []string{"kiwi-shim"}}},
				cgroupRemoveErr: tc.cgroupRemoveErr, teardownErr: tc.netErr,
			}
			mon := &fakeMonitor{}
			m := newManager(t, h, mon)
			rec := newRecord(t, m, "box")
			rec.Pid = 99
			dir := m.Store.Dir("box")
			if tc.scratch {
				rec.Scratch = filepath.Join(t.TempDir(), "box.img")
				if !tc.scratchGone {
					if err := os.WriteFile(rec.Scratch, nil, 0o600); err != nil {
						t.Fatal(err)
					}
				}
			}
			if tc.cgroup {
				rec.Cgroup = "/kiwi/box"
			}
			if err := m.Store.Save(rec); err != nil {
				t.Fatal(err)
			}
			if tc.network {
				if err := vmnet.Save(dir, &vmnet.State{NetNS: "/run/netns/x"}); err != nil {
					t.Fatal(err)
				}
			}
			if err := m.Release(context.Background(), rec); err != nil {
				t.Fatalf("Release: %v", err)
			}
			calls := h.Calls()
			if want := fmt.Sprintf("stop box 99 %s", ReleaseTimeout); !slices.Equal(mon.Calls(), []string{want}) {
				t.Errorf("monitor calls %q, want %q", mon.Calls(), want)
			}
			// Helpers found by command line are killed, but never the
			// process releasing (a monitor removing its own box).
			if !slices.Contains(calls, "kill 4001") || slices.Contains(calls, "kill "+strconv.Itoa(self)) {
				t.Errorf("host calls %q: want kill 4001 and not %d", calls, self)
			}
			if got := has(calls, "net teardown /run/netns/x"); got != tc.wantTeardown {
				t.Errorf("teardown %v, want %v", got, tc.wantTeardown)
			}
			if _, err := os.Stat(filepath.Join(dir, vmnet.StateFile)); (err == nil) != tc.wantNetFile {
				t.Errorf("network state file kept: %v, want %v", err == nil, tc.wantNetFile)
			}
			if tc.scratch {
				if _, err := os.Stat(rec.Scratch); err == nil {
					t.Error("scratch disk still there")
				}
			}
			if tc.cgroup && !slices.Contains(calls, fmt.Sprintf("cgroup remove /kiwi/box %s", ReleaseTimeout)) {
				t.Errorf("host calls %q: cgroup not removed", calls)
			}
			saved, err := m.Store.Load("box")
			if err != nil {
				t.Fatal(err)
			}
			if (saved.Scratch != "") != tc.wantScratch || (saved.Cgroup != "") != tc.wantCgroup {
				t.Errorf("saved record scratch %q cgroup %q, want kept %v %v", saved.Scratch, saved.Cgroup, tc.wantScratch, tc.wantCgroup)
			}

			// Again: nothing left to tear down or remove.
			h2 := &fakeHost{cgroupRemoveErr: tc.cgroupRemoveErr}
			m.Host = h2
			if err := m.Release(context.Background(), saved); err != nil {
				t.Fatalf("second Release: %v", err)
			}
			if c := h2.Calls(); has(c, "net teardown") != tc.wantNetFile || has(c, "cgroup remove") != tc.wantCgroup {
				t.Errorf("second release did %q", c)
			}
		})
	}
}

// TestReleaseScratchError: a scratch disk that cannot be removed is the
// error, stays in the record, and does not keep the cgroup.
func TestReleaseScratchError(t *testing.T) {
	h := &fakeHost{}
	m := newManager(t, h, &fakeMonitor{})
	rec := newRecord(t, m, "box")
	// A non-empty directory: os.Remove fails with something other than
	// "does not exist".
	rec.Scratch = t.TempDir()
	if err := os.WriteFile(filepath.Join(rec.Scratch, "f"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	rec.Cgroup = "/kiwi/box"
	err := m.Release(context.Background(), rec)
	if err == nil || !strings.Contains(err.Error(), "remove scratch disk") {
		t.Fatalf("Release = %v", err)
	}
	saved, lerr := m.Store.Load("box")
	if lerr != nil {
		t.Fatal(lerr)
	}
	if saved.Scratch == "" || saved.Cgroup != "" || !has(h.Calls(), "cgroup remove") {
		t.Errorf("record scratch %q cgroup %q, host calls %q", saved.Scratch, saved.Cgroup, h.Calls())
	}
}

func TestRemoveAbandoned(t *testing.T) {
	h := &fakeHost{}
	mon := &fakeMonitor{}
	m := newManager(t, h, mon)
	rec := newRecord(t, m, "box")
	rec.Cgroup = "/kiwi/box"
	if err := m.Store.Save(rec); err != nil {
		t.Fatal(err)
	}
	m.RemoveAbandoned(context.Background(), m.Store.Dir("box"))
	if _, err := m.Store.Load("box"); !errors.Is(err, state.ErrNotExist) {
		t.Errorf("record after RemoveAbandoned: %v", err)
	}
	if !has(mon.Calls(), "stop box") || !has(h.Calls(), "cgroup remove /kiwi/box") {
		t.Errorf("not released: monitor %q host %q", mon.Calls(), h.Calls())
	}
	// The monitor is in the cgroup it removes: it leaves it first.
	calls := h.Calls()
	leave, remove := slices.Index(calls, "cgroup leave"), slices.IndexFunc(calls, func(c string) bool { return strings.HasPrefix(c, "cgroup remove") })
	if leave < 0 || leave > remove {
		t.Errorf("the monitor did not leave the cgroup before removing it: %q", calls)
	}
	// A directory that is not the record's is left alone.
	other := newRecord(t, m, "other")
	m.RemoveAbandoned(context.Background(), filepath.Join(t.TempDir(), other.ID))
	if _, err := m.Store.Load("other"); err != nil {
		t.Errorf("unrelated record removed: %v", err)
	}
}

func TestRemoveUnrecorded(t *testing.T) {
	h := &fakeHost{helpers: []gc.Proc{{Pid: 4002, Argv: []string{"/usr/bin/kiwi-sharefs"}}}}
	m := newManager(t, h, &fakeMonitor{})
	dir := m.Store.Dir("half")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	m.RemoveUnrecorded("half")
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state directory kept: %v", err)
	}
	if !slices.Contains(h.Calls(), "kill 4002") {
		t.Errorf("host calls %q", h.Calls())
	}
}

func TestPids(t *testing.T) {
	m := newManager(t, &fakeHost{}, &fakeMonitor{})
	rec := newRecord(t, m, "box")
	if got := m.Pids(rec); len(got) != 0 {
		t.Errorf("no processes: %v", got)
	}
	rec.Pid = 10
	if err := os.WriteFile(filepath.Join(m.Store.Dir("box"), "qemu.pid"), []byte("11\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := m.Pids(rec); !slices.Equal(got, []int{10, 11}) {
		t.Errorf("Pids = %v", got)
	}
}

func TestCheckHooks(t *testing.T) {
	for _, tc := range []struct {
		name  string
		hooks *specs.Hooks
		ok    bool
	}{
		{"none", nil, true},
		{"host stages", &specs.Hooks{Prestart: []specs.Hook{{Path: "/a"}}, CreateRuntime: []specs.Hook{{Path: "/b"}}, Poststart: []specs.Hook{{Path: "/c"}}, Poststop: []specs.Hook{{Path: "/d"}}}, true},
		{"createContainer", &specs.Hooks{CreateContainer: []specs.Hook{{Path: "/a"}}}, false},
		{"startContainer", &specs.Hooks{StartContainer: []specs.Hook{{Path: "/a"}}}, false},
	} {
		if err := CheckHooks(tc.hooks); (err == nil) != tc.ok {
			t.Errorf("%s: CheckHooks = %v", tc.name, err)
		}
	}
}

func TestCheckPreserveFds(t *testing.T) {
	for n, ok := range map[int]bool{0: true, 1: false, 3: false} {
		if err := CheckPreserveFds(n); (err == nil) != ok {
			t.Errorf("CheckPreserveFds(%d) = %v", n, err)
		}
	}
}
