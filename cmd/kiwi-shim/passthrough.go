package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/containermode"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
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
		Action: containerAction(func(ctx *cli.Context, e *env, rec *state.Container, m *containermode.Manager) (err error) {
			if m == nil {
				if vmAction == nil {
					return fmt.Errorf("%s is not supported for VM-mode containers", name)
				}
				return vmAction(ctx, e, rec)
			}
			args := rawArgs(name)
			if name == "exec" && !oci.IsPodSandbox(rec.Annotations) {
				var cleanup func()
				args, cleanup, err = withKiwiCapabilities(args, e.store().Dir(rec.ID))
				if err != nil {
					return err
				}
				defer cleanup()
			}
			return m.Runtime.Run(context.Background(), append([]string{name}, args...)...)
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

// In VM mode, pause stops the VM's vCPUs and resume continues them
// (QEMU's QMP stop and cont, from the monitor).
var pauseCommand = passthrough("pause", "suspend all processes of a container", "<container-id>", nil,
	func(_ *cli.Context, e *env, rec *state.Container) error { return vmRequest(vm.Pause, e, rec) })

var resumeCommand = passthrough("resume", "resume a paused container", "<container-id>", nil,
	func(_ *cli.Context, e *env, rec *state.Container) error { return vmRequest(vm.Resume, e, rec) })

// vmRequest runs a request to a VM container's monitor; a monitor that is
// gone is a container that is not running, in runc's words.
func vmRequest(fn func(stateDir string) error, e *env, rec *state.Container) error {
	err := fn(e.store().Dir(rec.ID))
	if errors.Is(err, vm.ErrMonitorGone) {
		return fmt.Errorf("container not running: %w", err)
	}
	return err
}

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
