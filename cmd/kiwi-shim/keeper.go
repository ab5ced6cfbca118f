package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/containermode"
	"github.com/kiwi-shim/kiwi-shim/pkg/devcgroup"
	"github.com/kiwi-shim/kiwi-shim/pkg/deviceplugin"
	"github.com/kiwi-shim/kiwi-shim/pkg/loopdev"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
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
		cli.StringFlag{Name: "lease", Usage: "adopt this Kubernetes allocation (an " + oci.AnnotationLoopLease + " value)"},
		cli.BoolFlag{Name: "hold-only", Usage: "only hold the lease (VM mode)"},
	},
	Action: withEnv(func(ctx *cli.Context, e *env) error {
		a, err := e.allocator()
		if err != nil {
			return err
		}
		sctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
		defer stop()
		owner := ctx.String("owner")
		o := containermode.KeepOptions{
			Owner:          owner,
			SyncPartitions: !ctx.Bool("hold-only"),
			// On cgroup v2 the keeper rebuilds runc's device filter
			// from the rules runc recorded for the container.
			Devices: devcgroup.Options{RuncState: filepath.Join(e.runtimeRoot(), owner, "state.json")},
			Log:     e.log,
		}
		if v := ctx.String("lease"); v != "" {
			want, err := oci.ParseLoopLease(v)
			if err != nil {
				return fmt.Errorf("--lease: %w", err)
			}
			o.Lease = func(ctx context.Context) (*loopdev.Lease, error) {
				return deviceplugin.Adopt(ctx, a, deviceplugin.HandoverDir(a.Dir()), want, owner)
			}
		} else {
			req := loopdev.Request{Owner: owner, Count: ctx.Int("count"), Wait: true}
			timeout := ctx.Duration("timeout")
			o.Lease = func(c context.Context) (*loopdev.Lease, error) {
				if timeout > 0 {
					var cancel context.CancelFunc
					c, cancel = context.WithTimeout(c, timeout)
					defer cancel()
				}
				return a.Acquire(c, req)
			}
		}
		return containermode.Keep(sctx, o, os.Stdin, os.Stdout)
	}),
}
