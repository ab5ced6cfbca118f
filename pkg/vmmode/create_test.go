//lint:file-ignore SA1019 prestart hooks are deprecated, but engines still use them

package vmmode

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/settings"
	"github.com/kiwi-shim/kiwi-shim/pkg/sharefs"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
)

// TestLaunch drives create after resolution with a fake monitor process
// (a shell script speaking the monitor's pipe protocol) and checks the
// order of create (monitor, hooks, configuration, go-ahead) and what a
// failure at each step leaves: nothing, released through Release.
func TestLaunch(t *testing.T) {
	// The ready script checks that the configuration exists when the
	// go-ahead comes, as the monitor reads it then.
	const ready = `read x <&4 && test "$x" = go && test -f "$CFG" || exit 1; echo ok >&3; exec sleep 60 3>&- 4<&-`
	u64 := func(n uint64) *uint64 { return &n }
	for _, tc := range []struct {
		name string
		host *fakeHost
		// newNS and joinNS are the machine's namespaces; virtiofs
		// shares over kiwi-sharefs instead of 9p; cpu gives the spec
		// CPU controls.
		newNS    uintptr
		joinNS   map[int]string
		virtiofs bool
		cpu      bool
		hook     string // prestart or createRuntime hook that fails
		errHas   string
		// wantPoststop: hooks ran, so a failure runs poststop.
		wantPoststop bool
	}{
		{name: "created", host: &fakeHost{monitorScript: ready}},
		{name: "created in new namespaces", host: &fakeHost{monitorScript: ready}, newNS: unix.CLONE_NEWNET | unix.CLONE_NEWUTS},
		{name: "created in joined namespaces", host: &fakeHost{monitorScript: ready}, joinNS: map[int]string{unix.CLONE_NEWNET: "/run/netns/box"}},
		{name: "created with virtiofs", host: &fakeHost{monitorScript: ready}, virtiofs: true},
		{name: "created with CPU controls", host: &fakeHost{monitorScript: ready}, cpu: true},
		{name: "cgroup not created: no cgroup, still created", host: &fakeHost{monitorScript: ready, cgroupCreateErr: errors.New("read-only")}, cpu: true},
		{name: "CPU controls refused", host: &fakeHost{monitorScript: ready, cpuErr: errors.New("invalid argument")}, cpu: true, errHas: "invalid argument"},
		{name: "scratch fails", host: &fakeHost{monitorScript: ready, scratchErr: errors.New("no mkfs")}, errHas: "no mkfs"},
		{name: "monitor does not start", host: &fakeHost{startErr: errors.New("ENOEXEC")}, errHas: "start VM monitor: ENOEXEC"},
		{name: "prestart fails", host: &fakeHost{monitorScript: ready}, hook: "prestart", errHas: "prestart hook", wantPoststop: true},
		{name: "createRuntime fails", host: &fakeHost{monitorScript: ready}, newNS: unix.CLONE_NEWNET, hook: "createRuntime", errHas: "createRuntime hook", wantPoststop: true},
		{name: "boot error", host: &fakeHost{monitorScript: `read x <&4; echo "error no kernel" >&3`}, errHas: "no kernel", wantPoststop: true},
		{name: "monitor dies", host: &fakeHost{monitorScript: `read x <&4; exit 1`}, errHas: "VM monitor died during boot", wantPoststop: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := tc.host
			h.scratchDir = t.TempDir()
			mon := &fakeMonitor{}
			m := newManager(t, h, mon)
			dir := m.Store.Dir("box")
			t.Setenv("CFG", filepath.Join(dir, vm.MonitorConfigFile))
			tmp := t.TempDir()
			hooksOut := filepath.Join(tmp, "hooks")
			spec := &specs.Spec{
				Root:    &specs.Root{Path: "rootfs"},
				Process: &specs.Process{Args: []string{"/bin/true"}, Cwd: "/"},
				Linux:   &specs.Linux{CgroupsPath: "/kiwi-test/box"},
				Hooks: &specs.Hooks{
					Prestart:      []specs.Hook{hookTo(hooksOut, "prestart", tc.hook == "prestart")},
					CreateRuntime: []specs.Hook{hookTo(hooksOut, "createRuntime", tc.hook == "createRuntime")},
					Poststop:      []specs.Hook{hookTo(hooksOut, "poststop", false)},
				},
			}
			if tc.cpu {
				spec.Linux.Resources = &specs.LinuxResources{CPU: &specs.LinuxCPU{Shares: u64(512)}}
			}
			pidFile := filepath.Join(tmp, "pid")
			share := config.Share9P
			if tc.virtiofs {
				share = config.ShareVirtioFS
			}
			o := CreateOptions{ID: "box", Bundle: "/bundle", Spec: spec, PidFile: pidFile, ConsoleSocket: "/console.sock",
				Settings: settings.Container{
					Mode: config.ModeVM, Scratch: settings.Scratch{Size: 1 << 20, Path: "/scratch"},
					VM: settings.VM{Arch: "x86_64", Share: share, ShareCache: sharefs.CacheMetadata, ShareMapped: true, MemoryMiB: 64, CPUs: 1},
				}}
			mc := &machine{qemu: "/qemu", accel: "tcg", shareFSBin: "/kiwi-sharefs", kernel: "/vmlinuz", initrd: "/initrd",
				net: vm.NetworkPlan{Mode: vm.NetNone}, newNS: tc.newNS, joinNS: tc.joinNS, scratchPath: "/scratch"}
			err := m.launch(context.Background(), o, mc)
			calls := h.Calls()
			hooks := hookLog(t, hooksOut)
			for _, pid := range h.pids {
				// A monitor released to the caller is reaped here.
				t.Cleanup(func() {
					unix.Kill(pid, unix.SIGKILL)
					var ws unix.WaitStatus
					unix.Wait4(pid, &ws, 0, nil)
				})
			}
			if h.startErr == nil && (h.cloneflags != tc.newNS || len(h.joined) != len(tc.joinNS) || (len(tc.joinNS) > 0 && h.joined[unix.CLONE_NEWNET] != tc.joinNS[unix.CLONE_NEWNET])) {
				t.Errorf("monitor started with clone flags %#x joining %v, want %#x joining %v", h.cloneflags, h.joined, tc.newNS, tc.joinNS)
			}
			if tc.errHas != "" {
				checkRolledBack(t, m, h, mon, err, tc.errHas, hooks, tc.wantPoststop)
				return
			}
			if err != nil {
				t.Fatalf("launch: %v", err)
			}
			rec, err := m.Store.Load("box")
			if err != nil {
				t.Fatal(err)
			}
			if len(h.pids) != 1 || rec.Pid != h.pids[0] {
				t.Fatalf("record pid %d, started %d monitors", rec.Pid, len(h.started))
			}
			if b, _ := os.ReadFile(pidFile); strings.TrimSpace(string(b)) != strconv.Itoa(rec.Pid) {
				t.Errorf("pid file %q, want %d", b, rec.Pid)
			}
			wantCgroup := "/kiwi-test/box"
			if h.cgroupCreateErr != nil {
				wantCgroup = ""
			}
			if rec.Cgroup != wantCgroup || rec.Scratch != filepath.Join(h.scratchDir, "box.img") || rec.Mode != config.ModeVM {
				t.Errorf("record %+v", rec)
			}
			if got, want := has(calls, "cgroup cpu /kiwi-test/box 512"), tc.cpu && wantCgroup != ""; got != want {
				t.Errorf("CPU controls written %v, want %v (host calls %q)", got, want, calls)
			}
			if want := "start " + MonitorCommand + " --state-dir " + dir; !has(calls, want) {
				t.Errorf("host calls %q, want %q", calls, want)
			}
			// The hooks see the monitor as the container's process,
			// still being created.
			for _, stage := range []string{"prestart", "createRuntime"} {
				if st, ok := hooks[stage]; !ok || st.Status != specs.StateCreating || st.Pid != rec.Pid || st.Bundle != "/bundle" {
					t.Errorf("%s hook: ran %v with %+v", stage, ok, st)
				}
			}
			if _, ok := hooks["poststop"]; ok {
				t.Error("poststop ran for a created box")
			}
			var cfg vm.MonitorConfig
			b, err := os.ReadFile(filepath.Join(dir, vm.MonitorConfigFile))
			if err == nil {
				err = json.Unmarshal(b, &cfg)
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg.ID != "box" || cfg.Machine.MemoryMiB != 64 || cfg.Machine.CPUs != 1 || cfg.Machine.Kernel != "/vmlinuz" || len(cfg.Machine.Disks) != 1 || cfg.Cgroup != wantCgroup || cfg.ConsoleSocket != "/console.sock" {
				t.Errorf("monitor config %+v", cfg)
			}
			// A monitor in a network namespace of its own takes the
			// network plan from there, after the hooks.
			ownNet := tc.newNS&unix.CLONE_NEWNET != 0
			planFrom := fmt.Sprintf("/proc/%d/ns/net", rec.Pid)
			if has(calls, "net plan "+planFrom) != ownNet || cfg.NetNSOwned != ownNet || (ownNet && (cfg.NetNS != planFrom || cfg.Machine.Network != vm.NetTap)) {
				t.Errorf("own netns %v: host calls %q, monitor config netns %q owned %v network %q", ownNet, calls, cfg.NetNS, cfg.NetNSOwned, cfg.Machine.Network)
			}
			if !ownNet && cfg.Machine.Network != vm.NetNone {
				t.Errorf("network %q, want the spec's plan", cfg.Machine.Network)
			}
			if tc.virtiofs {
				// The root is cached entirely and never mapped; the
				// shares go over kiwi-sharefs, not 9p.
				if cfg.ShareFS == nil || len(cfg.ShareFS.Exports) != 1 || cfg.ShareFS.Binary != "/kiwi-sharefs" || len(cfg.Machine.Shares) != 0 || len(cfg.Machine.VirtioFS) != 1 {
					t.Fatalf("virtiofs monitor config %+v", cfg)
				}
				if ex := cfg.ShareFS.Exports[0]; ex.Tag != vm.RootTag || ex.Options.Cache != sharefs.CacheAlways || ex.Options.Mapped {
					t.Errorf("root export %+v", ex)
				}
			} else if cfg.ShareFS != nil || len(cfg.Machine.Shares) != 1 || cfg.Guest.RootShare != string(config.Share9P) {
				t.Errorf("9p monitor config %+v", cfg)
			}
		})
	}
}

// checkRolledBack checks what a failed launch left: its error, and
// nothing else (record, state directory, scratch disk, cgroup, monitor),
// with poststop run when the hooks had run.
func checkRolledBack(t *testing.T, m *Manager, h *fakeHost, mon *fakeMonitor, err error, errHas string, hooks map[string]specs.State, wantPoststop bool) {
	t.Helper()
	if err == nil || !strings.Contains(err.Error(), errHas) {
		t.Fatalf("launch = %v, want %q", err, errHas)
	}
	if _, lerr := m.Store.Load("box"); !errors.Is(lerr, state.ErrNotExist) {
		t.Errorf("record after failed create: %v", lerr)
	}
	if _, serr := os.Stat(m.Store.Dir("box")); !errors.Is(serr, os.ErrNotExist) {
		t.Errorf("state directory after failed create: %v", serr)
	}
	if ents, _ := os.ReadDir(h.scratchDir); len(ents) != 0 {
		t.Errorf("scratch left: %v", ents)
	}
	if !has(mon.Calls(), "stop box") {
		t.Errorf("not released: monitor calls %q", mon.Calls())
	}
	if h.cgroupCreateErr == nil && !has(h.Calls(), "cgroup remove /kiwi-test/box "+ReleaseTimeout.String()) {
		t.Errorf("cgroup not removed: %q", h.Calls())
	}
	for _, c := range h.started {
		if c.ProcessState == nil {
			t.Errorf("monitor %d not reaped", c.Process.Pid)
		}
	}
	st, ran := hooks["poststop"]
	if ran != wantPoststop || (ran && (st.Status != specs.StateStopped || st.Pid != 0)) {
		t.Errorf("poststop ran %v (%+v), want %v", ran, st, wantPoststop)
	}
}
