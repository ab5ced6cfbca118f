package main

import (
	"github.com/urfave/cli"
)

var startCommand = cli.Command{
	Name:      "start",
	Usage:     "start the process of a created container",
	ArgsUsage: "<container-id>",
	Action: withEnv(func(ctx *cli.Context, e *env) error {
		id, err := idArg(ctx)
		if err != nil {
			return err
		}
		rec, m, err := e.load(ctx, id)
		if err != nil {
			return err
		}
		return e.startContainer(rec, m)
	}),
}
