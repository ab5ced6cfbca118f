package vm

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// ErrMonitorGone means the VM's monitor is not running any more.
var ErrMonitorGone = errors.New("the VM is not running")

func dial(stateDir string) (net.Conn, *vmproto.Writer, error) {
	c, err := dialIn(stateDir, MonitorSocket, 5*time.Second)
	if err != nil {
		return nil, nil, fmt.Errorf("%w (%v)", ErrMonitorGone, err)
	}
	return c, vmproto.NewWriter(c), nil
}

// request sends one frame and returns the monitor's answer.
func request(stateDir string, t vmproto.Type, v any) (vmproto.Frame, error) {
	c, w, err := dial(stateDir)
	if err != nil {
		return vmproto.Frame{}, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if v == nil {
		err = w.Write(t, 0, nil)
	} else {
		err = w.WriteJSON(t, 0, v)
	}
	if err != nil {
		return vmproto.Frame{}, err
	}
	f, err := vmproto.ReadFrame(c)
	if err != nil {
		return vmproto.Frame{}, fmt.Errorf("monitor did not answer: %w", err)
	}
	if f.Type == vmproto.TError {
		var e vmproto.Error
		vmproto.Decode(f.Payload, &e)
		return f, errors.New(e.Message)
	}
	return f, nil
}

// QueryState asks the monitor for the container's status.
func QueryState(stateDir string) (vmproto.State, error) {
	f, err := request(stateDir, vmproto.TState, nil)
	if err != nil {
		return vmproto.State{}, err
	}
	var st vmproto.State
	return st, vmproto.Decode(f.Payload, &st)
}

// Start starts the container's process.
func Start(stateDir string) error {
	_, err := request(stateDir, vmproto.TStart, nil)
	return err
}

// Signal delivers a signal to the container's process (or all of its
// processes).
func Signal(stateDir string, sig int, all bool) error {
	_, err := request(stateDir, vmproto.TSignal, vmproto.Signal{Signal: sig, All: all})
	return err
}

// Pause stops the VM's vCPUs: the container's processes stop where they
// are, as under runc's freezer.
func Pause(stateDir string) error {
	_, err := request(stateDir, vmproto.TPause, nil)
	return err
}

// Resume continues a paused VM.
func Resume(stateDir string) error {
	_, err := request(stateDir, vmproto.TResume, nil)
	return err
}

// ExecIO is where an exec'd process's stdio goes.
type ExecIO struct {
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	// TTY, for a process with a terminal, is the host side of its pty;
	// its size changes are forwarded to the guest.
	TTY *os.File
	// Started, when set, is called once: with nil when the process
	// runs in the guest, or with the *ExecStartError that kept it from
	// starting.
	Started func(error)
}

// ExecStartError is why a process could not be started in the VM: its
// program is missing or not executable (found by the guest), or the
// container is not running. The message is runc's.
type ExecStartError struct{ Reason string }

func (e *ExecStartError) Error() string {
	return "exec failed: unable to start container process: " + e.Reason
}

// Exec runs p in the running VM and relays its stdio; it returns the
// process's shell-style exit status, or an *ExecStartError if the process
// could not be started.
func Exec(stateDir string, p vmproto.Process, eio ExecIO) (int, error) {
	started := false
	report := func(err error) {
		if !started && eio.Started != nil {
			eio.Started(err)
		}
		started = true
	}
	c, w, err := dial(stateDir)
	if err != nil {
		report(&ExecStartError{Reason: err.Error()})
		return 0, err
	}
	defer c.Close()
	if err := w.WriteJSON(vmproto.TExec, 0, p); err != nil {
		return 0, err
	}
	if eio.Stdin != nil {
		go w.Pump(vmproto.TStdin, 0, eio.Stdin)
	}
	if eio.TTY != nil {
		go WatchWinsize(eio.TTY, func(r vmproto.Resize) error { return w.WriteJSON(vmproto.TResize, 0, r) })
	}
	for {
		f, err := vmproto.ReadFrame(c)
		if err != nil {
			err = fmt.Errorf("exec: connection to the VM lost: %w", err)
			report(&ExecStartError{Reason: err.Error()})
			return 0, err
		}
		switch f.Type {
		case vmproto.TStarted:
			report(nil)
		case vmproto.TStdout:
			eio.Stdout.Write(f.Payload)
		case vmproto.TStderr:
			eio.Stderr.Write(f.Payload)
		case vmproto.TExit:
			var e vmproto.Exit
			if err := vmproto.Decode(f.Payload, &e); err != nil {
				return 0, err
			}
			report(nil)
			return e.Status, nil
		case vmproto.TError:
			var e vmproto.Error
			vmproto.Decode(f.Payload, &e)
			if !started {
				err := &ExecStartError{Reason: e.Message}
				report(err)
				return 0, err
			}
			return 0, fmt.Errorf("exec: %s", e.Message)
		}
	}
}

// Stop ends a VM container: the monitor is asked to power the guest off
// (SIGTERM), then killed if it does not go within the timeout, and QEMU is
// killed if it outlived the monitor. Pids are checked against their
// command lines before any signal, so a recycled pid is never hit.
//
// A monitor removing its own abandoned container passes its own pid: it
// is not signalled (it would wait out the timeout for itself and then
// kill itself, leaving the container behind).
func Stop(stateDir string, monitorPid int, timeout time.Duration) {
	if monitorPid > 0 && monitorPid != os.Getpid() && cmdlineHas(monitorPid, stateDir) {
		signalAndWait(monitorPid, unix.SIGTERM, timeout)
	}
	// QEMU and kiwi-sharefs die with the monitor (PDEATHSIG); these are
	// for a monitor that was killed before it could arrange that.
	for _, c := range []struct{ pidFile, mark string }{
		{qemuPidFile, consoleLog},
		{shareFSPidFile, shareFSExports},
	} {
		if b, err := os.ReadFile(filepath.Join(stateDir, c.pidFile)); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && cmdlineHas(pid, filepath.Join(stateDir, c.mark)) {
				signalAndWait(pid, unix.SIGKILL, timeout)
			}
		}
	}
}

func signalAndWait(pid int, sig unix.Signal, timeout time.Duration) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	unix.PidfdSendSignal(fd, sig, nil, 0)
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	if n, _ := unix.Poll(fds, int(timeout/time.Millisecond)); n == 0 && sig != unix.SIGKILL {
		unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
		unix.Poll(fds, int(timeout/time.Millisecond))
	}
}

// MonitorAlive reports whether pid is the monitor of the VM whose state
// directory is stateDir (it may not serve its socket yet: before create's
// go-ahead it waits while the create hooks run).
func MonitorAlive(stateDir string, pid int) bool {
	return pid > 0 && cmdlineHas(pid, stateDir)
}

func cmdlineHas(pid int, s string) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && strings.Contains(string(b), s)
}
