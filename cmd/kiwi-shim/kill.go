package main

import (
	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/containermode"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
)

var killCommand = cli.Command{
	Name:      "kill",
	Usage:     "send a signal to a container's process",
	ArgsUsage: "<container-id> [signal]",
	Description: `The signal is a name (TERM, SIGTERM) or a number; the default is SIGTERM.
   With --all, every process of the container gets it.`,
	Flags: []cli.Flag{cli.BoolFlag{Name: "all, a", Usage: "signal all processes of the container"}},
	Action: containerAction(func(ctx *cli.Context, e *env, rec *state.Container, m *containermode.Manager) error {
		sig := "SIGTERM"
		if ctx.NArg() > 1 {
			sig = ctx.Args().Get(1)
		}
		signum, err := parseSignal(sig)
		if err != nil {
			return err
		}
		return e.signalContainer(rec, m, signum, ctx.Bool("all"))
	}),
}
