package vm

import (
	"errors"
	"fmt"
	"net"
	"os"
)

// acceptQMP takes QEMU's connection to the QMP socket, which it makes at
// start, and negotiates; pause and resume need it.
func (m *monitor) acceptQMP(l net.Listener, qemu *os.Process) {
	c, err := l.Accept()
	var q *qmp
	if err == nil {
		q, err = newQMP(c, qmpTimeout)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.qemu != qemu {
		// That QEMU is gone (a boot after a crash has its own).
		if q != nil {
			q.Close()
		}
		return
	}
	m.qmp, m.qmpErr = q, err
	if err != nil {
		m.log.Warn("no QMP connection to QEMU: pause and resume will fail", "id", m.cfg.ID, "err", err)
	}
}

// qmpCommand runs a QMP command without arguments.
func (m *monitor) qmpCommand(command string) error {
	m.mu.Lock()
	q, qerr := m.qmp, m.qmpErr
	m.mu.Unlock()
	if q == nil {
		if qerr == nil {
			qerr = errors.New("QEMU has not connected its QMP socket yet")
		}
		return qerr
	}
	_, err := q.execute(command, qmpTimeout)
	return err
}

// pause stops the guest's vCPUs: a created or running container becomes
// paused (runc pauses both, by freezing the cgroup).
func (m *monitor) pause() error {
	m.pauseMu.Lock()
	defer m.pauseMu.Unlock()
	m.mu.Lock()
	status := m.status
	m.mu.Unlock()
	if status != "running" && status != "created" {
		return errors.New("container not running") // runc's words
	}
	if err := m.qmpCommand("stop"); err != nil {
		return fmt.Errorf("pause: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.status != "running" && m.status != "created" {
		// The VM ended while QEMU stopped it: nothing is paused.
		return errors.New("container not running")
	}
	m.status, m.pausedFrom = "paused", m.status
	return nil
}

// resume continues a paused guest.
func (m *monitor) resume() error {
	paused, err := m.continueIfPaused()
	if !paused {
		return errors.New("container not paused") // runc's words
	}
	return err
}

// resumeIfPaused continues the guest if it is paused.
func (m *monitor) resumeIfPaused() error {
	_, err := m.continueIfPaused()
	return err
}

// continueIfPaused continues the guest if it is paused, and says whether
// it was.
func (m *monitor) continueIfPaused() (paused bool, err error) {
	m.pauseMu.Lock()
	defer m.pauseMu.Unlock()
	m.mu.Lock()
	paused = m.status == "paused"
	m.mu.Unlock()
	if !paused {
		return false, nil
	}
	return true, m.cont()
}

// cont continues the vCPUs and restores the status the pause left; the
// caller holds pauseMu.
func (m *monitor) cont() error {
	if err := m.qmpCommand("cont"); err != nil {
		return fmt.Errorf("resume: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.status == "paused" {
		m.status = m.pausedFrom
	}
	return nil
}
