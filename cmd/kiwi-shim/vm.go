package main

import (
	"context"
	"embed"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/containermode"
	"github.com/kiwi-shim/kiwi-shim/pkg/fdutil"
	"github.com/kiwi-shim/kiwi-shim/pkg/settings"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmmode"
)

// vmMonitorCommand is the hidden command create starts as a VM's monitor.
var vmMonitorCommand = cli.Command{
	Name:   vmmode.MonitorCommand,
	Hidden: true,
	Flags:  []cli.Flag{cli.StringFlag{Name: "state-dir"}},
	Action: withEnv(func(ctx *cli.Context, e *env) error {
		dir := ctx.String("state-dir")
		code, abandoned := vm.Run(dir, os.NewFile(3, "ready"), os.NewFile(vm.GoFD, "go-ahead"), e.log)
		if abandoned {
			// create went away before the VM was ready: no engine knows
			// this container, and none will delete it.
			e.vmManager(ctx).RemoveAbandoned(context.Background(), dir)
		}
		return exitError{code: code}
	}),
}

// vmManager builds the VM-mode manager from the configuration and the
// global flags, which the helpers it starts get again.
func (e *env) vmManager(ctx *cli.Context) *vmmode.Manager {
	return &vmmode.Manager{
		Config:     e.cfg,
		Rootless:   e.rootless,
		CacheDirs:  e.cacheDirs(),
		InitBinary: initBinary,
		HelperArgs: globalArgs(ctx),
		Debug:      ctx.GlobalBool("debug"),
		Store:      e.store(),
		Log:        e.log,
	}
}

// createVM creates a VM-mode container (see vmmode.Manager.Create).
func createVM(ctx *cli.Context, e *env, id, bundle string, spec *specs.Spec, s settings.Container) error {
	// A box that Kubernetes allocated loop devices to (through the device
	// plugin) holds that lease for as long as its monitor lives, although
	// its guest has loop devices of its own: the node's accounting then
	// matches what the scheduler placed, and the lease is freed when the
	// box ends, as in container mode.
	var keeper *containermode.KeeperHandle
	if l := s.Annotations.LoopLease; l != nil && !s.Sandbox {
		kcmd := keeperCmd(ctx)(containermode.KeeperArgs{Owner: id, Count: len(l.Devices), Lease: l, HoldOnly: true})
		err := fdutil.WithInheritedHidden(func() error {
			var kerr error
			keeper, kerr = containermode.StartKeeper(kcmd)
			return kerr
		})
		if err != nil {
			return fmt.Errorf("adopt the Kubernetes loop allocation: %w", err)
		}
	}
	err := e.vmManager(ctx).Create(context.Background(), vmmode.CreateOptions{
		ID: id, Bundle: bundle, Spec: spec, Settings: s,
		ConsoleSocket: ctx.String("console-socket"), PidFile: ctx.String("pid-file"),
	})
	if keeper == nil {
		return err
	}
	var rec *state.Container
	if err == nil {
		rec, err = e.store().Load(id)
	}
	if err != nil {
		keeper.Abort()
		return err
	}
	// The keeper follows the monitor: it releases when the box ends,
	// however it ends.
	return keeper.Hold(rec.Pid)
}

// cacheDirs are the cache directories to look for kernels and boxes in:
// the configured one, and for a rootless user also the system's, filled
// by root's `make kernel` and `make box` (read only).
func (e *env) cacheDirs() []string {
	dirs := []string{e.cfg.CacheDir}
	if sys := config.Default().CacheDir; e.rootless && sys != e.cfg.CacheDir {
		dirs = append(dirs, sys)
	}
	return dirs
}

// initBins holds the kiwi-box-init binaries make build embeds, one per
// guest architecture (see initbin/README.md).
//
//go:embed initbin
var initBins embed.FS

// initBinary returns kiwi-box-init for the guest architecture: the one
// embedded in this binary, else one next to kiwi-shim or where an
// installation put it.
func initBinary(arch string) ([]byte, error) {
	name := "kiwi-box-init-" + arch
	if b, err := initBins.ReadFile("initbin/" + name); err == nil {
		return b, nil
	}
	self, _ := os.Executable()
	cands := []string{filepath.Join(filepath.Dir(self), name), filepath.Join("/usr/local/libexec/kiwi-shim", name), filepath.Join("/usr/libexec/kiwi-shim", name)}
	for _, c := range cands {
		if b, err := os.ReadFile(c); err == nil {
			return b, nil
		}
	}
	return nil, fmt.Errorf("kiwi-box-init for %s is not embedded and not found (looked in %s): build kiwi-shim with make", arch, strings.Join(cands, ", "))
}

// globalArgs repeats this invocation's global settings for a helper.
func globalArgs(ctx *cli.Context) []string {
	var args []string
	for _, g := range []string{"config", "log", "log-format", "root"} {
		// --root has a default that only root may use: pass it on only
		// when given, so that a rootless helper picks its own.
		if v := ctx.GlobalString(g); v != "" && (g != "root" || ctx.GlobalIsSet(g)) {
			args = append(args, "--"+g, v)
		}
	}
	if ctx.GlobalBool("debug") {
		args = append(args, "--debug")
	}
	return args
}
