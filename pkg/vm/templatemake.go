package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/fdutil"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// Bounds of a template's making.
const (
	// templateBootTimeout bounds the guest's boot to its Hello and its
	// quiescence (the background module loading).
	templateBootTimeout = 3 * time.Minute
	// templateSaveTimeout bounds the save (about 100 MB for a 2 GiB
	// guest, half a second here).
	templateSaveTimeout = 2 * time.Minute
	// templateLockTimeout bounds the wait for another process making the
	// same template.
	templateLockTimeout = 5 * time.Minute
)

// EnsureTemplate returns the template of machine m (TemplateMachine of
// a box's machine) in dir, making it first if there is none: QEMU boots
// the guest until kiwi-box-init waits for its configuration, the guest
// finishes its background work, and QEMU saves it into a temporary file
// that is renamed into place. Processes making the same template wait
// for each other. made reports whether this call made it.
func EnsureTemplate(ctx context.Context, m Machine, dir string, log *slog.Logger) (t TemplateRef, made bool, err error) {
	key, err := TemplateKey(m)
	if err != nil {
		return TemplateRef{}, false, err
	}
	if t, ok := LookupTemplate(dir, key); ok {
		return t, false, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return TemplateRef{}, false, fmt.Errorf("template directory: %w", err)
	}
	unlock, err := lockTemplate(ctx, filepath.Join(dir, key+".lock"))
	if err != nil {
		return TemplateRef{}, false, err
	}
	defer unlock()
	if t, ok := LookupTemplate(dir, key); ok {
		return t, false, nil // made while we waited
	}
	start := time.Now()
	tmp := filepath.Join(dir, fmt.Sprintf(".%s.tmp-%d", key, os.Getpid()))
	tmpRAM := tmp + templateRAMExt
	defer os.Remove(tmp)
	defer os.Remove(tmpRAM)
	err = saveTemplate(ctx, m, tmp, tmpRAM, log)
	var crash *guestCrashError
	if errors.As(err, &crash) && ctx.Err() == nil {
		// As in a box's cold boot (Run): a guest kernel that crashed
		// in its boot gets one more.
		log.Warn("the template's guest kernel crashed during its boot: booting it again", "crash", crash.line)
		os.Remove(tmp)
		os.Remove(tmpRAM) // a fresh RAM file, as the first boot had
		if err = saveTemplate(ctx, m, tmp, tmpRAM, log); err != nil {
			err = fmt.Errorf("%w; the first boot crashed too: %s", err, crash.line)
		}
	}
	if err != nil {
		return TemplateRef{}, false, fmt.Errorf("make template: %w", err)
	}
	t, err = commitTemplate(dir, key, tmp, tmpRAM, time.Since(start))
	if err != nil {
		return TemplateRef{}, false, fmt.Errorf("make template: %w", err)
	}
	log.Info("vm template made", "path", t.Path, "bytes", t.Size, "ms", time.Since(start).Milliseconds())
	return t, true, nil
}

// lockTemplate takes an exclusive lock on path, waiting at most
// templateLockTimeout, and returns its release.
func lockTemplate(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("template lock: %w", err)
	}
	deadline := time.Now().Add(templateLockTimeout)
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("template lock %s: %w", path, err)
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("template lock %s: another process has been making it for %s", path, templateLockTimeout)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// saveTemplate boots m with no container device, its RAM the file ram,
// and saves the guest's other state, once it waits for its
// configuration, to the file out.
func saveTemplate(ctx context.Context, m Machine, out, ram string, log *slog.Logger) error {
	m = TemplateMachine(m)
	m.RAMPath = ram
	quoted, err := shellQuote(out)
	if err != nil {
		return err
	}
	work, err := os.MkdirTemp("", "kiwi-template-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	m.ControlSocket = filepath.Join(work, "ctl.sock")
	m.QMPSocket = filepath.Join(work, "qmp.sock")
	m.ConsoleLog = filepath.Join(work, "console.log")
	qemuLogPath := filepath.Join(work, "qemu.log")
	gl, err := net.ListenUnix("unix", &net.UnixAddr{Name: m.ControlSocket, Net: "unix"})
	if err != nil {
		return err
	}
	defer gl.Close()
	ql, err := net.ListenUnix("unix", &net.UnixAddr{Name: m.QMPSocket, Net: "unix"})
	if err != nil {
		return err
	}
	defer ql.Close()
	args, err := m.Args()
	if err != nil {
		return err
	}
	logf, err := os.Create(qemuLogPath)
	if err != nil {
		return err
	}
	cmd := exec.Command(m.QEMU, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	err = fdutil.WithInheritedHidden(cmd.Start)
	logf.Close()
	if err != nil {
		return fmt.Errorf("start %s: %w", m.QEMU, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	defer func() {
		select {
		case <-done:
		default:
			cmd.Process.Kill()
			<-done
		}
	}()
	why := func(err error) error {
		select {
		case <-done:
		case <-time.After(time.Second):
			// QEMU's connections may end a moment before QEMU does.
		}
		select {
		case <-done:
			if crash := guestCrash(m.ConsoleLog); crash != "" {
				return &guestCrashError{line: crash, after: err} // its console goes with work
			}
			return fmt.Errorf("%w (QEMU ended: %s; guest console: %s)", err, tail(qemuLogPath), tail(m.ConsoleLog))
		default:
			return fmt.Errorf("%w (guest console: %s)", err, tail(m.ConsoleLog))
		}
	}
	qc, err := acceptBounded(ctx, ql, 30*time.Second, done)
	if err != nil {
		return why(fmt.Errorf("QMP connection: %w", err))
	}
	q, err := newQMP(qc, qmpTimeout)
	if err != nil {
		return why(err)
	}
	defer q.Close()
	ctl, err := acceptBounded(ctx, gl, 30*time.Second, done)
	if err != nil {
		return why(fmt.Errorf("control port: %w", err))
	}
	defer ctl.Close()
	ctl.SetDeadline(time.Now().Add(templateBootTimeout))
	f, err := vmproto.ReadFrame(ctl)
	if err != nil {
		return why(fmt.Errorf("guest hello: %w", err))
	}
	var hello vmproto.Hello
	if f.Type != vmproto.THello || vmproto.Decode(f.Payload, &hello) != nil || hello.Version != vmproto.Version {
		return why(fmt.Errorf("guest init speaks another protocol (frame %d)", f.Type))
	}
	// The guest finishes loading its modules, so that no box restored
	// from it loads them again, and is idle when it is saved.
	if err := vmproto.NewWriter(ctl).Write(vmproto.TQuiesce, 0, nil); err != nil {
		return why(fmt.Errorf("quiesce: %w", err))
	}
	if f, err = vmproto.ReadFrame(ctl); err != nil || f.Type != vmproto.TQuiesce {
		return why(fmt.Errorf("guest did not quiesce (frame %d): %v", f.Type, err))
	}
	ctl.SetDeadline(time.Time{})
	log.Debug("template guest up", "kernel", hello.Kernel)
	// QEMU 7.2 throttles a migration to 128 MiB/s by default: a file
	// takes what it gets.
	if _, err := q.run("migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 40}, qmpTimeout); err != nil {
		return why(err)
	}
	// The RAM stays in its file (shared), not in the stream.
	if _, err := q.run("migrate-set-capabilities", ignoreShared(), qmpTimeout); err != nil {
		return why(err)
	}
	if _, err := q.run("migrate", map[string]any{"uri": "exec:cat > " + quoted}, qmpTimeout); err != nil {
		return why(err)
	}
	deadline := time.Now().Add(templateSaveTimeout)
	for {
		r, err := q.execute("query-migrate", qmpTimeout)
		if err != nil {
			return why(err)
		}
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := json.Unmarshal(r, &st); err != nil {
			return fmt.Errorf("query-migrate: %w", err)
		}
		if st.Status == "completed" {
			break
		}
		if st.Status == "failed" || st.Status == "cancelled" {
			return why(fmt.Errorf("QEMU's save %s: %s", st.Status, st.ErrorDesc))
		}
		if time.Now().After(deadline) {
			return why(fmt.Errorf("QEMU's save did not end within %s", templateSaveTimeout))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	q.execute("quit", qmpTimeout)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
	}
	return nil
}

// deadliner is a listener whose Accept can be bounded.
type deadliner interface {
	SetDeadline(time.Time) error
}

// acceptBounded accepts one connection on l within d, unless gone closes
// (QEMU ended) or ctx ends first. The listener's deadline is reset
// afterwards, and no Accept is left running that could take a later
// connection.
func acceptBounded(ctx context.Context, l net.Listener, d time.Duration, gone <-chan struct{}) (net.Conn, error) {
	dl, ok := l.(deadliner)
	if !ok {
		return nil, errors.New("listener cannot be bounded")
	}
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	dl.SetDeadline(time.Now().Add(d))
	defer dl.SetDeadline(time.Time{})
	go func() {
		c, err := l.Accept()
		ch <- result{c, err}
	}()
	var r result
	select {
	case r = <-ch:
	case <-gone:
		dl.SetDeadline(time.Now())
		r = <-ch
		if r.err == nil {
			// Connected before it ended: that connection is dead.
			r.c.Close()
		}
		return nil, errors.New("QEMU ended")
	case <-ctx.Done():
		dl.SetDeadline(time.Now())
		if r = <-ch; r.err == nil {
			r.c.Close()
		}
		return nil, ctx.Err()
	}
	if r.err != nil {
		var ne net.Error
		if errors.As(r.err, &ne) && ne.Timeout() {
			return nil, fmt.Errorf("no connection within %s", d)
		}
		return nil, r.err
	}
	return r.c, nil
}
