package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/urfave/cli"
	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/containermode"
	"github.com/kiwi-shim/kiwi-shim/pkg/gc"
	"github.com/kiwi-shim/kiwi-shim/pkg/hooks"
	"github.com/kiwi-shim/kiwi-shim/pkg/hostcgroup"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmnet"
)

func (e *env) store() state.Store { return state.NewStore(e.root) }

// runtimeRoot is the --root container mode gives runc (or crun), apart
// from kiwi-shim's own records.
func (e *env) runtimeRoot() string { return filepath.Join(e.root, "runc") }

// manager builds the container-mode manager from the configuration and the
// global flags, which are passed on to the low-level runtime.
func (e *env) manager(ctx *cli.Context) (*containermode.Manager, error) {
	path, err := containermode.FindRuntime(e.cfg.Container.Runtime)
	if err != nil {
		return nil, err
	}
	alloc, err := e.allocator()
	if err != nil {
		return nil, err
	}
	return &containermode.Manager{
		Runtime: containermode.Runtime{
			Path:          path,
			Root:          e.runtimeRoot(),
			Log:           ctx.GlobalString("log"),
			LogFormat:     ctx.GlobalString("log-format"),
			SystemdCgroup: ctx.GlobalBool("systemd-cgroup") || ctx.GlobalString("cgroup-manager") == "systemd",
			Debug:         ctx.GlobalBool("debug"),
		},
		Store: e.store(),
		Alloc: alloc,
		Log:   e.log,
	}, nil
}

// load finds a container's record and, for container mode, the manager
// that runs it (nil in VM mode).
func (e *env) load(ctx *cli.Context, id string) (*state.Container, *containermode.Manager, error) {
	rec, err := e.store().Load(id)
	if err != nil {
		return nil, nil, err
	}
	if rec.Mode == config.ModeVM {
		return rec, nil, nil
	}
	m, err := e.manager(ctx)
	if err != nil {
		return nil, nil, err
	}
	return rec, m, nil
}

// containerAction adapts an action on one existing container, named by
// the command's first argument.
func containerAction(fn func(*cli.Context, *env, *state.Container, *containermode.Manager) error) func(*cli.Context) error {
	return withEnv(func(ctx *cli.Context, e *env) error {
		id, err := idArg(ctx)
		if err != nil {
			return err
		}
		rec, m, err := e.load(ctx, id)
		if err != nil {
			return err
		}
		return fn(ctx, e, rec, m)
	})
}

// ociState answers `state` for a container in either mode.
func (e *env) ociState(rec *state.Container, m *containermode.Manager) (*state.OCI, error) {
	if m == nil {
		return vmState(rec, e.store().Dir(rec.ID)), nil
	}
	return m.State(context.Background(), rec)
}

// startContainer starts a created container in either mode.
func (e *env) startContainer(rec *state.Container, m *containermode.Manager) error {
	if m == nil {
		if err := vm.Start(e.store().Dir(rec.ID)); err != nil {
			return err
		}
		// As the runtime spec says: a failing poststart hook is
		// logged, and the container goes on.
		if err := hooks.Run(context.Background(), hooks.Poststart, hooks.Of(rec.Hooks, hooks.Poststart), vmHookState(rec, specs.StateRunning)); err != nil {
			e.log.Warn("poststart hook failed", "id", rec.ID, "err", err)
		}
		return nil
	}
	return m.Runtime.Run(context.Background(), "start", rec.ID)
}

// signalContainer delivers sig to the container's process (or all).
func (e *env) signalContainer(rec *state.Container, m *containermode.Manager, sig unix.Signal, all bool) error {
	if m == nil {
		err := vm.Signal(e.store().Dir(rec.ID), int(sig), all)
		if errors.Is(err, vm.ErrMonitorGone) {
			// runc's words: containerd's shim takes them for "already
			// finished", which is what a VM that is gone is.
			return fmt.Errorf("container not running: %w", err)
		}
		return err
	}
	args := []string{"kill"}
	if all {
		args = append(args, "--all")
	}
	return m.Runtime.Run(context.Background(), append(args, rec.ID, strconv.Itoa(int(sig)))...)
}

// deleteContainer removes a container in either mode.
func (e *env) deleteContainer(rec *state.Container, m *containermode.Manager, force bool) error {
	if m != nil {
		return m.Delete(context.Background(), rec, force)
	}
	dir := e.store().Dir(rec.ID)
	if st := vmState(rec, dir); (st.Status == "running" || st.Status == "creating" || st.Status == "paused") && !force {
		return fmt.Errorf("cannot delete container %s that is %s: stop it first or use --force", rec.ID, st.Status)
	}
	if err := e.releaseVM(rec, dir); err != nil {
		return err
	}
	// The VM is gone: poststop, whose failures are logged, as runc's.
	if err := hooks.Run(context.Background(), hooks.Poststop, hooks.Of(rec.Hooks, hooks.Poststop), vmHookState(rec, specs.StateStopped)); err != nil {
		e.log.Warn("poststop hook failed", "id", rec.ID, "err", err)
	}
	return e.store().Remove(rec.ID)
}

// releaseVM stops what is left of a VM container's host side and gives
// back what it held: its processes (also ones without a pid file), the
// network redirects and addresses, the scratch disk and the cgroup. The
// record stays, updated; running it again finds nothing to do.
func (e *env) releaseVM(rec *state.Container, dir string) error {
	vm.Stop(dir, rec.Pid, 10*time.Second)
	// Helpers that lost their pid file or their monitor.
	e.killHelpers(rec.ID, dir)
	// QEMU is gone, and with it the taps; the redirects and the
	// interfaces' addresses are restored in the namespace, if it lives.
	if st, err := vmnet.Load(dir); err != nil {
		e.log.Warn("container network state", "id", rec.ID, "err", err)
	} else if st != nil {
		if err := vmnet.Teardown(st); err != nil {
			e.log.Warn("container network teardown", "id", rec.ID, "err", err)
		} else {
			os.Remove(filepath.Join(dir, vmnet.StateFile))
		}
	}
	changed := false
	if rec.Scratch != "" {
		if err := os.Remove(rec.Scratch); err != nil && !os.IsNotExist(err) {
			return fmt.Errorf("remove scratch disk: %w", err)
		}
		rec.Scratch, changed = "", true
	}
	if rec.Cgroup != "" {
		// QEMU and kiwi-sharefs were killed above; they may still be
		// on their way out. A cgroup that stays is logged, not worth
		// keeping a container that cannot be deleted.
		if err := hostcgroup.Remove(rec.Cgroup, 10*time.Second); err != nil {
			e.log.Warn("remove the VM's cgroup", "id", rec.ID, "err", err)
		} else {
			rec.Cgroup, changed = "", true
		}
	}
	if changed {
		if err := e.store().Save(rec); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return nil
}

// killHelpers kills the monitor, QEMU and kiwi-sharefs processes of the
// state directory dir, found by their command lines, not by pid files.
func (e *env) killHelpers(id, dir string) {
	for _, p := range gc.Helpers(gc.Processes(), dir) {
		if p.Pid == os.Getpid() {
			continue // a monitor removing its own abandoned container
		}
		if err := unix.Kill(p.Pid, unix.SIGKILL); err == nil {
			e.log.Info("killed a leftover helper", "id", id, "pid", p.Pid, "cmd", filepath.Base(p.Argv[0]))
		}
	}
}

// keeperCmd builds the hidden loop-keeper invocation with the same global
// settings as this one.
func keeperCmd(ctx *cli.Context) func(owner string, count int, timeout time.Duration) *exec.Cmd {
	return func(owner string, count int, timeout time.Duration) *exec.Cmd {
		self, err := os.Executable()
		if err != nil {
			self = "/proc/self/exe"
		}
		args := globalArgs(ctx)
		args = append(args, containermode.KeeperCommand, "--owner", owner, "--count", strconv.Itoa(count), "--timeout", timeout.String())
		return exec.Command(self, args...)
	}
}

// idArg returns the single container id argument.
func idArg(ctx *cli.Context) (string, error) {
	if ctx.NArg() < 1 {
		return "", fmt.Errorf("%s: container id missing (usage: kiwi-shim %s %s)", ctx.Command.Name, ctx.Command.Name, ctx.Command.ArgsUsage)
	}
	id := ctx.Args().First()
	return id, oci.ValidateID(id)
}

// rawArgs returns the command line after the command name, untouched, so
// that commands that container mode hands to runc as they are keep every
// flag runc knows, including ones kiwi-shim does not interpret.
func rawArgs(name string) []string {
	args := os.Args[1:]
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") {
			if a == name {
				return args[i+1:]
			}
			return nil
		}
		flag, _, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if valuedGlobals[flag] && !hasVal {
			i++
		}
	}
	return nil
}
