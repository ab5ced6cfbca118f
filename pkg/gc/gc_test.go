package gc

import (
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/kiwi-shim/kiwi-shim/pkg/state"
)

// fixture lays out a state root, a scratch dir and a work dir with one
// thing of each kind, all older than the grace period unless named
// "fresh".
type fixture struct {
	root, scratch, work string
	store               state.Store
	old                 time.Time
}

func newFixture(t *testing.T) *fixture {
	dir := t.TempDir()
	f := &fixture{root: filepath.Join(dir, "root"), scratch: filepath.Join(dir, "scratch"), work: filepath.Join(dir, "work"), old: time.Now().Add(-time.Hour)}
	f.store = state.NewStore(f.root)
	os.MkdirAll(f.scratch, 0o755)
	os.MkdirAll(f.work, 0o755)
	return f
}

func (f *fixture) record(t *testing.T, c *state.Container, files ...string) string {
	t.Helper()
	if c.Created.IsZero() {
		c.Created = f.old
	}
	if err := f.store.Create(c); err != nil {
		t.Fatal(err)
	}
	for _, n := range files {
		os.WriteFile(filepath.Join(f.store.Dir(c.ID), n), []byte("1\n"), 0o600)
	}
	return f.store.Dir(c.ID)
}

func (f *fixture) file(t *testing.T, p string, age time.Time, dir bool) {
	t.Helper()
	if dir {
		os.MkdirAll(p, 0o755)
	} else {
		os.WriteFile(p, nil, 0o600)
	}
	os.Chtimes(p, age, age)
}

func kinds(ls []Leftover) []string {
	var out []string
	for _, l := range ls {
		what := l.What
		if l.Container != nil {
			what = l.Container.ID
		} else if l.Pid != 0 {
			what = filepath.Base(l.Dir)
		} else {
			what = filepath.Base(what)
		}
		out = append(out, l.Kind+" "+what)
	}
	sort.Strings(out)
	return out
}

func TestScan(t *testing.T) {
	f := newFixture(t)
	now := time.Now()
	// A running VM: its monitor is alive.
	runDir := f.record(t, &state.Container{ID: "vm-running", Mode: "vm", Pid: 100, Scratch: filepath.Join(f.scratch, "vm-running-1.img")}, "qemu.pid")
	f.file(t, filepath.Join(f.scratch, "vm-running-1.img"), f.old, false)
	// A VM whose monitor died (pid 101 is now something else): its
	// scratch disk, cgroup and network redirects are to release.
	f.record(t, &state.Container{ID: "vm-crashed", Mode: "vm", Pid: 101, Scratch: filepath.Join(f.scratch, "vm-crashed-1.img"), Cgroup: "/k8s.io/vm-crashed"}, "net.json")
	// A VM whose monitor died but whose QEMU lives on (no PDEATHSIG yet).
	qemuDir := f.record(t, &state.Container{ID: "vm-qemu-left", Mode: "vm", Pid: 105})
	f.file(t, filepath.Join(f.scratch, "vm-crashed-1.img"), f.old, false)
	// A VM that stopped cleanly and whose engine has not deleted it yet:
	// nothing to release.
	f.record(t, &state.Container{ID: "vm-stopped", Mode: "vm", Pid: 102})
	// Container mode, stopped, its keeper still holding the lease.
	f.record(t, &state.Container{ID: "ct-stopped", Mode: "container", Pid: 103, KeeperPID: 104})
	// A create in progress (no pid yet, recent) and one that died long ago.
	f.record(t, &state.Container{ID: "vm-creating", Mode: "vm", Created: now.Add(-time.Second)})
	// A state directory without a record: fresh (create in progress) and old.
	f.file(t, filepath.Join(f.root, "containers", "half-fresh"), now, true)
	f.file(t, filepath.Join(f.root, "containers", "half-old"), f.old, true)
	// Scratch images: one nobody names (old), one open, one fresh.
	f.file(t, filepath.Join(f.scratch, "gone-1.img"), f.old, false)
	f.file(t, filepath.Join(f.scratch, "open-1.img"), f.old, false)
	f.file(t, filepath.Join(f.scratch, "fresh-1.img"), now, false)
	// Work dirs: one a boxbuild still uses, one orphan.
	f.file(t, filepath.Join(f.work, "boxbuild-aa-1"), f.old, true)
	f.file(t, filepath.Join(f.work, "boxbuild-bb-2"), f.old, true)
	goneDir := filepath.Join(f.root, "containers", "vm-gone")

	env := Env{
		Now:  now,
		Open: map[string]bool{filepath.Join(f.scratch, "open-1.img"): true},
		Procs: []Proc{
			{Pid: 100, Argv: []string{"/usr/bin/kiwi-shim", "--root", f.root, "vm-monitor", "--state-dir", runDir}},
			{Pid: 101, Argv: []string{"bash"}},
			{Pid: 104, Argv: []string{"/usr/bin/kiwi-shim", "loop-keeper", "--owner", "ct-stopped"}},
			{Pid: 200, Argv: []string{"/usr/bin/qemu-system-x86_64", "-serial", "file:" + runDir + "/console.log", "-device", "virtserialport,name=org.kiwi-shim.ctl"}},
			{Pid: 201, Argv: []string{"/usr/bin/qemu-system-x86_64", "-serial", "file:" + goneDir + "/console.log", "-device", "virtserialport,name=org.kiwi-shim.ctl"}},
			{Pid: 202, Argv: []string{"/usr/bin/kiwi-sharefs", "serve", "--exports", goneDir + "/sharefs.json"}},
			{Pid: 203, Argv: []string{"/usr/bin/qemu-system-x86_64", "-serial", "file:/elsewhere/console.log"}},
			{Pid: 205, Argv: []string{"/usr/bin/qemu-system-x86_64", "-serial", "file:" + qemuDir + "/console.log", "-device", "virtserialport,name=org.kiwi-shim.ctl"}},
			{Pid: 204, Argv: []string{"/usr/bin/kiwi-shim", "run", "--bundle", filepath.Join(f.work, "boxbuild-aa-1"), "boxbuild-aa"}},
		},
	}
	got, err := Scan(Options{Roots: []string{f.root}, ScratchDir: f.scratch, WorkDir: f.work}, env)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		KindHalfMade + " half-old",
		KindProcess + " vm-gone",
		KindProcess + " vm-gone",
		KindScratch + " gone-1.img",
		KindStopped + " ct-stopped",
		KindStopped + " vm-crashed",
		KindStopped + " vm-qemu-left",
		KindWorkDir + " boxbuild-bb-2",
	}
	sort.Strings(want)
	if g := kinds(got); !slices.Equal(g, want) {
		t.Fatalf("leftovers:\n  %s\nwant:\n  %s", strings.Join(g, "\n  "), strings.Join(want, "\n  "))
	}
	for _, l := range got {
		if l.Kind == KindProcess && l.Pid != 201 && l.Pid != 202 {
			t.Errorf("would kill pid %d", l.Pid)
		}
	}

	// With Records, the stopped containers' records go too, never a
	// running one's or one being created.
	got, _ = Scan(Options{Roots: []string{f.root}, Records: true}, env)
	var recs []string
	for _, l := range got {
		if l.Kind == KindRecord {
			recs = append(recs, l.Container.ID)
		}
	}
	sort.Strings(recs)
	if want := []string{"ct-stopped", "vm-crashed", "vm-qemu-left", "vm-stopped"}; !slices.Equal(recs, want) {
		t.Fatalf("records %v, want %v", recs, want)
	}
}

func TestHelperStateDir(t *testing.T) {
	for _, tc := range []struct {
		argv []string
		dir  string
		ok   bool
	}{
		{[]string{"/usr/bin/qemu-system-aarch64", "-chardev", "socket,id=ctl", "-device", "virtserialport,name=org.kiwi-shim.ctl", "-serial", "file:/run/k/containers/a/console.log"}, "/run/k/containers/a", true},
		{[]string{"qemu-system-x86_64", "-serial", "file:/run/k/containers/a/console.log"}, "", false}, // not ours
		{[]string{"/bin/kiwi-sharefs", "serve", "--exports", "/run/k/containers/b/sharefs.json"}, "/run/k/containers/b", true},
		{[]string{"/bin/kiwi-sharefs", "mount", "--source", "/x"}, "", false},
		{[]string{"/bin/kiwi-shim", "--debug", "vm-monitor", "--state-dir", "/run/k/containers/c"}, "/run/k/containers/c", true},
		{[]string{"/bin/kiwi-shim", "vm-monitor"}, "", false},
		{nil, "", false},
	} {
		dir, ok := HelperStateDir(tc.argv)
		if dir != tc.dir || ok != tc.ok {
			t.Errorf("HelperStateDir(%q) = %q, %v; want %q, %v", tc.argv, dir, ok, tc.dir, tc.ok)
		}
	}
}

func TestHost(t *testing.T) {
	env := Host()
	self := os.Getpid()
	if !slices.ContainsFunc(env.Procs, func(p Proc) bool { return p.Pid == self && len(p.Argv) > 0 }) {
		t.Fatal("own process not in the table")
	}
	exe, _ := os.Executable()
	if !env.Open[exe] && len(env.Open) == 0 {
		t.Fatal("no open files seen")
	}
}

func TestScanUnusedCache(t *testing.T) {
	now := time.Now()
	tests := []struct {
		name string
		age  time.Duration // Options.CacheAge
		open bool          // the old file is open in some process
		want []string      // base names found
	}{
		{name: "old files go", age: 7 * 24 * time.Hour, want: []string{"old.cpio", "old.elf"}},
		{name: "open files stay", age: 7 * 24 * time.Hour, open: true, want: []string{"old.elf"}},
		{name: "zero age keeps all", age: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			initrds, kernels := filepath.Join(f.work, "initramfs"), filepath.Join(f.work, "kernels-pvh")
			os.MkdirAll(initrds, 0o755)
			os.MkdirAll(kernels, 0o755)
			month := now.Add(-30 * 24 * time.Hour)
			f.file(t, filepath.Join(initrds, "old.cpio"), month, false)
			f.file(t, filepath.Join(initrds, "used.cpio"), now.Add(-time.Hour), false)
			f.file(t, filepath.Join(kernels, "old.elf"), month, false)
			env := Env{Now: now, Open: map[string]bool{}}
			if tt.open {
				env.Open[filepath.Join(initrds, "old.cpio")] = true
			}
			found, err := Scan(Options{Roots: []string{f.root}, CacheDirs: []string{initrds, kernels, filepath.Join(f.work, "missing")}, CacheAge: tt.age}, env)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, l := range found {
				if l.Kind != KindCache {
					t.Errorf("unexpected %s", l)
					continue
				}
				got = append(got, filepath.Base(l.Dir))
			}
			sort.Strings(got)
			if !slices.Equal(got, tt.want) {
				t.Errorf("found %v, want %v", got, tt.want)
			}
		})
	}
}
