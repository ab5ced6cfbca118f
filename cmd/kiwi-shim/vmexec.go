package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/fdutil"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// vmExec runs `exec` for a VM container: the process runs in the guest,
// and a host process relays its stdio and exits with its status, because
// conmon and containerd wait on the pid they are given. With --detach that
// relay is a child left running (conmon, a subreaper, adopts it).
func vmExec(ctx *cli.Context, e *env, rec *state.Container) error {
	if err := vmPreserveFds(ctx.Int("preserve-fds")); err != nil {
		return err
	}
	p, err := execProcess(ctx, rec)
	if err != nil {
		return err
	}
	console := ctx.String("console-socket")
	if p.Terminal && console == "" {
		return errors.New("exec --tty in a VM-mode container needs --console-socket (as conmon and containerd pass it)")
	}
	dir := e.store().Dir(rec.ID)
	if !ctx.Bool("detach") {
		if pf := ctx.String("pid-file"); pf != "" {
			if err := state.WritePidFile(pf, os.Getpid()); err != nil {
				return err
			}
		}
		return relayExec(dir, p, console)
	}
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, "exec-*.json")
	if err != nil {
		return err
	}
	f.Write(b)
	f.Close()
	self, err := os.Executable()
	if err != nil {
		return err
	}
	// As runc's exec --detach, return only once the process runs, and
	// fail if it cannot be started: the relay says which on fd 3.
	startedR, startedW, err := os.Pipe()
	if err != nil {
		os.Remove(f.Name())
		return err
	}
	defer startedR.Close()
	relay := exec.Command(self, append(globalArgs(ctx), "vm-exec", "--state-dir", dir, "--process", f.Name(), "--started-fd", "3")...)
	relay.Stdin, relay.Stdout, relay.Stderr = os.Stdin, os.Stdout, os.Stderr
	relay.ExtraFiles = []*os.File{startedW}
	if p.Terminal {
		// The caller reads the console socket as soon as we exit: hand
		// the pty over now and give the relay its other end as stdio.
		tty, err := vm.OpenConsole(console, p.Rows, p.Cols)
		if err != nil {
			os.Remove(f.Name())
			return err
		}
		defer tty.Close()
		relay.Stdin, relay.Stdout, relay.Stderr = tty, tty, tty
	}
	relay.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = fdutil.WithInheritedHidden(relay.Start)
	startedW.Close()
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("start exec relay: %w", err)
	}
	line, _ := bufio.NewReader(startedR).ReadString('\n')
	line = strings.TrimSuffix(line, "\n")
	if line != "ok" {
		relay.Wait()
		if msg, ok := strings.CutPrefix(line, "error "); ok {
			return codedError{code: 255, err: errors.New(msg)}
		}
		return errors.New("exec: the relay ended before the process started")
	}
	if pf := ctx.String("pid-file"); pf != "" {
		if err := state.WritePidFile(pf, relay.Process.Pid); err != nil {
			relay.Process.Kill()
			return err
		}
	}
	relay.Process.Release()
	return nil
}

// vmExecCommand is the hidden relay a detached VM exec leaves running.
var vmExecCommand = cli.Command{
	Name:   "vm-exec",
	Hidden: true,
	Flags: []cli.Flag{cli.StringFlag{Name: "state-dir"}, cli.StringFlag{Name: "process"},
		cli.IntFlag{Name: "started-fd", Value: -1, Usage: `"ok" or "error MSG" goes there once the process started or failed to`}},
	Action: func(ctx *cli.Context) error {
		b, err := os.ReadFile(ctx.String("process"))
		os.Remove(ctx.String("process"))
		if err != nil {
			return err
		}
		var p vmproto.Process
		if err := json.Unmarshal(b, &p); err != nil {
			return err
		}
		eio := vm.ExecIO{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}
		if p.Terminal {
			eio.TTY = os.Stdin // the pty slave exec handed us
		}
		if fd := ctx.Int("started-fd"); fd >= 0 {
			started := os.NewFile(uintptr(fd), "started")
			eio.Started = func(err error) {
				if err != nil {
					fmt.Fprintf(started, "error %s\n", strings.ReplaceAll(err.Error(), "\n", " "))
				} else {
					fmt.Fprintln(started, "ok")
				}
				started.Close()
			}
		}
		status, err := vm.Exec(ctx.String("state-dir"), p, eio)
		var se *vm.ExecStartError
		if errors.As(err, &se) && ctx.Int("started-fd") >= 0 {
			// exec reports it.
			return exitError{code: 255}
		}
		if err != nil {
			return err
		}
		return exitError{code: status}
	},
}

// relayExec runs p in the VM with this process's stdio, or with a pty
// handed to the console socket when p has a terminal, and exits with the
// process's status.
func relayExec(dir string, p vmproto.Process, console string) error {
	eio := vm.ExecIO{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}
	if p.Terminal {
		tty, err := vm.OpenConsole(console, p.Rows, p.Cols)
		if err != nil {
			return err
		}
		defer tty.Close()
		eio = vm.ExecIO{Stdin: tty, Stdout: tty, Stderr: tty, TTY: tty}
	}
	status, err := vm.Exec(dir, p, eio)
	var se *vm.ExecStartError
	if errors.As(err, &se) {
		return codedError{code: 255, err: err} // runc's status for it
	}
	if err != nil {
		return err
	}
	return exitError{code: status}
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

// vmPs lists the host processes of a VM container: its monitor and QEMU.
func vmPs(ctx *cli.Context, e *env, rec *state.Container) error {
	pids := []int{}
	if rec.Pid > 0 {
		pids = append(pids, rec.Pid)
	}
	if b, err := os.ReadFile(filepath.Join(e.store().Dir(rec.ID), "qemu.pid")); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			pids = append(pids, pid)
		}
	}
	if ctx.String("format") == "json" {
		return json.NewEncoder(os.Stdout).Encode(pids)
	}
	fmt.Println("PID")
	for _, p := range pids {
		fmt.Println(p)
	}
	return nil
}
