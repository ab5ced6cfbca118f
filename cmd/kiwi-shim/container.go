package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/containermode"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
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

// load finds a container's record and opens it in its mode.
func (e *env) load(ctx *cli.Context, id string) (container, error) {
	rec, err := e.store().Load(id)
	if err != nil {
		return nil, err
	}
	return e.open(ctx, rec)
}

// containerAction adapts an action on one existing container, named by
// the command's first argument.
func containerAction(fn func(*cli.Context, *env, container) error) func(*cli.Context) error {
	return withEnv(func(ctx *cli.Context, e *env) error {
		id, err := idArg(ctx)
		if err != nil {
			return err
		}
		c, err := e.load(ctx, id)
		if err != nil {
			return err
		}
		return fn(ctx, e, c)
	})
}

// keeperCmd builds the hidden loop-keeper invocation with the same global
// settings as this one.
func keeperCmd(ctx *cli.Context) func(containermode.KeeperArgs) *exec.Cmd {
	return func(k containermode.KeeperArgs) *exec.Cmd {
		self, err := os.Executable()
		if err != nil {
			self = "/proc/self/exe"
		}
		args := globalArgs(ctx)
		args = append(args, containermode.KeeperCommand, "--owner", k.Owner, "--count", strconv.Itoa(k.Count), "--timeout", k.Timeout.String())
		if k.Lease != nil {
			args = append(args, "--lease", k.Lease.String())
		}
		if k.HoldOnly {
			args = append(args, "--hold-only")
		}
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
