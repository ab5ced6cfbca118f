package main

import (
	"encoding/json"
	"os"

	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/containermode"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
)

var stateCommand = cli.Command{
	Name:      "state",
	Usage:     "print the OCI state of a container as JSON",
	ArgsUsage: "<container-id>",
	Action: containerAction(func(_ *cli.Context, e *env, rec *state.Container, m *containermode.Manager) error {
		st, err := e.ociState(rec, m)
		if err != nil {
			return err
		}
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}),
}
