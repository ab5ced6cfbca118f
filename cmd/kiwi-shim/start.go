package main

import (
	"github.com/urfave/cli"
)

var startCommand = cli.Command{
	Name:      "start",
	Usage:     "start the process of a created container",
	ArgsUsage: "<container-id>",
	Action: containerAction(func(_ *cli.Context, _ *env, c container) error {
		return c.Start()
	}),
}
