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
	Action: withEnv(func(ctx *cli.Context, e *env) error {
		id, err := idArg(ctx)
		if err != nil {
			return err
		}
		rec, m, err := e.load(ctx, id)
		if err != nil {
			return err
		}
		st, err := e.ociState(rec, m)
		if err != nil {
			return err
		}
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}),
}
