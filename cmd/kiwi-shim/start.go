package main

import (
	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/containermode"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
)

var startCommand = cli.Command{
	Name:      "start",
	Usage:     "start the process of a created container",
	ArgsUsage: "<container-id>",
	Action: containerAction(func(_ *cli.Context, e *env, rec *state.Container, m *containermode.Manager) error {
		return e.startContainer(rec, m)
	}),
}
