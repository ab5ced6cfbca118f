package main

import (
	"context"
	"fmt"

	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/containermode"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
)

// passthrough makes a command that container mode hands to the low-level
// runtime with its arguments untouched (runc knows them all); the flags
// declared here document them and catch typos.
// VM-mode containers have no low-level runtime: vmAction does the work
// there, or the command is refused when it is nil.
func passthrough(name, usage, argsUsage string, flags []cli.Flag, vmAction func(*cli.Context, *env, *state.Container) error) cli.Command {
	return cli.Command{
		Name:      name,
		Usage:     usage,
		ArgsUsage: argsUsage,
		Flags:     flags,
		// As in runc: flags come before the id, and whatever follows the
		// id (exec's command line) is never parsed as our flags.
		SkipArgReorder: true,
		Action: containerAction(func(ctx *cli.Context, e *env, rec *state.Container, m *containermode.Manager) error {
			if m == nil {
				if vmAction == nil {
					return fmt.Errorf("%s is not supported for VM-mode containers", name)
				}
				return vmAction(ctx, e, rec)
			}
			return m.Runtime.Run(context.Background(), append([]string{name}, rawArgs(name)...)...)
		}),
	}
}

var execCommand = passthrough("exec", "run a further process in a running container",
	"<container-id> [command [args...]]", []cli.Flag{
		cli.StringFlag{Name: "console-socket", Usage: "unix socket that receives the pty master"},
		cli.StringFlag{Name: "cwd", Usage: "working directory in the container"},
		cli.StringSliceFlag{Name: "env, e", Usage: "set an environment variable"},
		cli.BoolFlag{Name: "tty, t", Usage: "allocate a pseudo-TTY"},
		cli.StringFlag{Name: "user, u", Usage: "UID[:GID]"},
		cli.Int64SliceFlag{Name: "additional-gids, g", Usage: "additional gids"},
		cli.StringFlag{Name: "process, p", Usage: "path to a process.json"},
		cli.BoolFlag{Name: "detach, d", Usage: "detach from the process"},
		cli.StringFlag{Name: "pid-file", Usage: "write the process id to this file"},
		cli.StringFlag{Name: "process-label", Usage: "SELinux label"},
		cli.StringFlag{Name: "apparmor", Usage: "AppArmor profile"},
		cli.BoolFlag{Name: "no-new-privs", Usage: "set no_new_privs"},
		cli.StringSliceFlag{Name: "cap, c", Usage: "add a capability"},
		cli.IntFlag{Name: "preserve-fds", Usage: "pass N additional file descriptors"},
		cli.StringSliceFlag{Name: "cgroup", Usage: "run in this sub-cgroup"},
		cli.BoolFlag{Name: "ignore-paused", Usage: "allow exec in a paused container"},
	}, vmExec)

var psCommand = passthrough("ps", "list the processes of a container", "<container-id> [ps options]",
	[]cli.Flag{cli.StringFlag{Name: "format, f", Value: "table", Usage: "table or json"}}, vmPs)

var pauseCommand = passthrough("pause", "suspend all processes of a container", "<container-id>", nil, nil)

var resumeCommand = passthrough("resume", "resume a paused container", "<container-id>", nil, nil)

var updateCommand = passthrough("update", "update a container's resource limits", "<container-id>",
	[]cli.Flag{
		cli.StringFlag{Name: "resources, r", Usage: "path to a linux resources JSON file, or - for stdin"},
		cli.StringFlag{Name: "memory", Usage: "memory limit"},
		cli.StringFlag{Name: "memory-swap", Usage: "memory plus swap limit"},
		cli.StringFlag{Name: "memory-reservation", Usage: "memory soft limit"},
		cli.StringFlag{Name: "cpu-shares", Usage: "CPU shares"},
		cli.StringFlag{Name: "cpu-quota", Usage: "CPU CFS quota"},
		cli.StringFlag{Name: "cpu-period", Usage: "CPU CFS period"},
		cli.StringFlag{Name: "cpuset-cpus", Usage: "CPUs to use"},
		cli.StringFlag{Name: "cpuset-mems", Usage: "memory nodes to use"},
		cli.IntFlag{Name: "pids-limit", Usage: "maximum number of pids"},
		cli.StringFlag{Name: "blkio-weight", Usage: "block IO weight"},
		cli.StringFlag{Name: "kernel-memory", Usage: "kernel memory limit"},
		cli.StringFlag{Name: "kernel-memory-tcp", Usage: "kernel TCP memory limit"},
		cli.StringFlag{Name: "l3-cache-schema", Usage: "L3 cache schema"},
		cli.StringFlag{Name: "mem-bw-schema", Usage: "memory bandwidth schema"},
	}, nil)
