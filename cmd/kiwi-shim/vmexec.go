package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmmode"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// vmExecCommand is the hidden relay a detached VM exec leaves running.
var vmExecCommand = cli.Command{
	Name:   vmmode.RelayCommand,
	Hidden: true,
	Flags: []cli.Flag{cli.StringFlag{Name: "state-dir"}, cli.StringFlag{Name: "process"},
		cli.IntFlag{Name: "started-fd", Value: -1, Usage: `"ok" or "error MSG" goes there once the process started or failed to`}},
	Action: func(ctx *cli.Context) error {
		status, err := vmmode.Relay(ctx.String("state-dir"), ctx.String("process"), ctx.Int("started-fd"))
		if err != nil {
			return err
		}
		return exitError{code: status}
	},
}

// execProcess builds the process to exec: --process FILE as conmon and
// containerd pass it, or the command line with the container's own
// process settings as the base, as runc does.
func execProcess(ctx *cli.Context, rec *state.Container) (vmproto.Process, error) {
	if pf := ctx.String("process"); pf != "" {
		b, err := os.ReadFile(pf)
		if err != nil {
			return vmproto.Process{}, fmt.Errorf("exec --process: %w", err)
		}
		var sp specs.Process
		if err := json.Unmarshal(b, &sp); err != nil {
			return vmproto.Process{}, fmt.Errorf("exec --process %s: %w", pf, err)
		}
		if len(sp.Args) == 0 {
			return vmproto.Process{}, errors.New("exec --process: args are empty")
		}
		if sp.Cwd == "" {
			sp.Cwd = "/"
		}
		return vm.ProcessFromSpec(&sp), nil
	}
	args := ctx.Args().Tail()
	if len(args) == 0 {
		return vmproto.Process{}, errors.New("exec: no command given")
	}
	var p vmproto.Process
	if spec, err := oci.LoadSpec(rec.Bundle); err == nil {
		p = vm.ProcessFromSpec(spec.Process)
	}
	p.Args, p.Terminal = args, ctx.Bool("tty")
	if p.Cwd == "" {
		p.Cwd = "/"
	}
	if c := ctx.String("cwd"); c != "" {
		p.Cwd = c
	}
	p.Env = append(p.Env, ctx.StringSlice("env")...)
	if u := ctx.String("user"); u != "" {
		uid, gid, _ := strings.Cut(u, ":")
		n, err := strconv.ParseUint(uid, 10, 32)
		if err != nil {
			return vmproto.Process{}, fmt.Errorf("exec --user %q: want UID[:GID]", u)
		}
		p.UID, p.GID = uint32(n), 0
		if gid != "" {
			g, err := strconv.ParseUint(gid, 10, 32)
			if err != nil {
				return vmproto.Process{}, fmt.Errorf("exec --user %q: want UID[:GID]", u)
			}
			p.GID = uint32(g)
		}
	}
	return p, nil
}

// printPids prints the pids of ps as runc does: a table, or JSON.
func printPids(ctx *cli.Context, pids []int) error {
	if ctx.String("format") == "json" {
		return json.NewEncoder(os.Stdout).Encode(pids)
	}
	fmt.Println("PID")
	for _, p := range pids {
		fmt.Println(p)
	}
	return nil
}
