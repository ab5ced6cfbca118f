package main

import (
	"encoding/json"
	"fmt"
	"os"
	"text/tabwriter"

	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/state"
)

var listCommand = cli.Command{
	Name:  "list",
	Usage: "list the containers kiwi-shim knows",
	Flags: []cli.Flag{
		cli.StringFlag{Name: "format, f", Value: "table", Usage: "table or json"},
		cli.BoolFlag{Name: "quiet, q", Usage: "print ids only"},
	},
	Action: withEnv(func(ctx *cli.Context, e *env) error {
		format := ctx.String("format")
		if format != "table" && format != "json" {
			return fmt.Errorf("--format %q: want table or json", format)
		}
		ids, err := e.store().List()
		if err != nil {
			return err
		}
		states := []*state.OCI{}
		for _, id := range ids {
			c, err := e.load(ctx, id)
			if err != nil {
				continue // being created or deleted right now
			}
			st, err := c.State()
			if err != nil {
				return err
			}
			states = append(states, st)
		}
		if ctx.Bool("quiet") {
			for _, st := range states {
				fmt.Println(st.ID)
			}
			return nil
		}
		if format == "json" {
			return json.NewEncoder(os.Stdout).Encode(states)
		}
		tw := tabwriter.NewWriter(os.Stdout, 12, 1, 3, ' ', 0)
		fmt.Fprintln(tw, "ID\tPID\tSTATUS\tBUNDLE\tCREATED\tOWNER")
		for _, st := range states {
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\n", st.ID, st.Pid, st.Status, st.Bundle, st.Created, st.Owner)
		}
		return tw.Flush()
	}),
}
