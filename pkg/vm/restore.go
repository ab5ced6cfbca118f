package vm

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"time"
)

// Bounds of a restore. Measured here (TCG): QEMU loads a 2 GiB guest's
// template in about 0.15 s; each bound is far above that and far below
// the cold boot's.
const (
	// restoreConnectTimeout bounds QEMU's connections to the QMP socket
	// and the control port after its start.
	restoreConnectTimeout = 30 * time.Second
	// restoreLoadTimeout bounds the load of the template.
	restoreLoadTimeout = 60 * time.Second
	// restoreExitGrace is how long a failed restore waits for QEMU to
	// end by itself before it kills it: a step that failed because
	// QEMU's connections ended usually sees that before QEMU's exit
	// status exists, and only that status tells a kill from outside
	// (which ends the box) from the restore's own kill.
	restoreExitGrace = 2 * time.Second
)

// restored is a QEMU that runs the box's guest, restored from its
// template, with the box's devices attached.
type restored struct {
	qemu *exec.Cmd
	done <-chan struct{}
	ctl  net.Conn // the control port, connected
	// attached says the virtio-fs sockets were connected: kiwi-sharefs
	// ends with those connections, and a cold boot after a failure needs
	// another one.
	attached bool
	// took is QEMU's start to the guest's continuation, loaded to the
	// end of its load; ram is the copy of the template's RAM before.
	took, loaded, ram time.Duration
}

// restore starts QEMU from the box's template (m.cfg.Template), waits
// until the guest is loaded, attaches the box's devices, and continues
// the guest, which then waits for its configuration. Every wait is
// bounded; on any failure QEMU is gone when it returns, and the caller
// boots cold, unless QEMU was killed from outside (killedFromOutside),
// which ends the box as it would a cold boot. A stop of the box (sigs)
// kills QEMU at once; the boot's signal then says so (bootSignal).
func (m *monitor) restore(gl, ql net.Listener, creatorGone <-chan struct{}, sigs <-chan os.Signal) (r *restored, err error) {
	t := *m.cfg.Template
	f, err := openTemplate(t)
	if err != nil {
		return nil, &badTemplateError{err}
	}
	defer f.Close()
	copyStart := time.Now()
	ram, err := openTemplateRAM(t)
	if err != nil {
		return nil, &badTemplateError{err}
	}
	defer ram.Close()
	copied := time.Since(copyStart)
	mach := m.cfg.Machine
	mach.Hotplug = true
	// After the taps (Machine.Args): the stream, then the RAM.
	mach.IncomingFD = 3 + len(m.taps)
	mach.RAMPath = "/proc/self/fd/" + strconv.Itoa(mach.IncomingFD+1)
	cmds, err := mach.HotplugCommands()
	if err != nil {
		return nil, err
	}
	qemu, done, err := m.startMachine(mach, append(append([]*os.File{}, m.taps...), f, ram))
	if err != nil {
		return nil, err
	}
	r = &restored{qemu: qemu, done: done, ram: copied}
	m.mu.Lock()
	m.qemu = qemu.Process
	stopped := m.bootStop != 0
	m.mu.Unlock()
	if stopped {
		qemu.Process.Kill()
	}
	// A stop or create's going away ends the restore; QEMU's end shows
	// in every step below.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	watchDone := make(chan struct{})
	defer close(watchDone)
	go func() {
		for {
			select {
			case <-watchDone:
				return
			case <-creatorGone:
				cancel()
				return
			case s := <-sigs:
				m.stopBoot(int(s.(syscall.Signal)))
			}
		}
	}()
	defer func() {
		if err == nil {
			return
		}
		if r.ctl != nil {
			r.ctl.Close()
		}
		// A stopped or abandoned box is judged by that, not by
		// QEMU's end: it is killed at once.
		endedItself := false
		if ctx.Err() == nil && m.bootSignal() == 0 {
			select {
			case <-done:
				endedItself = true
			case <-time.After(restoreExitGrace):
			}
		}
		qemu.Process.Kill()
		<-done
		// QEMU may still be exiting when a step sees its connections
		// end: its status, not the moment, says whether it exited.
		exited := false
		if ws, ok := qemu.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Exited() {
			exited = true
		}
		// The dead QEMU's connections that were not accepted yet would
		// be taken by the cold boot's accepts.
		drainListener(gl)
		drainListener(ql)
		if ctx.Err() != nil {
			err = errAbandoned
		} else if gone := m.qemuGone(qemu); gone != nil && (endedItself || m.bootSignal() != 0) {
			err = gone // not the template's fault
		} else if exited && loadFailed(m.qemuLogPath()) {
			// QEMU refused the stream, at whatever step the monitor was.
			var bad *badTemplateError
			if !errors.As(err, &bad) {
				err = &badTemplateError{err}
			}
		}
	}()
	qc, err := acceptBounded(ctx, ql, restoreConnectTimeout, done)
	if err != nil {
		return r, m.qemuFailed("QMP connection", err)
	}
	q, err := newQMP(qc, qmpTimeout)
	if err != nil {
		return r, m.qemuFailed("QMP", err)
	}
	m.mu.Lock()
	m.qmp, m.qmpErr = q, nil
	m.mu.Unlock()
	if r.ctl, err = acceptBounded(ctx, gl, restoreConnectTimeout, done); err != nil {
		return r, m.qemuFailed("control port", err)
	}
	// The RAM is the memfd already: the stream has the rest.
	if _, err := q.run("migrate-set-capabilities", ignoreShared(), qmpTimeout); err != nil {
		return r, m.qemuFailed("load the template", err)
	}
	loadErr := func(err error) error {
		err = m.qemuFailed("load the template", err)
		select {
		case <-q.done:
			// QEMU ended: its exit status and log say whether the
			// template was at fault (below), not the moment.
			return err
		default:
			return &badTemplateError{err}
		}
	}
	if _, err := q.run("migrate-incoming", map[string]any{"uri": "fd:" + strconv.Itoa(mach.IncomingFD)}, qmpTimeout); err != nil {
		return r, loadErr(err)
	}
	if err := waitLoaded(ctx, q); err != nil {
		return r, loadErr(err)
	}
	r.loaded = time.Since(m.qemuStart)
	for _, c := range cmds {
		if _, err := q.run(c.Execute, c.Arguments, qmpTimeout); err != nil {
			return r, m.qemuFailed("attach the box's devices", err)
		}
		r.attached = r.attached || c.Execute == "chardev-add"
	}
	if _, err := q.execute("cont", qmpTimeout); err != nil {
		return r, m.qemuFailed("continue", err)
	}
	r.took = time.Since(m.qemuStart)
	return r, nil
}

// ignoreShared are the arguments of migrate-set-capabilities that leave
// shared RAM (a template's RAM file, a box's copy of it) out of the
// stream, on the saving side and on the loading side alike.
func ignoreShared() map[string]any {
	return map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}
}

// badTemplateError is a restore that failed because of the template:
// QEMU could not load it (or it is not the file that was saved). The
// monitor removes it, so that the next box makes a new one.
type badTemplateError struct{ err error }

func (e *badTemplateError) Error() string { return e.err.Error() }
func (e *badTemplateError) Unwrap() error { return e.err }

// loadFailed reports whether QEMU's log says that it could not load the
// incoming migration stream (QEMU 7.2 then exits).
func loadFailed(qemuLog string) bool {
	b, err := os.ReadFile(qemuLog)
	return err == nil && bytes.Contains(b, []byte("load of migration failed"))
}

// drainListener closes the connections waiting on l, once their
// process has ended: a listener that outlives a failed restore serves
// the cold boot next.
func drainListener(l net.Listener) {
	dl, ok := l.(deadliner)
	if !ok {
		return
	}
	defer dl.SetDeadline(time.Time{})
	for {
		// A deadline already passed fails Accept before it looks at
		// the queue: a short one takes what is queued.
		dl.SetDeadline(time.Now().Add(20 * time.Millisecond))
		c, err := l.Accept()
		if err != nil {
			return
		}
		c.Close()
	}
}

// qemuFailed describes a failed step of a restore with QEMU's last words.
func (m *monitor) qemuFailed(step string, err error) error {
	return fmt.Errorf("%s: %w (qemu: %s)", step, err, tail(m.qemuLogPath()))
}

// waitLoaded waits until QEMU has loaded the incoming guest (it then
// stays paused, -S), at most restoreLoadTimeout. QEMU 7.2 exits when the
// stream is bad; the QMP connection ends with it.
func waitLoaded(ctx context.Context, q *qmp) error {
	deadline := time.Now().Add(restoreLoadTimeout)
	for {
		b, err := q.execute("query-status", qmpTimeout)
		if err != nil {
			return err
		}
		var st struct {
			Status string `json:"status"`
		}
		if err := json.Unmarshal(b, &st); err != nil {
			return fmt.Errorf("query-status: %w", err)
		}
		switch st.Status {
		case "inmigrate":
		case "paused":
			return nil
		default:
			return fmt.Errorf("guest is %q after the load", st.Status)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not loaded within %s", restoreLoadTimeout)
		}
		select {
		case <-ctx.Done():
			return errors.New("stopped")
		case <-q.done:
			return q.err
		case <-time.After(10 * time.Millisecond):
		}
	}
}
