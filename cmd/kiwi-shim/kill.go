package main

import (
	"github.com/urfave/cli"
)

var killCommand = cli.Command{
	Name:      "kill",
	Usage:     "send a signal to a container's process",
	ArgsUsage: "<container-id> [signal]",
	Description: `The signal is a name (TERM, SIGTERM) or a number; the default is SIGTERM.
   With --all, every process of the container gets it.`,
	Flags: []cli.Flag{cli.BoolFlag{Name: "all, a", Usage: "signal all processes of the container"}},
	Action: containerAction(func(ctx *cli.Context, _ *env, c container) error {
		sig := "SIGTERM"
		if ctx.NArg() > 1 {
			sig = ctx.Args().Get(1)
		}
		signum, err := parseSignal(sig)
		if err != nil {
			return err
		}
		return c.Signal(signum, ctx.Bool("all"))
	}),
}
