package vm

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// readGuest dispatches the guest's frames until the connection ends. A
// guest that breaks the protocol (the guest is untrusted) gets its box
// stopped with stop, with a message on the container's stderr.
func (m *monitor) readGuest(conn net.Conn, stop func()) {
	for {
		f, err := vmproto.ReadFrame(conn)
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) {
				return // poweroff
			}
			msg := fmt.Sprintf("the guest broke the control protocol (%v); stopping the box", err)
			m.log.Error(msg, "id", m.cfg.ID)
			fmt.Fprintf(m.err, "kiwi-shim: %s\n", msg)
			m.setExit(1, false)
			stop()
			return
		}
		if f.Stream != 0 {
			m.mu.Lock()
			c := m.clients[f.Stream]
			m.mu.Unlock()
			if c != nil {
				c.Write(f.Type, f.Stream, f.Payload)
			}
			continue
		}
		switch f.Type {
		case vmproto.TStdout:
			if len(f.Payload) > 0 {
				m.out.Write(f.Payload)
			}
		case vmproto.TStderr:
			if len(f.Payload) > 0 {
				m.err.Write(f.Payload)
			}
		case vmproto.TStarted:
			m.startedOnce.Do(func() { close(m.started) })
		case vmproto.TExit:
			var e vmproto.Exit
			if vmproto.Decode(f.Payload, &e) == nil {
				m.setExit(e.Status, true)
			}
			// A process that could not be started ends without TStarted.
			m.startedOnce.Do(func() { close(m.started) })
		case vmproto.TError:
			var e vmproto.Error
			vmproto.Decode(f.Payload, &e)
			m.log.Error("guest", "id", m.cfg.ID, "err", e.Message)
		}
	}
}

// serveClients answers kiwi-shim commands on monitor.sock.
func (m *monitor) serveClients(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go m.client(c)
	}
}

func (m *monitor) client(c net.Conn) {
	defer c.Close()
	f, err := vmproto.ReadFrame(c)
	if err != nil {
		return
	}
	w := vmproto.NewWriter(c)
	switch f.Type {
	case vmproto.TState:
		m.mu.Lock()
		st := vmproto.State{Status: m.status, Pid: os.Getpid()}
		m.mu.Unlock()
		w.WriteJSON(vmproto.TState, 0, st)
	case vmproto.TStart:
		// Not while a pause is under way: it would stop a guest that
		// has just been told to start (and then wait for it).
		m.pauseMu.Lock()
		m.mu.Lock()
		if m.status != "created" {
			msg := "container is " + m.status + ", not created"
			if m.status == "paused" {
				msg = "cannot start a container in the paused state" // runc's words
			}
			m.mu.Unlock()
			m.pauseMu.Unlock()
			w.WriteJSON(vmproto.TError, 0, vmproto.Error{Message: msg})
			return
		}
		m.status = "running"
		m.mu.Unlock()
		m.pauseMu.Unlock()
		startAt := time.Now()
		if err := m.guest.Write(vmproto.TStart, 0, nil); err != nil {
			w.WriteJSON(vmproto.TError, 0, vmproto.Error{Message: err.Error()})
			return
		}
		go m.guest.Pump(vmproto.TStdin, 0, m.in)
		// As with runc, start returns once the process exists, so that
		// a signal sent right after it reaches the process.
		select {
		case <-m.started:
			m.recordStart(time.Since(startAt))
		case <-time.After(30 * time.Second):
			m.log.Warn("the guest did not confirm the start within 30s", "id", m.cfg.ID)
		}
		w.WriteJSON(vmproto.TStarted, 0, vmproto.Started{Pid: os.Getpid()})
	case vmproto.TSignal:
		var s vmproto.Signal
		if vmproto.Decode(f.Payload, &s) != nil {
			return
		}
		if s.Signal == int(unix.SIGKILL) {
			// A paused guest would only take the signal when resumed:
			// continue it, so that SIGKILL ends the container now, as
			// it ends a frozen one under runc (with its data synced by
			// the guest's shutdown, and 137 reported by the guest).
			if err := m.resumeIfPaused(); err != nil {
				m.log.Warn("SIGKILL to a paused VM: continue failed, killing QEMU", "id", m.cfg.ID, "err", err)
				m.setExit(128+s.Signal, false)
				m.killQEMU()
				w.Write(vmproto.TSignal, 0, nil)
				return
			}
		}
		if m.stopBoot(s.Signal) {
			w.Write(vmproto.TSignal, 0, nil)
			return
		}
		m.mu.Lock()
		status := m.status
		if status == "paused" {
			// Other signals wait in the control port until resume, as
			// they stay pending for a frozen process.
			status = m.pausedFrom
		}
		m.mu.Unlock()
		if status == "created" {
			// Nothing runs yet: a signal to a created container ends it.
			m.setExit(128+s.Signal, false)
			m.guest.Write(vmproto.TPoweroff, 0, nil)
		} else {
			m.guest.Write(vmproto.TSignal, 0, f.Payload)
		}
		w.Write(vmproto.TSignal, 0, nil)
	case vmproto.TResize:
		m.mu.Lock()
		booted := m.status != "creating"
		m.mu.Unlock()
		if booted {
			m.guest.Write(vmproto.TResize, 0, f.Payload)
		}
	case vmproto.TExec:
		m.exec(c, w, f.Payload)
	case vmproto.TPause:
		if err := m.pause(); err != nil {
			w.WriteJSON(vmproto.TError, 0, vmproto.Error{Message: err.Error()})
			return
		}
		w.Write(vmproto.TPause, 0, nil)
	case vmproto.TResume:
		if err := m.resume(); err != nil {
			w.WriteJSON(vmproto.TError, 0, vmproto.Error{Message: err.Error()})
			return
		}
		w.Write(vmproto.TResume, 0, nil)
	}
}

// exec runs a further process in the guest for a client and relays its
// frames both ways until the client goes away.
func (m *monitor) exec(c net.Conn, w *vmproto.Writer, payload []byte) {
	m.mu.Lock()
	if m.status != "running" {
		msg := "container is " + m.status + ", not running"
		if m.status == "paused" {
			msg = "cannot exec in a paused container" // runc's words
		}
		m.mu.Unlock()
		w.WriteJSON(vmproto.TError, 0, vmproto.Error{Message: msg})
		return
	}
	id := m.next
	m.next++
	m.clients[id] = w
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.clients, id)
		m.mu.Unlock()
	}()
	if err := m.guest.Write(vmproto.TExec, id, payload); err != nil {
		w.WriteJSON(vmproto.TError, 0, vmproto.Error{Message: err.Error()})
		return
	}
	for {
		f, err := vmproto.ReadFrame(c)
		if err != nil {
			return
		}
		switch f.Type {
		case vmproto.TStdin, vmproto.TSignal, vmproto.TResize:
			m.guest.Write(f.Type, id, f.Payload)
		}
	}
}

// setupConsole makes the pty the container's terminal is relayed through
// and hands its master to the console socket, as runc does.
func (m *monitor) setupConsole() error {
	if m.cfg.ConsoleSocket == "" {
		return errors.New("process.terminal is true but no --console-socket was given")
	}
	p := m.cfg.Guest.Process
	slave, err := OpenConsole(m.cfg.ConsoleSocket, p.Rows, p.Cols)
	if err != nil {
		return err
	}
	m.tty = slave
	m.in, m.out, m.err = slave, slave, slave
	return nil
}

// watchWinsize forwards size changes that the pty master's holder
// (conmon) makes.
func (m *monitor) watchWinsize() {
	WatchWinsize(m.tty, func(r vmproto.Resize) error { return m.guest.WriteJSON(vmproto.TResize, 0, r) })
}
