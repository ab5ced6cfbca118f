package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/bridgepin"
	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/containermode"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
	"github.com/kiwi-shim/kiwi-shim/pkg/settings"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmmode"
)

var createFlags = []cli.Flag{
	cli.StringFlag{Name: "bundle, b", Value: ".", Usage: "path to the bundle directory"},
	cli.StringFlag{Name: "pid-file", Usage: "write the container's process id to this file"},
	cli.StringFlag{Name: "console-socket", Usage: "unix socket that receives the pty master when process.terminal is true"},
	cli.BoolFlag{Name: "no-pivot", Usage: "do not use pivot_root (container mode)"},
	cli.BoolFlag{Name: "no-new-keyring", Usage: "do not create a new session keyring (container mode)"},
	cli.IntFlag{Name: "preserve-fds", Usage: "pass N additional file descriptors to the container (after stdio)"},
}

var createCommand = cli.Command{
	Name:      "create",
	Usage:     "create a container",
	ArgsUsage: "<container-id>",
	Description: `Creates the container described by the bundle's config.json. The mode
   comes from the io.kiwi-shim.mode annotation, else default_mode in the
   config file, else "vm". In container mode the loop devices are leased
   here: create waits for them, first come first served. A Kubernetes pod
   sandbox (pause container) always runs in container mode without loop
   devices.`,
	Flags:  createFlags,
	Action: withEnv(create),
}

func create(ctx *cli.Context, e *env) error {
	id, err := idArg(ctx)
	if err != nil {
		return err
	}
	return createContainer(ctx, e, id)
}

// createContainer is create's work, shared with run.
func createContainer(ctx *cli.Context, e *env, id string) error {
	bundle, err := filepath.Abs(ctx.String("bundle"))
	if err != nil {
		return fmt.Errorf("bundle: %w", err)
	}
	spec, err := oci.LoadSpec(bundle)
	if err != nil {
		return err
	}
	s, err := settings.Resolve(e.cfg, bundle, spec, e.log.With("id", id))
	if err != nil {
		return err
	}
	if e.rootless && e.rootlessErr != nil {
		return e.rootlessErr
	}
	if !e.rootless {
		e.pinBridges(id, spec)
	}
	if n := ctx.Int("preserve-fds"); n < 0 {
		return fmt.Errorf("--preserve-fds %d: must not be negative", n)
	}
	if s.Mode == config.ModeVM {
		if err := vmmode.CheckPreserveFds(ctx.Int("preserve-fds")); err != nil {
			return err
		}
		return createVM(ctx, e, id, bundle, spec, s)
	}
	if e.rootless && !s.Sandbox {
		return fmt.Errorf("container mode needs real root: it leases the host's loop devices and hands them to runc; without root use VM mode (annotation %s=vm, the default), where the build gets the guest's own loop devices", oci.AnnotationMode)
	}
	if s.Scratch.Size > 0 {
		e.log.Info("container mode has no scratch disk: the container writes to its own file systems", "id", id, "annotation", oci.AnnotationVMScratch)
	}
	m, err := e.manager(ctx)
	if err != nil {
		return err
	}
	if !s.Sandbox && s.LoopCount > m.Alloc.Capacity() {
		return fmt.Errorf("annotation %s=%d: this host offers at most %d loop devices (loop.capacity)", oci.AnnotationLoopCount, s.LoopCount, m.Alloc.Capacity())
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("hooks: %w", err)
	}
	return m.Create(context.Background(), containermode.CreateOptions{
		Self: self,
		ID:   id, Bundle: bundle, Spec: spec, Settings: s.Annotations, LoopCount: s.LoopCount, Sandbox: s.Sandbox,
		PidFile: ctx.String("pid-file"), ConsoleSocket: ctx.String("console-socket"),
		NoPivot: ctx.Bool("no-pivot"), NoNewKeyring: ctx.Bool("no-new-keyring"),
		PreserveFds: ctx.Int("preserve-fds"), KeeperCmd: keeperCmd(ctx),
	})
}

// pinBridges keeps the host bridge that the container's network hangs on
// from changing its address (and so the container's gateway address) when
// other containers come and go; see package bridgepin. A failure only
// costs that protection, never the container.
func (e *env) pinBridges(id string, spec *specs.Spec) {
	if spec.Linux == nil {
		return
	}
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type != specs.NetworkNamespace || ns.Path == "" {
			continue
		}
		pinned, err := bridgepin.Pin(ns.Path)
		if err != nil {
			e.log.Warn("bridge address not pinned: the container's gateway address may change when other containers start or stop", "id", id, "err", err)
		}
		for _, br := range pinned {
			e.log.Info("pinned the address of bridge "+br+": it followed its ports' lowest address, so each container start or stop could change the gateway address under running containers", "id", id)
		}
	}
}
