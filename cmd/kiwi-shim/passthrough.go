package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/containermode"
)

// passthrough makes a command that acts on one container in its mode
// (action, one of the container's methods): container mode hands it to
// the low-level runtime with its arguments untouched (runc knows them
// all); the flags declared here document them and catch typos.
func passthrough(name, usage, argsUsage string, flags []cli.Flag, action func(container, *cli.Context) error) cli.Command {
	return cli.Command{
		Name:      name,
		Usage:     usage,
		ArgsUsage: argsUsage,
		Flags:     flags,
		// As in runc: flags come before the id, and whatever follows the
		// id (exec's command line) is never parsed as our flags.
		SkipArgReorder: true,
		Action: containerAction(func(ctx *cli.Context, _ *env, c container) error {
			return action(c, ctx)
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
	}, container.Exec)

var psCommand = passthrough("ps", "list the processes of a container", "<container-id> [ps options]",
	[]cli.Flag{cli.StringFlag{Name: "format, f", Value: "table", Usage: "table or json"}}, container.Ps)

// In VM mode, pause stops the VM's vCPUs and resume continues them
// (QEMU's QMP stop and cont, from the monitor).
var pauseCommand = passthrough("pause", "suspend all processes of a container", "<container-id>", nil, container.Pause)

var resumeCommand = passthrough("resume", "resume a paused container", "<container-id>", nil, container.Resume)

// In VM mode, update changes the CPU controls of the VM's host processes
// only (see vmmode.Manager.Update).
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
	}, container.Update)

// withKiwiCapabilities rewrites exec's --process file (as conmon and
// containerd pass it) into the state directory with KIWI's capabilities
// added, and returns the arguments pointing at the copy.
func withKiwiCapabilities(args []string, dir string) ([]string, func(), error) {
	noop := func() {}
	for i, a := range args {
		var path string
		switch {
		case (a == "--process" || a == "-p" || a == "-process") && i+1 < len(args):
			path = args[i+1]
		case strings.HasPrefix(a, "--process="):
			path = strings.TrimPrefix(a, "--process=")
		default:
			continue
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, noop, fmt.Errorf("exec --process: %w", err)
		}
		var p specs.Process
		if err := json.Unmarshal(b, &p); err != nil {
			return nil, noop, fmt.Errorf("exec --process %s: %w", path, err)
		}
		containermode.AddCapabilities(&p)
		f, err := os.CreateTemp(dir, "exec-process-*.json")
		if err != nil {
			return nil, noop, err
		}
		if err := json.NewEncoder(f).Encode(&p); err != nil {
			f.Close()
			os.Remove(f.Name())
			return nil, noop, err
		}
		f.Close()
		out := append([]string(nil), args...)
		if strings.HasPrefix(a, "--process=") {
			out[i] = "--process=" + f.Name()
		} else {
			out[i+1] = f.Name()
		}
		return out, func() { os.Remove(f.Name()) }, nil
	}
	return args, noop, nil
}
