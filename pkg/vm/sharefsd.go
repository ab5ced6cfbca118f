package vm

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/fdutil"
	"github.com/kiwi-shim/kiwi-shim/pkg/hostcgroup"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmnet"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmshare"
)

// The monitor is the host process of one VM. create starts it; its pid
// goes to --pid-file, so conmon waits on it, and it exits with the
// container's exit status. It owns QEMU (which dies with it, by
// PR_SET_PDEATHSIG), speaks to kiwi-box-init over the control port, relays
// the container's stdio between its own stdio (conmon's pipes or a pty)
// and the guest, and answers the other kiwi-shim commands on monitor.sock.

// Files in a VM container's state directory.
const (
	MonitorConfigFile = "monitor.json"
	MonitorSocket     = "monitor.sock"
	guestSocket       = "guest.sock"
	qmpSocket         = "qmp.sock"
	consoleLog        = "console.log"
	qemuLog           = "qemu.log"
	qemuPidFile       = "qemu.pid"
)

// GoFD is the descriptor at which the monitor inherits the read end of
// create's go-ahead pipe (after the ready pipe at 3).
const GoFD = 4

// goAhead is the line create writes to the go-ahead pipe once the
// monitor's configuration is written.
const goAhead = "go"

// MonitorConfig is what create hands the monitor.
type MonitorConfig struct {
	// ID is the container id.
	ID string `json:"id"`
	// QEMU and Machine start the VM.
	QEMU    string  `json:"qemu"`
	Machine Machine `json:"machine"`
	// Guest is sent to kiwi-box-init.
	Guest vmproto.Config `json:"guest"`
	// ConsoleSocket receives the pty master when the process has a
	// terminal.
	ConsoleSocket string `json:"consoleSocket,omitempty"`
	// BootTimeout bounds the wait for the guest's hello.
	BootTimeout time.Duration `json:"bootTimeout"`
	// ShareFS runs the virtio-fs back end of Machine.VirtioFS.
	ShareFS *ShareFS `json:"sharefs,omitempty"`
	// Cgroup is the container's cgroup (made by create), which the
	// monitor joins before it starts kiwi-sharefs and QEMU, so that they
	// are accounted to the container.
	Cgroup string `json:"cgroup,omitempty"`
	// NetNS is the network namespace whose interfaces the guest takes
	// over when Machine.Network is NetTap (see package vmnet). The
	// monitor moves them onto taps itself, so that they can be set up
	// in its own namespace, after the hooks that made them.
	NetNS string `json:"netns,omitempty"`
	// NetNSOwned says that NetNS is the monitor's own namespace, made
	// for the container: it goes with the monitor's processes, so its
	// taps need no teardown and no record (a /proc path outlives its
	// process and could name another's namespace).
	NetNSOwned bool `json:"netnsOwned,omitempty"`
}

// ShareFS is the kiwi-sharefs daemon serving a VM's virtio-fs exports.
type ShareFS struct {
	// Binary is kiwi-sharefs.
	Binary string `json:"binary"`
	// Exports are served by the one daemon of the VM.
	Exports []vmshare.Export `json:"exports"`
	// Debug makes it log every FUSE request and vhost-user message.
	Debug bool `json:"debug,omitempty"`
}

// Paths fills the machine's socket and log paths for a state directory.
func (c *MonitorConfig) Paths(stateDir string) {
	c.Machine.ControlSocket = SocketPath(stateDir, guestSocket)
	c.Machine.QMPSocket = SocketPath(stateDir, qmpSocket)
	c.Machine.ConsoleLog = filepath.Join(stateDir, consoleLog)
}

// monitor is the running state of Run.
type monitor struct {
	cfg      MonitorConfig
	dir      string
	log      *slog.Logger
	guest    *vmproto.Writer
	out, err io.Writer  // container stdout/stderr targets
	in       io.Reader  // container stdin source
	tty      *os.File   // pty slave when the process has a terminal
	taps     []*os.File // QEMU's tap devices of NetTap, in Machine.TapMACs order

	mu          sync.Mutex
	status      string // creating, created, running, paused, stopped
	pausedFrom  string // created or running: the status resume goes back to
	qmp         *qmp   // QEMU's machine protocol, once QEMU has connected
	qmpErr      error  // why there is no qmp
	qemu        *os.Process
	exit        int
	exitSeen    bool
	bootStop    int // the signal that stopped the box during its boot
	clients     map[uint32]*vmproto.Writer
	next        uint32
	started     chan struct{} // closed when the guest has started the process (or failed to)
	startedOnce sync.Once
	// pauseMu orders pause, resume and the resume a SIGKILL or a stop
	// of a paused VM does first; it is held across the QMP command, m.mu
	// is not.
	pauseMu sync.Mutex
}

// qmpTimeout bounds one QMP command. A stop waits for the virtio-fs back
// end to finish the requests in flight.
const qmpTimeout = 20 * time.Second

// errAbandoned ends a boot whose create went away.
var errAbandoned = errors.New("create went away during the boot")

// Run runs the monitor for the state directory dir and returns the exit
// status the process should exit with.
//
// The monitor is started before its configuration exists: it is the
// container's process on the host (the pid of its state), born in the
// namespaces the spec asks for, and create runs the prestart and
// createRuntime hooks against it first (a CNI hook, say, sets up the
// network namespace the guest's interfaces come from). Create then
// writes the configuration and the line "go" to goAhead; the monitor
// reads it there and boots. It writes "ok" or "error MSG" to ready, the
// write end of a pipe that create reads, once the guest is set up (or
// failed to). If create goes away before that (killed, say, with the
// containerd shim that ran it), nobody will learn of the container: the
// boot is abandoned, and Run reports it so that the caller can remove the
// container.
func Run(dir string, ready, goAhead *os.File, log *slog.Logger) (code int, abandoned bool) {
	m := &monitor{dir: dir, log: log, status: "creating", clients: map[uint32]*vmproto.Writer{}, next: 1, started: make(chan struct{})}
	if !waitGoAhead(goAhead) {
		// create failed or went away before it wrote the configuration:
		// there is no container to run or to report to.
		return 1, false
	}
	creatorGone := watchReader(ready)
	fail := func(err error) (int, bool) {
		_, werr := fmt.Fprintf(ready, "error %s\n", oneLine(err.Error()))
		ready.Close()
		select {
		case <-creatorGone:
			log.Warn("create went away before the VM was ready: removing the container", "id", m.cfg.ID, "err", err)
			return 1, true
		default:
		}
		log.Error("vm monitor", "id", m.cfg.ID, "err", err)
		return 1, errors.Is(werr, unix.EPIPE)
	}
	b, err := os.ReadFile(filepath.Join(dir, MonitorConfigFile))
	if err != nil {
		return fail(err)
	}
	if err := json.Unmarshal(b, &m.cfg); err != nil {
		return fail(fmt.Errorf("monitor config: %w", err))
	}
	if m.cfg.Cgroup != "" {
		if err := hostcgroup.Join(m.cfg.Cgroup, os.Getpid()); err != nil {
			return fail(err)
		}
	}
	if m.cfg.Machine.Network == NetTap {
		if err := m.setupNetwork(); err != nil {
			return fail(fmt.Errorf("container network: %w", err))
		}
		defer func() {
			for _, t := range m.taps {
				t.Close()
			}
		}()
	}
	m.in, m.out, m.err = os.Stdin, os.Stdout, os.Stderr
	if m.cfg.Guest.Process.Terminal {
		if err := m.setupConsole(); err != nil {
			return fail(err)
		}
	}
	gl, err := listenIn(dir, guestSocket)
	if err != nil {
		return fail(fmt.Errorf("control socket: %w", err))
	}
	defer gl.Close()
	ql, err := listenIn(dir, qmpSocket)
	if err != nil {
		return fail(fmt.Errorf("qmp socket: %w", err))
	}
	defer ql.Close()
	ml, err := listenIn(dir, MonitorSocket)
	if err != nil {
		return fail(fmt.Errorf("monitor socket: %w", err))
	}
	defer ml.Close()
	// State queries are answered from now on ("creating"), so that a
	// delete during the boot does not wait for it.
	go m.serveClients(ml)

	// PR_SET_PDEATHSIG of the children fires when the thread that
	// forked them exits: pin this goroutine (the main one) to its thread
	// for the monitor's lifetime.
	runtime.LockOSThread()
	sfs, sfsDone, err := m.startShareFS()
	if err != nil {
		return fail(err)
	}
	defer m.stopShareFS(sfs, sfsDone)
	// A stop (SIGTERM, SIGINT, SIGHUP to the monitor) at any moment of
	// the boot ends the box with the signal's status, as a kill does.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGINT, unix.SIGHUP)
	qemu, qemuDone, err := m.startQEMU()
	if err != nil {
		return fail(err)
	}
	m.mu.Lock()
	m.qemu = qemu.Process
	stopped := m.bootStop != 0
	m.mu.Unlock()
	if stopped {
		qemu.Process.Kill() // killed before QEMU was there
	}
	go m.acceptQMP(ql)
	conn, err := m.boot(gl, qemu, sfs, qemuDone, sfsDone, creatorGone, sigs)
	if err != nil {
		qemu.Process.Kill()
		<-qemuDone
		code, abandoned := fail(err)
		if sig := m.bootSignal(); sig != 0 {
			code = 128 + sig
		}
		return code, abandoned
	}
	defer conn.Close()
	m.mu.Lock()
	m.status = "created"
	m.mu.Unlock()
	if _, err := fmt.Fprintln(ready, "ok"); err != nil {
		// create is gone: it saw neither "ok" nor the pid.
		qemu.Process.Kill()
		<-qemuDone
		return fail(fmt.Errorf("report ready: %w", err))
	}
	ready.Close()

	go m.readGuest(conn, func() { qemu.Process.Kill() })
	if m.tty != nil {
		go m.watchWinsize()
	}
	select {
	case <-qemuDone:
	case <-sfsDone:
		// kiwi-sharefs exits 0 when QEMU closed its connections, at the
		// guest's poweroff, maybe a moment before QEMU itself exits.
		// Otherwise it died, and without its file server the guest's
		// file system hangs: end the box, loudly.
		if sfs.ProcessState.Success() {
			select {
			case <-qemuDone:
			case <-time.After(10 * time.Second):
				qemu.Process.Kill()
				<-qemuDone
			}
			break
		}
		msg := fmt.Sprintf("kiwi-sharefs, the box's file server, died (%s); stopping the box (log: %s)", sfs.ProcessState, filepath.Join(m.dir, shareFSLog))
		log.Error(msg, "id", m.cfg.ID)
		fmt.Fprintf(m.err, "kiwi-shim: %s\n", msg)
		qemu.Process.Kill()
		<-qemuDone
	case s := <-sigs:
		log.Debug("monitor stopping", "id", m.cfg.ID, "signal", s)
		m.setExit(128+int(s.(syscall.Signal)), false)
		// A paused guest cannot power off: continue it first (a VM
		// that cannot be continued is killed below).
		if err := m.resumeIfPaused(); err != nil {
			log.Warn("stopping a paused VM: continue failed", "id", m.cfg.ID, "err", err)
		}
		m.guest.Write(vmproto.TPoweroff, 0, nil)
		select {
		case <-qemuDone:
		case <-time.After(5 * time.Second):
			qemu.Process.Kill()
			<-qemuDone
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.status = "stopped"
	if !m.exitSeen {
		log.Error("VM ended without reporting the container's exit status", "id", m.cfg.ID, "console", m.cfg.Machine.ConsoleLog)
		return 255, false
	}
	return m.exit, false
}

// watchReader returns a channel that is closed when the reading end of
// the pipe w is closed by all its holders: when create, waiting for the
// ready line, has gone. It stops watching once w is closed.
func watchReader(w *os.File) <-chan struct{} {
	gone := make(chan struct{})
	rc, err := w.SyscallConn()
	if err != nil {
		return gone
	}
	go func() {
		for {
			var revents int16
			var perr error
			// Control fails once w is closed: the watch ends with it.
			if err := rc.Control(func(fd uintptr) {
				fds := []unix.PollFd{{Fd: int32(fd)}} // POLLERR is always reported
				_, perr = unix.Poll(fds, 200)
				revents = fds[0].Revents
			}); err != nil {
				return
			}
			if perr != nil && !errors.Is(perr, unix.EINTR) {
				return
			}
			if revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0 {
				close(gone)
				return
			}
		}
	}()
	return gone
}

// waitGoAhead waits for create's go-ahead line on r and closes r. It
// reports false when create closed the pipe without it (it failed, or
// died, before the configuration was written).
func waitGoAhead(r *os.File) bool {
	defer r.Close()
	line, err := bufio.NewReader(io.LimitReader(r, 64)).ReadString('\n')
	return err == nil && strings.TrimSpace(line) == goAhead
}

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

func oneLine(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c == '\n' || c == '\r' {
			b[i] = ' '
		}
	}
	return string(b)
}

// startQEMU starts QEMU as a child that dies with the monitor.
func (m *monitor) startQEMU() (*exec.Cmd, <-chan struct{}, error) {
	args, err := m.cfg.Machine.Args()
	if err != nil {
		return nil, nil, err
	}
	logf, err := os.OpenFile(filepath.Join(m.dir, qemuLog), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, nil, err
	}
	defer logf.Close()
	cmd := exec.Command(m.cfg.QEMU, args...)
	cmd.Dir = m.dir // socket names may be relative to it (SocketPath)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	// The taps become QEMU's fds 3, 4, ... (Machine.Args).
	cmd.ExtraFiles = m.taps
	err = fdutil.WithInheritedHidden(cmd.Start)
	if err != nil {
		return nil, nil, fmt.Errorf("start %s: %w", m.cfg.QEMU, err)
	}
	os.WriteFile(filepath.Join(m.dir, qemuPidFile), []byte(strconv.Itoa(cmd.Process.Pid)), 0o600)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	return cmd, done, nil
}

// boot waits for the guest to say hello, sends it the configuration and
// waits until the container's root is set up.
//
// A kiwi-sharefs that dies meanwhile (sfsDone; nil without virtio-fs)
// ends the boot at once: without its file server the guest would wait
// on its root until the boot timeout.
func (m *monitor) boot(l net.Listener, qemu, sfs *exec.Cmd, qemuDone, sfsDone, creatorGone <-chan struct{}, sigs <-chan os.Signal) (net.Conn, error) {
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
		return fmt.Errorf("the VM stopped during boot; guest console: %s", tail(m.cfg.Machine.ConsoleLog))
	}
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	var conn net.Conn
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
					case <-time.After(time.Second):
					}
				}
				return r.f, r.err
			case <-qemuDone:
				if err := m.qemuGone(qemu); err != nil {
					return vmproto.Frame{}, err
				}
				return vmproto.Frame{}, fmt.Errorf("the VM stopped during boot; guest console: %s", tail(m.cfg.Machine.ConsoleLog))
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
	f, err := read(m.cfg.BootTimeout)
	if err != nil {
		conn.Close()
		return nil, err
	}
	var hello vmproto.Hello
	if f.Type != vmproto.THello || vmproto.Decode(f.Payload, &hello) != nil || hello.Version != vmproto.Version {
		conn.Close()
		return nil, fmt.Errorf("guest init speaks another protocol (frame %d %q): rebuild the initramfs", f.Type, f.Payload)
	}
	m.log.Debug("guest up", "id", m.cfg.ID, "kernel", hello.Kernel)
	m.guest = vmproto.NewWriter(conn)
	if err := m.guest.WriteJSON(vmproto.TConfig, 0, m.cfg.Guest); err != nil {
		conn.Close()
		return nil, fmt.Errorf("send guest config: %w", err)
	}
	f, err = read(m.cfg.BootTimeout)
	if err != nil {
		conn.Close()
		return nil, err
	}
	switch f.Type {
	case vmproto.TReady:
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
			return fmt.Errorf("QEMU was killed by %s during the boot (by the host: not the guest)", unix.SignalName(ws.Signal()))
		}
	}
	return nil
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

func (m *monitor) setExit(status int, fromGuest bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.exitSeen && !fromGuest {
		return
	}
	m.exit, m.exitSeen = status, true
}

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
		if err := m.guest.Write(vmproto.TStart, 0, nil); err != nil {
			w.WriteJSON(vmproto.TError, 0, vmproto.Error{Message: err.Error()})
			return
		}
		go m.guest.Pump(vmproto.TStdin, 0, m.in)
		// As with runc, start returns once the process exists, so that
		// a signal sent right after it reaches the process.
		select {
		case <-m.started:
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

// acceptQMP takes QEMU's connection to the QMP socket, which it makes at
// start, and negotiates; pause and resume need it.
func (m *monitor) acceptQMP(l net.Listener) {
	c, err := l.Accept()
	var q *qmp
	if err == nil {
		q, err = newQMP(c, qmpTimeout)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
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

// killQEMU kills QEMU; Run sees it end.
func (m *monitor) killQEMU() {
	m.mu.Lock()
	p := m.qemu
	m.mu.Unlock()
	if p != nil {
		p.Kill()
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

const (
	shareFSLog     = "sharefs.log"
	shareFSExports = "sharefs.json"
	shareFSPidFile = "sharefs.pid"
)

// startShareFS starts kiwi-sharefs for the VM's virtio-fs exports, as a
// child that dies with the monitor, and waits until its sockets listen.
// Without exports it returns a nil command and a channel that never
// closes.
func (m *monitor) startShareFS() (*exec.Cmd, <-chan struct{}, error) {
	sf := m.cfg.ShareFS
	if sf == nil || len(sf.Exports) == 0 {
		return nil, nil, nil
	}
	b, err := json.Marshal(sf.Exports)
	if err != nil {
		return nil, nil, err
	}
	exports := filepath.Join(m.dir, shareFSExports)
	if err := os.WriteFile(exports, b, 0o600); err != nil {
		return nil, nil, err
	}
	readyR, readyW, err := os.Pipe()
	if err != nil {
		return nil, nil, err
	}
	defer readyR.Close()
	logPath := filepath.Join(m.dir, shareFSLog)
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, nil, err
	}
	defer logf.Close()
	args := []string{"--log", logPath}
	if sf.Debug {
		args = append(args, "--trace")
	}
	args = append(args, "serve", "--exports", exports, "--ready-fd", "3")
	cmd := exec.Command(sf.Binary, args...)
	cmd.Dir = m.dir // socket names may be relative to it (SocketPath)
	// Its last words (an error exit) go to the log as well.
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{readyW}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	err = fdutil.WithInheritedHidden(cmd.Start)
	readyW.Close()
	if err != nil {
		return nil, nil, fmt.Errorf("start %s: %w", sf.Binary, err)
	}
	os.WriteFile(filepath.Join(m.dir, shareFSPidFile), []byte(strconv.Itoa(cmd.Process.Pid)), 0o600)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(readyR).ReadString('\n')
		line <- s
	}()
	select {
	case s := <-line:
		if s == "ready\n" {
			return cmd, done, nil
		}
	case <-time.After(30 * time.Second):
	}
	cmd.Process.Kill()
	<-done
	return nil, nil, fmt.Errorf("kiwi-sharefs did not start: %s", tail(logPath))
}

// stopShareFS waits for kiwi-sharefs, which exits once QEMU closed its
// connections, and kills it if it does not.
func (m *monitor) stopShareFS(cmd *exec.Cmd, done <-chan struct{}) {
	if cmd == nil {
		return
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		m.log.Warn("kiwi-sharefs still running after QEMU ended: killing it", "id", m.cfg.ID)
		cmd.Process.Kill()
		<-done
	}
}
