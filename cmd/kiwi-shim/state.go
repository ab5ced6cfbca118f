package main

import (
	"encoding/json"
	"os"

	"github.com/urfave/cli"
)

var stateCommand = cli.Command{
	Name:      "state",
	Usage:     "print the OCI state of a container as JSON",
	ArgsUsage: "<container-id>",
	Action: containerAction(func(_ *cli.Context, _ *env, c container) error {
		st, err := c.State()
		if err != nil {
			return err
		}
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}),
}
