package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/urfave/cli"
	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/containermode"
	"github.com/kiwi-shim/kiwi-shim/pkg/gc"
	"github.com/kiwi-shim/kiwi-shim/pkg/initramfs"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
)

var gcCommand = cli.Command{
	Name:  "gc",
	Usage: "find and remove what crashed kiwi-shim stacks left behind",
	Description: `Looks at every container record under the state root (and, for root with
   the default root, under each containerd namespace's root) and at the
   host's processes, and removes what no running container uses:

   - the host side of stopped containers whose monitor died: leftover QEMU
     and kiwi-sharefs processes, network redirects and moved addresses,
     scratch disks, cgroups, loop keepers (and so their loop leases);
   - QEMU, kiwi-sharefs and monitor processes whose state directory is gone;
   - scratch images no record names and no process has open, boxbuild work
     directories no process uses, state directories without a record;
   - stale loop leases (dead owners), with their devices and partitions;
   - derived cache files (initramfs images, unpacked kernels, VM
     templates) that no container used for --cache-age (0 keeps them);
     kernels and boxes that setup fetched stay.

   Records of stopped containers stay (the engine deletes them) unless
   --records is given, for after the engine crashed too. Things younger
   than --grace are left alone: a create or boxbuild may be under way. Safe
   to run any time, and idempotent.`,
	Flags: []cli.Flag{
		cli.BoolFlag{Name: "dry-run, n", Usage: "only print what would be removed"},
		cli.BoolFlag{Name: "records", Usage: "also remove the records of stopped containers"},
		cli.DurationFlag{Name: "grace", Value: gc.DefaultGrace, Usage: "leave things younger than this alone"},
		cli.DurationFlag{Name: "cache-age", Value: gc.DefaultCacheAge, Usage: "remove derived cache files unused for this long (0: never)"},
	},
	Action: withEnv(func(ctx *cli.Context, e *env) error {
		found, err := gc.Scan(gc.Options{
			Roots: e.gcRoots(), ScratchDir: e.cfg.VM.ScratchDir, WorkDir: e.cfg.WorkDir,
			Grace: ctx.Duration("grace"), Records: ctx.Bool("records"),
			CacheDirs: []string{
				filepath.Join(e.cfg.CacheDir, initramfs.CacheSubdir),
				filepath.Join(e.cfg.CacheDir, vm.PVHCacheSubdir),
				e.cfg.TemplateDirPath(),
			},
			CacheAge: ctx.Duration("cache-age"),
		}, gc.Host())
		if err != nil {
			return err
		}
		failed := 0
		for _, l := range found {
			if ctx.Bool("dry-run") {
				fmt.Printf("would remove %s\n", l)
				continue
			}
			if err := e.collect(ctx, l); err != nil {
				fmt.Fprintf(os.Stderr, "kiwi-shim gc: %s: %v\n", l, err)
				failed++
				continue
			}
			fmt.Printf("removed %s\n", l)
		}
		if !ctx.Bool("dry-run") && !e.rootless {
			// Status drops leases whose owner died and cleans their devices.
			if a, err := e.allocator(); err == nil {
				if _, err := a.Status(); err != nil {
					fmt.Fprintf(os.Stderr, "kiwi-shim gc: loop leases: %v\n", err)
					failed++
				}
			}
		}
		if failed > 0 {
			return exitError{code: 1}
		}
		return nil
	}),
}

// gcRoots are the state roots gc looks at: this invocation's, and for root
// with the default root also the per-namespace roots of the containerd shim.
func (e *env) gcRoots() []string {
	roots := []string{e.root}
	if !e.rootless && e.root == defaultRoot {
		ns, _ := filepath.Glob(filepath.Join(defaultRoot, "containerd", "*"))
		roots = append(roots, ns...)
	}
	return roots
}

// collect removes one leftover.
func (e *env) collect(ctx *cli.Context, l gc.Leftover) error {
	switch l.Kind {
	case gc.KindStopped, gc.KindRecord:
		// The container's own root: Dir is ROOT/containers/ID.
		ce := *e
		ce.root = filepath.Dir(filepath.Dir(l.Dir))
		rec := l.Container
		if l.Kind == gc.KindRecord {
			c, err := ce.open(ctx, rec)
			if err != nil {
				return err
			}
			return c.Delete(true)
		}
		if rec.Mode == config.ModeVM {
			return ce.vmManager(ctx).Release(context.Background(), rec)
		}
		containermode.StopKeeper(rec.KeeperPID, rec.ID)
		rec.KeeperPID = 0
		return ce.store().Save(rec)
	case gc.KindProcess:
		// Still the same process, still without its state directory.
		for _, p := range gc.Helpers(gc.Processes(), l.Dir) {
			if p.Pid == l.Pid {
				return unix.Kill(p.Pid, unix.SIGKILL)
			}
		}
		return nil
	case gc.KindScratch, gc.KindCache:
		if err := os.Remove(l.Dir); err != nil && !os.IsNotExist(err) {
			return err
		}
		return nil
	case gc.KindWorkDir, gc.KindHalfMade:
		return os.RemoveAll(l.Dir)
	}
	return fmt.Errorf("unknown leftover kind %q", l.Kind)
}

// defaultRoot is the --root default of a rootful kiwi-shim.
const defaultRoot = "/run/kiwi-shim"
