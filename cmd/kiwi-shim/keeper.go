package main

import (
	"context"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/containermode"
	"github.com/kiwi-shim/kiwi-shim/pkg/devcgroup"
	"github.com/kiwi-shim/kiwi-shim/pkg/loopdev"
)

// keeperCommand runs a container's loop keeper (see containermode.Keep).
// It is started by create and is not meant for people.
var keeperCommand = cli.Command{
	Name:   containermode.KeeperCommand,
	Hidden: true,
	Flags: []cli.Flag{
		cli.StringFlag{Name: "owner"},
		cli.IntFlag{Name: "count"},
		cli.DurationFlag{Name: "timeout"},
	},
	Action: withEnv(func(ctx *cli.Context, e *env) error {
		a, err := e.allocator()
		if err != nil {
			return err
		}
		sctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
		defer stop()
		req := loopdev.Request{Owner: ctx.String("owner"), Count: ctx.Int("count"), Wait: true}
		// On cgroup v2 the keeper rebuilds runc's device filter from
		// the rules runc recorded for the container.
		dev := devcgroup.Options{RuncState: filepath.Join(e.runtimeRoot(), req.Owner, "state.json")}
		return containermode.Keep(sctx, a, req, ctx.Duration("timeout"), dev, os.Stdin, os.Stdout, e.log)
	}),
}
