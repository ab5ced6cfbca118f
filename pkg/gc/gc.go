// Package gc finds and removes what crashed kiwi-shim stacks left behind:
// the resources of containers whose host-side processes are gone (guest
// processes' QEMU and kiwi-sharefs, network redirects, scratch images,
// cgroups), helper processes whose state directory is gone, scratch images
// and boxbuild work directories that no record or process uses, and half
// made state directories. It never touches a container that still runs,
// and it is idempotent: a second run finds nothing.
//
// Derived cache files (initramfs images, unpacked kernels) that no
// container used for Options.CacheAge are removed too (package cacheuse).
//
// Records of stopped containers are kept (an engine still alive will
// delete them and reads their state until then) unless Options.Records is
// set, for after a crash of the whole stack including the engine.
package gc

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/kiwi-shim/kiwi-shim/pkg/cacheuse"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
)

// Proc is a process on the host.
type Proc struct {
	Pid  int
	Argv []string
}

// Env is what a scan looks at; Host fills it from /proc.
type Env struct {
	// Procs are the running processes.
	Procs []Proc
	// Open holds every path some process has open (its fds).
	Open map[string]bool
	// Now is the time of the scan.
	Now time.Time
}

// Options say where kiwi-shim keeps things.
type Options struct {
	// Roots are state roots (their containers/ directories are scanned).
	Roots []string
	// ScratchDir and WorkDir are vm.scratch_dir and work_dir.
	ScratchDir, WorkDir string
	// Grace protects things younger than it: a create or boxbuild in
	// progress may not have written its record or started its process.
	Grace time.Duration
	// Records also removes the records of stopped containers.
	Records bool
	// CacheDirs hold derived cache files; CacheAge is how long one may go
	// unused (package cacheuse) before it is a leftover. 0 keeps them all.
	CacheDirs []string
	CacheAge  time.Duration
}

// Kinds of leftovers.
const (
	KindStopped  = "stopped container"   // resources of a stopped container
	KindRecord   = "stopped record"      // its record (Options.Records)
	KindHalfMade = "half-made state"     // a state dir without a record
	KindProcess  = "orphan process"      // a helper whose state dir is gone
	KindScratch  = "orphan scratch disk" // no record names it, nobody has it open
	KindWorkDir  = "orphan work dir"     // no boxbuild or run uses it
	KindCache    = "unused cache file"   // derived, unused for CacheAge
	DefaultGrace = 10 * time.Minute
	// DefaultCacheAge is how long a derived cache file may go unused.
	DefaultCacheAge = 7 * 24 * time.Hour
	recordFile      = "container.json"
	monitorMarker   = "vm-monitor"
)

// Leftover is one thing a scan found.
type Leftover struct {
	Kind string
	// What names it: a path, or a pid and command.
	What string
	// Container is the container it belongs to, if any.
	Container *state.Container
	// Dir is the state directory of Container, or the path to remove.
	Dir string
	// Pid is the process to kill (KindProcess).
	Pid int
}

func (l Leftover) String() string { return l.Kind + ": " + l.What }

// Scan finds leftovers. It changes nothing.
func Scan(o Options, env Env) ([]Leftover, error) {
	if o.Grace == 0 {
		o.Grace = DefaultGrace
	}
	var out []Leftover
	liveDirs := map[string]bool{} // state dirs of existing records
	scratchUsed := map[string]bool{}
	for _, root := range o.Roots {
		store := state.NewStore(root)
		ids, err := store.List()
		if err != nil {
			return nil, err
		}
		for _, id := range ids {
			dir := store.Dir(id)
			liveDirs[dir] = true
			rec, err := store.Load(id)
			if err != nil {
				if errors.Is(err, state.ErrNotExist) && older(dir, o.Grace, env.Now) {
					out = append(out, Leftover{Kind: KindHalfMade, What: dir, Dir: dir})
				}
				continue
			}
			if rec.Scratch != "" {
				scratchUsed[rec.Scratch] = true
			}
			if running(rec, dir, env, o.Grace) {
				continue
			}
			if holdsResources(rec, dir, env.Procs) {
				out = append(out, Leftover{Kind: KindStopped, What: fmt.Sprintf("%s (%s mode) in %s", id, rec.Mode, root), Container: rec, Dir: dir})
			}
			if o.Records {
				out = append(out, Leftover{Kind: KindRecord, What: dir, Container: rec, Dir: dir})
			}
		}
	}
	out = append(out, orphanProcs(o, env.Procs, liveDirs)...)
	out = append(out, orphanFiles(o, env, scratchUsed)...)
	cache, err := unusedCache(o, env)
	if err != nil {
		return nil, err
	}
	return append(out, cache...), nil
}

// unusedCache finds derived cache files unused for o.CacheAge that no
// process has open.
func unusedCache(o Options, env Env) ([]Leftover, error) {
	if o.CacheAge <= 0 {
		return nil, nil
	}
	var out []Leftover
	for _, dir := range o.CacheDirs {
		files, err := cacheuse.Unused(dir, o.CacheAge, env.Now)
		if err != nil {
			return nil, err
		}
		for _, p := range files {
			if !env.Open[p] {
				out = append(out, Leftover{Kind: KindCache, What: p, Dir: p})
			}
		}
	}
	return out, nil
}

// running reports whether a container's host side still runs: a VM's
// monitor, a container-mode container's init process. A record without a
// pid younger than grace is a create in progress.
func running(rec *state.Container, dir string, env Env, grace time.Duration) bool {
	if rec.Pid <= 0 {
		return env.Now.Sub(rec.Created) < grace
	}
	for _, p := range env.Procs {
		if p.Pid != rec.Pid {
			continue
		}
		if rec.Mode == "vm" {
			return slices.Contains(p.Argv, monitorMarker) && argvMentions(p.Argv, dir)
		}
		return true
	}
	return false
}

// holdsResources reports whether a stopped container still has anything
// that gc releases.
func holdsResources(rec *state.Container, dir string, procs []Proc) bool {
	if rec.Scratch != "" || rec.Cgroup != "" {
		return true
	}
	if rec.KeeperPID > 0 && slices.ContainsFunc(procs, func(p Proc) bool { return p.Pid == rec.KeeperPID && slices.Contains(p.Argv, rec.ID) }) {
		return true
	}
	if _, err := os.Stat(filepath.Join(dir, "net.json")); err == nil {
		return true // network redirects and moved addresses
	}
	return len(Helpers(procs, dir)) > 0 // QEMU or kiwi-sharefs without their monitor
}

// HelperStateDir returns the state directory of a kiwi-shim host helper
// (VM monitor, QEMU, kiwi-sharefs) from its command line.
func HelperStateDir(argv []string) (string, bool) {
	if len(argv) == 0 {
		return "", false
	}
	base := filepath.Base(argv[0])
	switch {
	case strings.HasPrefix(base, "qemu-system-") && slices.ContainsFunc(argv, func(a string) bool { return strings.Contains(a, "org.kiwi-shim.ctl") }):
		for _, a := range argv {
			if f, ok := strings.CutPrefix(a, "file:"); ok && strings.HasSuffix(f, "/console.log") {
				return filepath.Dir(f), true
			}
		}
	case base == "kiwi-sharefs" && slices.Contains(argv, "serve"):
		for i, a := range argv {
			if a == "--exports" && i+1 < len(argv) {
				return filepath.Dir(argv[i+1]), true
			}
		}
	case slices.Contains(argv, monitorMarker):
		for i, a := range argv {
			if a == "--state-dir" && i+1 < len(argv) {
				return argv[i+1], true
			}
		}
	}
	return "", false
}

// orphanProcs finds helpers whose state directory no record owns.
func orphanProcs(o Options, procs []Proc, liveDirs map[string]bool) []Leftover {
	var out []Leftover
	for _, p := range procs {
		dir, ok := HelperStateDir(p.Argv)
		if !ok || liveDirs[dir] || !underAny(dir, o.Roots) {
			continue
		}
		if _, err := os.Stat(filepath.Join(dir, recordFile)); err == nil {
			continue // a root this scan was not told about
		}
		out = append(out, Leftover{Kind: KindProcess, What: fmt.Sprintf("pid %d %s (state %s)", p.Pid, filepath.Base(p.Argv[0]), dir), Pid: p.Pid, Dir: dir})
	}
	return out
}

// orphanFiles finds scratch images and boxbuild work directories nothing
// uses.
func orphanFiles(o Options, env Env, scratchUsed map[string]bool) []Leftover {
	var out []Leftover
	if o.ScratchDir != "" {
		ents, _ := os.ReadDir(o.ScratchDir)
		for _, e := range ents {
			p := filepath.Join(o.ScratchDir, e.Name())
			if e.Type().IsRegular() && strings.HasSuffix(e.Name(), ".img") && !scratchUsed[p] && !env.Open[p] && older(p, o.Grace, env.Now) {
				out = append(out, Leftover{Kind: KindScratch, What: p, Dir: p})
			}
		}
	}
	if o.WorkDir != "" {
		ents, _ := os.ReadDir(o.WorkDir)
		for _, e := range ents {
			p := filepath.Join(o.WorkDir, e.Name())
			if !e.IsDir() || !strings.HasPrefix(e.Name(), "boxbuild-") || !older(p, o.Grace, env.Now) {
				continue
			}
			used := false
			for _, pr := range env.Procs {
				if argvMentions(pr.Argv, p) {
					used = true
					break
				}
			}
			if !used {
				out = append(out, Leftover{Kind: KindWorkDir, What: p, Dir: p})
			}
		}
	}
	return out
}

func argvMentions(argv []string, path string) bool {
	return slices.ContainsFunc(argv, func(a string) bool { return a == path || strings.HasPrefix(a, path+"/") })
}

func underAny(dir string, roots []string) bool {
	for _, r := range roots {
		if strings.HasPrefix(dir, filepath.Join(r, "containers")+"/") {
			return true
		}
	}
	return false
}

func older(p string, grace time.Duration, now time.Time) bool {
	fi, err := os.Lstat(p)
	return err == nil && now.Sub(fi.ModTime()) >= grace
}

// Host reads the process table and open files from /proc.
func Host() Env {
	procs := Processes()
	env := Env{Procs: procs, Open: map[string]bool{}, Now: time.Now()}
	for _, p := range procs {
		fd := fmt.Sprintf("/proc/%d/fd", p.Pid)
		fds, _ := os.ReadDir(fd)
		for _, f := range fds {
			if t, err := os.Readlink(filepath.Join(fd, f.Name())); err == nil && strings.HasPrefix(t, "/") {
				env.Open[t] = true
			}
		}
	}
	return env
}

// Processes reads the process table from /proc (kernel threads, which
// have no command line, are left out).
func Processes() []Proc {
	var out []Proc
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range procs {
		pid, err := strconv.Atoi(filepath.Base(d))
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(d, "cmdline"))
		if err != nil || len(b) == 0 {
			continue
		}
		out = append(out, Proc{Pid: pid, Argv: strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")})
	}
	return out
}

// Helpers returns the kiwi-shim helper processes (monitor, QEMU,
// kiwi-sharefs) of the state directory dir.
func Helpers(procs []Proc, dir string) []Proc {
	var out []Proc
	for _, p := range procs {
		if d, ok := HelperStateDir(p.Argv); ok && d == dir {
			out = append(out, p)
		}
	}
	return out
}
