package vm

import (
	"bufio"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// fakeQEMU answers QMP on conn the way QEMU 7.2 does: greeting, then one
// answer per command (with its id), an event before each answer; "stop"
// and "cont" succeed, other commands fail, and "hang" is never answered.
func fakeQEMU(t *testing.T, conn net.Conn, greeting string) *[]string {
	var mu sync.Mutex
	var got []string
	go func() {
		defer conn.Close()
		conn.Write([]byte(greeting + "\r\n"))
		s := bufio.NewScanner(conn)
		for s.Scan() {
			var c struct {
				Execute string          `json:"execute"`
				ID      json.RawMessage `json:"id"`
			}
			if json.Unmarshal(s.Bytes(), &c) != nil {
				return
			}
			mu.Lock()
			got = append(got, c.Execute)
			mu.Unlock()
			conn.Write([]byte(`{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}` + "\r\n"))
			switch c.Execute {
			case "qmp_capabilities", "stop", "cont":
				conn.Write([]byte(`{"return": {}, "id": ` + string(c.ID) + "}\r\n"))
			case "hang":
			default:
				conn.Write([]byte(`{"error": {"class": "CommandNotFound", "desc": "The command ` + c.Execute + ` has not been found"}, "id": ` + string(c.ID) + "}\r\n"))
			}
		}
	}()
	return &got
}

const qemuGreeting = `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}`

func TestQMP(t *testing.T) {
	host, qemu := net.Pipe()
	fakeQEMU(t, qemu, qemuGreeting)
	q, err := newQMP(host, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	// Commands from several goroutines each get their own answer.
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cmd := "stop"
			if i%2 == 1 {
				cmd = "cont"
			}
			if _, err := q.execute(cmd, 5*time.Second); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	_, err = q.execute("frobnicate", 5*time.Second)
	if err == nil || !strings.Contains(err.Error(), "CommandNotFound") {
		t.Fatalf("unknown command: %v, want QEMU's error", err)
	}
	// A command QEMU does not answer times out; the next one still
	// gets its own answer.
	if _, err := q.execute("hang", 100*time.Millisecond); err == nil || !strings.Contains(err.Error(), "did not answer") {
		t.Fatalf("hang: %v", err)
	}
	if _, err := q.execute("cont", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	// QEMU gone: commands fail at once.
	qemu.Close()
	select {
	case <-q.done:
	case <-time.After(5 * time.Second):
		t.Fatal("end of the connection not noticed")
	}
	if _, err := q.execute("stop", 5*time.Second); err == nil || !strings.Contains(err.Error(), "ended") {
		t.Fatalf("after QEMU went: %v", err)
	}
}

func TestQMPBadGreeting(t *testing.T) {
	for _, g := range []string{`{"return": {}}`, `not json`} {
		host, qemu := net.Pipe()
		fakeQEMU(t, qemu, g)
		if q, err := newQMP(host, 5*time.Second); err == nil {
			q.Close()
			t.Fatalf("greeting %q accepted", g)
		}
	}
	host, qemu := net.Pipe()
	defer qemu.Close()
	if _, err := newQMP(host, 100*time.Millisecond); err == nil || !strings.Contains(err.Error(), "no greeting") {
		t.Fatalf("silent QEMU: %v", err)
	}
}

// pauseMonitor is a monitor in the given status whose QMP goes to a fake
// QEMU and whose guest frames are read from the returned channel.
func pauseMonitor(t *testing.T, status string) (*monitor, *[]string, <-chan vmproto.Frame) {
	host, qemu := net.Pipe()
	cmds := fakeQEMU(t, qemu, qemuGreeting)
	q, err := newQMP(host, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	g, gpeer := net.Pipe()
	t.Cleanup(func() { g.Close(); gpeer.Close() })
	frames := make(chan vmproto.Frame, 16)
	go func() {
		for {
			f, err := vmproto.ReadFrame(gpeer)
			if err != nil {
				return
			}
			frames <- f
		}
	}()
	m := &monitor{log: slog.New(slog.NewTextHandler(io.Discard, nil)), status: status, qmp: q, guest: vmproto.NewWriter(g),
		clients: map[uint32]*vmproto.Writer{}, started: make(chan struct{})}
	return m, cmds, frames
}

// ask sends one request to the monitor's client handler and returns the
// answer.
func ask(t *testing.T, m *monitor, typ vmproto.Type, v any) vmproto.Frame {
	c, s := net.Pipe()
	defer c.Close()
	go m.client(s)
	w := vmproto.NewWriter(c)
	if v == nil {
		w.Write(typ, 0, nil)
	} else {
		w.WriteJSON(typ, 0, v)
	}
	f, err := vmproto.ReadFrame(c)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func status(m *monitor) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.status
}

func TestMonitorPause(t *testing.T) {
	m, cmds, frames := pauseMonitor(t, "running")
	if f := ask(t, m, vmproto.TResume, nil); f.Type != vmproto.TError || !strings.Contains(string(f.Payload), "not paused") {
		t.Fatalf("resume of a running container: %d %s", f.Type, f.Payload)
	}
	if f := ask(t, m, vmproto.TPause, nil); f.Type != vmproto.TPause || status(m) != "paused" {
		t.Fatalf("pause: %d %s, status %s", f.Type, f.Payload, status(m))
	}
	if f := ask(t, m, vmproto.TPause, nil); f.Type != vmproto.TError || !strings.Contains(string(f.Payload), "not running") {
		t.Fatalf("pause of a paused container: %d %s", f.Type, f.Payload)
	}
	if f := ask(t, m, vmproto.TExec, vmproto.Process{Args: []string{"true"}}); f.Type != vmproto.TError || !strings.Contains(string(f.Payload), "paused") {
		t.Fatalf("exec in a paused container: %d %s", f.Type, f.Payload)
	}
	// SIGTERM waits for the resume; SIGKILL resumes first.
	ask(t, m, vmproto.TSignal, vmproto.Signal{Signal: 15})
	if f := <-frames; f.Type != vmproto.TSignal || status(m) != "paused" {
		t.Fatalf("SIGTERM to a paused container: frame %d, status %s", f.Type, status(m))
	}
	ask(t, m, vmproto.TSignal, vmproto.Signal{Signal: 9})
	if f := <-frames; f.Type != vmproto.TSignal || status(m) != "running" {
		t.Fatalf("SIGKILL to a paused container: frame %d, status %s", f.Type, status(m))
	}
	if got := strings.Join(*cmds, " "); got != "qmp_capabilities stop cont" {
		t.Fatalf("QMP commands %q", got)
	}

	// A created container pauses and resumes to created; start waits.
	m, _, frames = pauseMonitor(t, "created")
	ask(t, m, vmproto.TPause, nil)
	if f := ask(t, m, vmproto.TStart, nil); f.Type != vmproto.TError || !strings.Contains(string(f.Payload), "paused state") {
		t.Fatalf("start of a paused container: %d %s", f.Type, f.Payload)
	}
	ask(t, m, vmproto.TResume, nil)
	if st := status(m); st != "created" {
		t.Fatalf("resumed to %s, want created", st)
	}
	// A signal to a paused created container powers it off at resume.
	ask(t, m, vmproto.TPause, nil)
	ask(t, m, vmproto.TSignal, vmproto.Signal{Signal: 15})
	if f := <-frames; f.Type != vmproto.TPoweroff {
		t.Fatalf("signal to a paused created container: frame %d", f.Type)
	}
	for _, st := range []string{"creating", "stopped"} {
		m, _, _ := pauseMonitor(t, st)
		if f := ask(t, m, vmproto.TPause, nil); f.Type != vmproto.TError || status(m) != st {
			t.Fatalf("pause of a %s container: %d %s", st, f.Type, f.Payload)
		}
	}
}

// Pause, resume and state queries at once: no race, and the status ends
// where the last command left it.
func TestMonitorPauseConcurrent(t *testing.T) {
	m, _, _ := pauseMonitor(t, "running")
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			switch i % 3 {
			case 0:
				ask(t, m, vmproto.TPause, nil)
			case 1:
				ask(t, m, vmproto.TResume, nil)
			default:
				ask(t, m, vmproto.TState, nil)
			}
		}()
	}
	wg.Wait()
	if st := status(m); st != "running" && st != "paused" {
		t.Fatalf("status %s", st)
	}
	ask(t, m, vmproto.TResume, nil)
	if st := status(m); st != "running" {
		t.Fatalf("status %s after resume", st)
	}
}
