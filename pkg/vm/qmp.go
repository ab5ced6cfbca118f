package vm

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"
)

// qmp is a minimal client of QEMU's machine protocol (QMP): the monitor
// uses it to stop and continue the guest's vCPUs (pause, resume). QEMU
// connects to the monitor's qmp.sock at start (as it does to the control
// port), greets, and waits for qmp_capabilities; after that each command
// gets one answer, and asynchronous events (STOP, RESUME, ...) come in
// between. One goroutine reads everything, so that events never pile up
// in QEMU while nobody asks anything.
type qmp struct {
	w  io.WriteCloser
	mu sync.Mutex // one command at a time
	id uint64

	replies chan qmpMessage
	done    chan struct{} // closed when the connection has ended
	err     error         // why it ended, readable once done is closed
}

// qmpMessage is any line QEMU sends.
type qmpMessage struct {
	QMP    json.RawMessage `json:"QMP,omitempty"`
	Return json.RawMessage `json:"return,omitempty"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error,omitempty"`
	Event string          `json:"event,omitempty"`
	ID    json.RawMessage `json:"id,omitempty"`
}

// qmpLineMax bounds one message from QEMU; its answers to the commands
// used here are a few dozen bytes.
const qmpLineMax = 1 << 20

// newQMP takes over a connection from QEMU: it reads the greeting,
// negotiates capabilities and starts the reader. QEMU gets timeout to
// greet and to answer.
func newQMP(conn io.ReadWriteCloser, timeout time.Duration) (*qmp, error) {
	q := &qmp{w: conn, replies: make(chan qmpMessage), done: make(chan struct{})}
	greeted := make(chan error, 1)
	go q.read(conn, greeted)
	select {
	case err := <-greeted:
		if err != nil {
			conn.Close()
			return nil, err
		}
	case <-time.After(timeout):
		conn.Close()
		return nil, errors.New("qmp: no greeting from QEMU")
	}
	if _, err := q.execute("qmp_capabilities", timeout); err != nil {
		conn.Close()
		return nil, err
	}
	return q, nil
}

// read reads QEMU's messages until the connection ends: the greeting is
// reported on greeted, answers go to execute, events are dropped.
func (q *qmp) read(r io.Reader, greeted chan<- error) {
	s := bufio.NewScanner(r)
	s.Buffer(make([]byte, 4096), qmpLineMax)
	first := true
	for s.Scan() {
		var m qmpMessage
		if err := json.Unmarshal(s.Bytes(), &m); err != nil {
			q.end(fmt.Errorf("qmp: bad message from QEMU: %w", err), greeted, first)
			return
		}
		if first {
			first = false
			if m.QMP == nil {
				q.end(fmt.Errorf("qmp: QEMU did not greet: %.100s", s.Bytes()), greeted, true)
				return
			}
			greeted <- nil
			continue
		}
		if m.Event != "" || (m.Return == nil && m.Error == nil) {
			continue
		}
		select {
		case q.replies <- m:
		case <-time.After(5 * time.Second):
			// Nobody waits for it (the command timed out): drop it.
		}
	}
	err := s.Err()
	if err == nil {
		err = io.EOF
	}
	q.end(fmt.Errorf("qmp: connection to QEMU ended: %w", err), greeted, first)
}

func (q *qmp) end(err error, greeted chan<- error, first bool) {
	q.err = err
	close(q.done)
	if first {
		greeted <- err
	}
}

// execute runs one QMP command without arguments and returns its
// "return" value, or QEMU's error.
func (q *qmp) execute(command string, timeout time.Duration) (json.RawMessage, error) {
	return q.run(command, nil, timeout)
}

// run runs one QMP command with arguments (nil for none) and returns its
// "return" value, or QEMU's error.
func (q *qmp) run(command string, args any, timeout time.Duration) (json.RawMessage, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.id++
	id := fmt.Sprintf("%d", q.id)
	b, err := json.Marshal(struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        string `json:"id"`
	}{command, args, id})
	if err != nil {
		return nil, err
	}
	select {
	case <-q.done:
		return nil, q.err
	default:
	}
	if _, err := q.w.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("qmp %s: %w", command, err)
	}
	deadline := time.After(timeout)
	for {
		select {
		case m := <-q.replies:
			var got string
			if json.Unmarshal(m.ID, &got) != nil || got != id {
				continue // the late answer to a command that timed out
			}
			if m.Error != nil {
				return nil, fmt.Errorf("qmp %s: %s: %s", command, m.Error.Class, m.Error.Desc)
			}
			return m.Return, nil
		case <-q.done:
			return nil, q.err
		case <-deadline:
			return nil, fmt.Errorf("qmp %s: QEMU did not answer within %s", command, timeout)
		}
	}
}

// Close ends the connection; the reader goes with it.
func (q *qmp) Close() error { return q.w.Close() }
