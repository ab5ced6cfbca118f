package vm

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/fdutil"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmnet"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// setupNetwork moves the interfaces of the container's network
// namespace onto taps for QEMU and fills in the guest's side. A
// namespace that is not the monitor's own is recorded in the state
// directory, so that delete can give its interfaces back.
func (m *monitor) setupNetwork() error {
	st, taps, err := vmnet.Setup(m.cfg.NetNS)
	if err != nil {
		return err
	}
	if !m.cfg.NetNSOwned {
		if err := vmnet.Save(m.dir, st); err != nil {
			for _, t := range taps {
				t.Close()
			}
			vmnet.Teardown(st)
			return err
		}
	}
	m.taps = taps
	m.cfg.Guest.Network = st.Guest()
	m.cfg.Machine.TapMACs = nil
	for _, ifc := range st.Interfaces {
		m.cfg.Machine.TapMACs = append(m.cfg.Machine.TapMACs, ifc.MAC)
	}
	return nil
}

// seedSize is the number of random bytes each guest gets for its entropy
// pool (vmproto.Config.Seed).
const seedSize = 64

func oneLine(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c == '\n' || c == '\r' {
			b[i] = ' '
		}
	}
	return string(b)
}

// startQEMU starts QEMU for a cold boot as a child that dies with the
// monitor.
func (m *monitor) startQEMU() (*exec.Cmd, <-chan struct{}, error) {
	// The taps become QEMU's fds 3, 4, ... (Machine.Args).
	return m.startMachine(m.cfg.Machine, m.taps)
}

// qemuLogPath is QEMU's log in the state directory.
func (m *monitor) qemuLogPath() string { return filepath.Join(m.dir, qemuLog) }

// startMachine starts QEMU for mach as a child that dies with the
// monitor; it inherits extra as fds 3, 4, ...
func (m *monitor) startMachine(mach Machine, extra []*os.File) (*exec.Cmd, <-chan struct{}, error) {
	args, err := mach.Args()
	if err != nil {
		return nil, nil, err
	}
	logf, err := os.OpenFile(m.qemuLogPath(), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, nil, err
	}
	defer logf.Close()
	cmd := exec.Command(m.cfg.QEMU, args...)
	cmd.Dir = m.dir // socket names may be relative to it (SocketPath)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.ExtraFiles = extra
	err = fdutil.WithInheritedHidden(cmd.Start)
	if err != nil {
		return nil, nil, fmt.Errorf("start %s: %w", m.cfg.QEMU, err)
	}
	m.qemuStart = time.Now()
	os.WriteFile(filepath.Join(m.dir, qemuPidFile), []byte(strconv.Itoa(cmd.Process.Pid)), 0o600)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	return cmd, done, nil
}

// boot waits for the guest to say hello, sends it the configuration and
// waits until the container's root is set up. A guest restored from a
// template (r not nil) said hello when the template was made: its
// control port is connected already, and it gets the configuration at
// once.
//
// A kiwi-sharefs that dies meanwhile (sfsDone; nil without virtio-fs)
// ends the boot at once: without its file server the guest would wait
// on its root until the boot timeout.
func (m *monitor) boot(l net.Listener, r *restored, qemu, sfs *exec.Cmd, qemuDone, sfsDone, creatorGone <-chan struct{}, sigs <-chan os.Signal) (net.Conn, error) {
	sfsEnded := func() error {
		if m.bootSignal() == 0 && (sfs == nil || sfs.ProcessState == nil || !sfs.ProcessState.Success()) {
			return fmt.Errorf("kiwi-sharefs, the box's file server, died during boot (log: %s)", filepath.Join(m.dir, shareFSLog))
		}
		// It exits 0 when QEMU closed its connections, and a stop of the
		// box ends it too: QEMU's end says why.
		select {
		case <-qemuDone:
		case <-time.After(10 * time.Second):
			qemu.Process.Kill()
			<-qemuDone
		}
		if err := m.qemuGone(qemu); err != nil {
			return err
		}
		return m.stoppedDuringBoot(qemu)
	}
	accepted := make(chan net.Conn)
	returned := make(chan struct{})
	defer close(returned)
	var conn net.Conn
	if r != nil {
		conn = r.ctl
	} else {
		go func() {
			c, err := l.Accept()
			if err != nil {
				return
			}
			select {
			case accepted <- c:
			case <-returned:
				c.Close() // a QEMU the boot gave up on
			}
		}()
	}
	connectBy := time.After(30 * time.Second)
	for conn == nil {
		select {
		case conn = <-accepted:
		case <-qemuDone:
			if err := m.qemuGone(qemu); err != nil {
				return nil, err
			}
			return nil, fmt.Errorf("qemu exited at start: %s", tail(filepath.Join(m.dir, qemuLog)))
		case <-sfsDone:
			return nil, sfsEnded()
		case <-creatorGone:
			return nil, errAbandoned
		case s := <-sigs:
			m.stopBoot(int(s.(syscall.Signal))) // QEMU goes: qemuDone follows
		case <-connectBy:
			return nil, errors.New("qemu did not connect the control port within 30s")
		}
	}
	type result struct {
		f   vmproto.Frame
		err error
	}
	read := func(timeout time.Duration) (vmproto.Frame, error) {
		ch := make(chan result, 1)
		go func() { f, err := vmproto.ReadFrame(conn); ch <- result{f, err} }()
		deadline := time.After(timeout)
		for {
			select {
			case r := <-ch:
				if r.err != nil {
					// The guest's end went with QEMU, maybe stopped.
					select {
					case <-qemuDone:
						if err := m.qemuGone(qemu); err != nil {
							return vmproto.Frame{}, err
						}
						return vmproto.Frame{}, m.stoppedDuringBoot(qemu)
					case <-time.After(time.Second):
					}
					return vmproto.Frame{}, fmt.Errorf("guest's control port during boot: %w (QEMU: %s; guest console: %s)",
						r.err, tail(m.qemuLogPath()), tail(m.cfg.Machine.ConsoleLog))
				}
				return r.f, nil
			case <-qemuDone:
				if err := m.qemuGone(qemu); err != nil {
					return vmproto.Frame{}, err
				}
				return vmproto.Frame{}, m.stoppedDuringBoot(qemu)
			case <-sfsDone:
				return vmproto.Frame{}, sfsEnded()
			case <-creatorGone:
				return vmproto.Frame{}, errAbandoned
			case s := <-sigs:
				m.stopBoot(int(s.(syscall.Signal))) // QEMU goes: qemuDone follows
			case <-deadline:
				return vmproto.Frame{}, fmt.Errorf("the guest did not start within %s; guest console: %s", timeout, tail(m.cfg.Machine.ConsoleLog))
			}
		}
	}
	var hello vmproto.Hello
	if r == nil {
		f, err := read(m.cfg.BootTimeout)
		if err != nil {
			conn.Close()
			return nil, err
		}
		if f.Type != vmproto.THello || vmproto.Decode(f.Payload, &hello) != nil || hello.Version != vmproto.Version {
			conn.Close()
			return nil, fmt.Errorf("guest init speaks another protocol (frame %d %q): rebuild the initramfs", f.Type, f.Payload)
		}
		m.log.Debug("guest up", "id", m.cfg.ID, "kernel", hello.Kernel)
	}
	helloAt := time.Now()
	m.guest = vmproto.NewWriter(conn)
	guest := m.cfg.Guest
	guest.Hotplugged = r != nil
	guest.Seed = make([]byte, seedSize)
	if _, err := rand.Read(guest.Seed); err != nil {
		conn.Close()
		return nil, fmt.Errorf("seed for the guest: %w", err)
	}
	guest.Time = time.Now().UnixNano()
	if err := m.guest.WriteJSON(vmproto.TConfig, 0, guest); err != nil {
		conn.Close()
		return nil, fmt.Errorf("send guest config: %w", err)
	}
	f, err := read(m.cfg.BootTimeout)
	if err != nil {
		conn.Close()
		return nil, err
	}
	switch f.Type {
	case vmproto.TReady:
		var ready vmproto.Ready
		if len(f.Payload) > 0 {
			vmproto.Decode(f.Payload, &ready) // only measurements
		}
		p := bootPhases(m.qemuStart, helloAt, time.Now(), hello.Boot, ready.Boot)
		if r != nil {
			p.Restore, p.RestoreLoad, p.RestoreRAM = r.took, r.loaded, r.ram
		}
		m.recordBoot(p)
		return conn, nil
	case vmproto.TError:
		var e vmproto.Error
		vmproto.Decode(f.Payload, &e)
		conn.Close()
		return nil, fmt.Errorf("guest setup failed: %s", e.Message)
	default:
		conn.Close()
		return nil, fmt.Errorf("unexpected frame %d from guest during setup", f.Type)
	}
}

// stopBoot ends a box that is still booting because of signal sig (a
// kill, or a stop of the monitor): the box's status becomes 128+sig and
// QEMU is killed, since there is no guest to power off yet. It reports
// false when the boot is over (the signal is then the guest's).
func (m *monitor) stopBoot(sig int) bool {
	m.mu.Lock()
	if m.status != "creating" {
		m.mu.Unlock()
		return false
	}
	if m.bootStop == 0 {
		m.exit, m.exitSeen, m.bootStop = 128+sig, true, sig
	}
	m.mu.Unlock()
	m.log.Info("stopped during boot", "id", m.cfg.ID, "signal", sig)
	m.killQEMU()
	return true
}

// bootSignal is the signal that stopped the boot, or 0.
func (m *monitor) bootSignal() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.bootStop
}

// qemuGone explains a QEMU that ended during the boot, when something
// other than the guest ended it: a stop or kill of the box (its status is
// then 128+signal), or a signal to QEMU itself. The guest's console says
// nothing useful then (it may still show the firmware's banner).
func (m *monitor) qemuGone(qemu *exec.Cmd) error {
	if sig := m.bootSignal(); sig != 0 {
		return bootStopped(sig)
	}
	if ps := qemu.ProcessState; ps != nil {
		if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return &qemuKilledError{sig: ws.Signal()}
		}
	}
	return nil
}

// qemuKilledError is a QEMU that a signal ended during the boot.
type qemuKilledError struct{ sig syscall.Signal }

func (e *qemuKilledError) Error() string {
	if !e.fromOutside() {
		return fmt.Sprintf("QEMU crashed (%s) during the boot", unix.SignalName(e.sig))
	}
	return fmt.Sprintf("QEMU was killed by %s during the boot (from outside the VM: not by the guest)", unix.SignalName(e.sig))
}

// fromOutside reports whether the signal came from outside QEMU (kill,
// an OOM kill, an administrator's stop) rather than from QEMU's own
// fault (a crash: SIGSEGV, SIGABRT, ...), as far as the signal tells.
func (e *qemuKilledError) fromOutside() bool {
	switch e.sig {
	case unix.SIGSEGV, unix.SIGBUS, unix.SIGILL, unix.SIGFPE, unix.SIGABRT, unix.SIGTRAP, unix.SIGSYS:
		return false
	}
	return true
}

// killedFromOutside reports whether err is a QEMU killed from outside.
func killedFromOutside(err error) bool {
	var k *qemuKilledError
	return errors.As(err, &k) && k.fromOutside()
}

// stoppedDuringBoot explains a QEMU that exited by itself during the
// boot: the guest's kernel crash when its console shows one, otherwise
// QEMU's status and last words and the console's last line.
func (m *monitor) stoppedDuringBoot(qemu *exec.Cmd) error {
	console := m.cfg.Machine.ConsoleLog
	if crash := guestCrash(console); crash != "" {
		return &guestCrashError{line: crash, console: console}
	}
	return fmt.Errorf("the VM stopped during boot (QEMU %s: %s); guest console: %s", qemu.ProcessState, tail(m.qemuLogPath()), tail(console))
}

// guestCrashError is a guest kernel that crashed during the boot, before
// the container's process started.
type guestCrashError struct {
	line    string // the kernel's crash line (guestCrash)
	console string // the console log that shows it, if it is kept
	after   error  // what the boot saw of it, if it says more
}

func (e *guestCrashError) Error() string {
	msg := "the VM's kernel crashed during boot: " + e.line
	if e.console != "" {
		msg += " (guest console: " + e.console + ")"
	}
	if e.after != nil {
		msg += " (then: " + e.after.Error() + ")"
	}
	return msg
}

func (e *guestCrashError) Unwrap() error { return e.after }

// forgetQEMU drops the QMP connection and process of a QEMU that ended
// during the boot, before another one boots the box.
func (m *monitor) forgetQEMU() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.qmp != nil {
		m.qmp.Close()
	}
	m.qmp, m.qmpErr, m.qemu = nil, nil, nil
}

// restartShareFS gives a new QEMU a new kiwi-sharefs: the running one
// (sfs, nil without virtio-fs exports) serves one QEMU and ends with its
// connections.
func (m *monitor) restartShareFS(sfs *exec.Cmd, done <-chan struct{}) (*exec.Cmd, <-chan struct{}, error) {
	if sfs != nil {
		sfs.Process.Kill()
		<-done
	}
	return m.startShareFS()
}

// bootStopped is the error of a boot that a signal ended.
func bootStopped(sig int) error {
	name := unix.SignalName(syscall.Signal(sig))
	if name == "" {
		name = fmt.Sprintf("signal %d", sig)
	}
	return fmt.Errorf("the container was stopped by %s during its boot (status %d)", name, 128+sig)
}

// tail returns the last line of a log file, for error messages.
func tail(p string) string {
	b, err := os.ReadFile(p)
	if err != nil || len(b) == 0 {
		return "(empty)"
	}
	if len(b) > 2048 {
		b = b[len(b)-2048:]
	}
	lines := []string{}
	for _, l := range splitLines(string(b)) {
		if l != "" {
			lines = append(lines, l)
		}
	}
	if len(lines) == 0 {
		return "(empty)"
	}
	if len(lines) > 3 {
		lines = lines[len(lines)-3:]
	}
	return oneLine(fmt.Sprint(lines))
}

func splitLines(s string) []string {
	var out []string
	start := 0
	for i := 0; i < len(s); i++ {
		if s[i] == '\n' {
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	return append(out, s[start:])
}

// killQEMU kills QEMU; Run sees it end.
func (m *monitor) killQEMU() {
	m.mu.Lock()
	p := m.qemu
	m.mu.Unlock()
	if p != nil {
		p.Kill()
	}
}

// guestCrash returns the first line of the guest console at p that
// reports a kernel crash, without its timestamp; "" when there is none.
// It reads at most the console's last 64 KiB.
func guestCrash(p string) string {
	f, err := os.Open(p)
	if err != nil {
		return ""
	}
	defer f.Close()
	const most = 64 << 10
	if fi, err := f.Stat(); err == nil && fi.Size() > most {
		f.Seek(fi.Size()-most, io.SeekStart)
	}
	b, _ := io.ReadAll(io.LimitReader(f, most))
	for _, l := range splitLines(string(b)) {
		// "[   21.228623] BUG: ..."
		if i := strings.Index(l, "] "); strings.HasPrefix(l, "[") && i > 0 {
			l = l[i+2:]
		}
		// How a Linux kernel reports its crash: the oops (which
		// oops=panic turns into a panic) and the panic.
		for _, mark := range []string{"Kernel panic - ", "BUG: ", "Oops: ", "general protection fault"} {
			if i := strings.Index(l, mark); i >= 0 {
				return strings.TrimSpace(l[i:])
			}
		}
	}
	return ""
}
