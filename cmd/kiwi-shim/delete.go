package main

import (
	"context"
	"errors"

	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/state"
)

var deleteCommand = cli.Command{
	Name:      "delete",
	Usage:     "delete a container and everything it holds",
	ArgsUsage: "<container-id>",
	Description: `Removes the container's state and releases its loop devices (detached,
   partition nodes removed). With --force a running container is killed
   first, and a container kiwi-shim has no record of is not an error.`,
	Flags: []cli.Flag{cli.BoolFlag{Name: "force, f", Usage: "kill the container if it is running"}},
	Action: withEnv(func(ctx *cli.Context, e *env) error {
		id, err := idArg(ctx)
		if err != nil {
			return err
		}
		c, err := e.load(ctx, id)
		if errors.Is(err, state.ErrNotExist) && ctx.Bool("force") {
			// Nothing of ours; make sure the runtime has nothing either.
			if m, merr := e.manager(ctx); merr == nil {
				cmd := m.Runtime.Command(context.Background(), "delete", "--force", id)
				cmd.Stdout, cmd.Stderr = nil, nil
				cmd.Run()
			}
			// A state directory without a record is a create that died
			// before writing one: what it started goes with it.
			e.vmManager(ctx).RemoveUnrecorded(id)
			return nil
		}
		if err != nil {
			return err
		}
		return c.Delete(ctx.Bool("force"))
	}),
}
