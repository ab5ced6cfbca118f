package main

import (
	"context"

	"github.com/urfave/cli"
)

var specCommand = cli.Command{
	Name:  "spec",
	Usage: "write a default config.json for a new bundle",
	Flags: []cli.Flag{
		cli.StringFlag{Name: "bundle, b", Usage: "bundle directory (default: current directory)"},
		cli.BoolFlag{Name: "rootless", Usage: "a spec for a rootless container"},
	},
	// The low-level runtime's default spec is the one its users expect;
	// kiwi-shim's own additions come from annotations.
	Action: withEnv(func(ctx *cli.Context, e *env) error {
		m, err := e.manager(ctx)
		if err != nil {
			return err
		}
		return m.Runtime.Run(context.Background(), append([]string{"spec"}, rawArgs("spec")...)...)
	}),
}
