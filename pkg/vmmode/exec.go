package vmmode

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"

	"github.com/kiwi-shim/kiwi-shim/pkg/state"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// RelayCommand is the hidden kiwi-shim command a detached Exec leaves
// running as the process's host side; it runs Relay.
const RelayCommand = "vm-exec"

// ExecOptions are the inputs of Exec: the process and runc's exec flags.
type ExecOptions struct {
	// Process runs in the guest.
	Process vmproto.Process
	// ConsoleSocket receives the pty master when Process has a terminal.
	ConsoleSocket string
	// Detach leaves a relay running and returns once the process runs.
	Detach bool
	// PidFile gets the pid of the host process that stands for the
	// guest process: this one, or the detached relay.
	PidFile string
}

// StartError is an exec whose process did not start; runc exits with
// status 255 for it.
type StartError struct{ Err error }

func (e *StartError) Error() string { return e.Err.Error() }
func (e *StartError) Unwrap() error { return e.Err }

// Exec runs a further process in the box. The process runs in the guest,
// and a host process relays its stdio and exits with its status, because
// conmon and containerd wait on the pid they are given: without Detach
// that is this process, and Exec returns the process's exit status; with
// Detach it is a child left running (conmon, a subreaper, adopts it), and
// Exec returns once the process started.
func (m *Manager) Exec(_ context.Context, rec *state.Container, o ExecOptions) (int, error) {
	p := o.Process
	if p.Terminal && o.ConsoleSocket == "" {
		return 0, errors.New("exec --tty in a VM-mode container needs --console-socket (as conmon and containerd pass it)")
	}
	dir := m.dir(rec.ID)
	if !o.Detach {
		if pf := o.PidFile; pf != "" {
			if err := state.WritePidFile(pf, os.Getpid()); err != nil {
				return 0, err
			}
		}
		return relayExec(dir, p, o.ConsoleSocket)
	}
	return 0, m.execDetached(dir, o)
}

// execDetached starts the relay for o and waits until it says that the
// process runs or failed to start.
func (m *Manager) execDetached(dir string, o ExecOptions) error {
	p := o.Process
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
	args := append(append([]string{}, m.HelperArgs...), RelayCommand, "--state-dir", dir, "--process", f.Name(), "--started-fd", "3")
	relay := exec.Command(self, args...)
	relay.Stdin, relay.Stdout, relay.Stderr = os.Stdin, os.Stdout, os.Stderr
	relay.ExtraFiles = []*os.File{startedW}
	if p.Terminal {
		// The caller reads the console socket as soon as we exit: hand
		// the pty over now and give the relay its other end as stdio.
		tty, err := vm.OpenConsole(o.ConsoleSocket, p.Rows, p.Cols)
		if err != nil {
			os.Remove(f.Name())
			return err
		}
		defer tty.Close()
		relay.Stdin, relay.Stdout, relay.Stderr = tty, tty, tty
	}
	relay.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = m.host().StartProcess(relay, nil)
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
			return &StartError{Err: errors.New(msg)}
		}
		return errors.New("exec: the relay ended before the process started")
	}
	if pf := o.PidFile; pf != "" {
		if err := state.WritePidFile(pf, relay.Process.Pid); err != nil {
			relay.Process.Kill()
			return err
		}
	}
	relay.Process.Release()
	return nil
}

// relayExec runs p in the VM with this process's stdio, or with a pty
// handed to the console socket when p has a terminal, and returns the
// process's status.
func relayExec(dir string, p vmproto.Process, console string) (int, error) {
	eio := vm.ExecIO{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}
	if p.Terminal {
		tty, err := vm.OpenConsole(console, p.Rows, p.Cols)
		if err != nil {
			return 0, err
		}
		defer tty.Close()
		eio = vm.ExecIO{Stdin: tty, Stdout: tty, Stderr: tty, TTY: tty}
	}
	status, err := vm.Exec(dir, p, eio)
	var se *vm.ExecStartError
	if errors.As(err, &se) {
		return 0, &StartError{Err: err} // runc's status for it
	}
	if err != nil {
		return 0, err
	}
	return status, nil
}

// Relay is the body of the relay a detached Exec leaves running: it reads
// the process from processFile (and removes the file), runs it in the box
// of the state directory dir with this process's stdio (a pty slave when
// the process has a terminal), and returns its exit status. With
// startedFd >= 0 it writes "ok" or "error MSG" there once the process
// started or failed to; Exec reports a failure to start, and the relay
// then only returns status 255.
func Relay(dir, processFile string, startedFd int) (int, error) {
	b, err := os.ReadFile(processFile)
	os.Remove(processFile)
	if err != nil {
		return 0, err
	}
	var p vmproto.Process
	if err := json.Unmarshal(b, &p); err != nil {
		return 0, err
	}
	eio := vm.ExecIO{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}
	if p.Terminal {
		eio.TTY = os.Stdin // the pty slave exec handed us
	}
	if startedFd >= 0 {
		started := os.NewFile(uintptr(startedFd), "started")
		eio.Started = func(err error) {
			if err != nil {
				fmt.Fprintf(started, "error %s\n", strings.ReplaceAll(err.Error(), "\n", " "))
			} else {
				fmt.Fprintln(started, "ok")
			}
			started.Close()
		}
	}
	status, err := vm.Exec(dir, p, eio)
	var se *vm.ExecStartError
	if errors.As(err, &se) && startedFd >= 0 {
		// exec reports it.
		return 255, nil
	}
	if err != nil {
		return 0, err
	}
	return status, nil
}
