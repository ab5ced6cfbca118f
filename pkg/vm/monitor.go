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
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/hostcgroup"
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
	// Template, when set, is the template the box's guest is restored
	// from instead of a cold boot (see template.go); a failed restore is
	// logged and the box boots cold.
	Template *TemplateRef `json:"template,omitempty"`
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
	qemuStart   time.Time  // when QEMU was started (boot phases)
	phases      BootPhases // where the boot went, once the guest is ready
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
	defer func() { m.stopShareFS(sfs, sfsDone) }()
	// A stop (SIGTERM, SIGINT, SIGHUP to the monitor) at any moment of
	// the boot ends the box with the signal's status, as a kill does.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGINT, unix.SIGHUP)
	var (
		qemu     *exec.Cmd
		qemuDone <-chan struct{}
		r        *restored
	)
	if m.cfg.Template != nil {
		r, err = m.restore(gl, ql, creatorGone, sigs)
		switch {
		case err == nil:
			qemu, qemuDone = r.qemu, r.done
			m.log.Debug("guest restored from its template", "id", m.cfg.ID, "template", m.cfg.Template.Path, "ms", r.took.Milliseconds())
		case errors.Is(err, errAbandoned) || m.bootSignal() != 0 || killedFromOutside(err):
			// A QEMU killed from outside ends the box as in a cold
			// boot: only a restore that fails by itself (a template
			// QEMU cannot load, a QEMU that crashes) boots cold.
			if sfs != nil && (r == nil || !r.attached) {
				// No QEMU ever connected to it: it has nothing to
				// finish, and would wait for a connection.
				sfs.Process.Kill()
			}
			code, abandoned := fail(err)
			if sig := m.bootSignal(); sig != 0 {
				code = 128 + sig
			}
			return code, abandoned
		default:
			m.log.Warn("vm template not restored: booting the box cold", "id", m.cfg.ID, "template", m.cfg.Template.Path, "err", err)
			var bad *badTemplateError
			if errors.As(err, &bad) {
				if rerr := RemoveTemplate(*m.cfg.Template); rerr != nil {
					m.log.Warn("remove the template that failed", "id", m.cfg.ID, "template", m.cfg.Template.Path, "err", rerr)
				} else {
					m.log.Warn("removed the template that failed to load: the next box makes it again", "id", m.cfg.ID, "template", m.cfg.Template.Path)
				}
			}
			m.forgetQEMU()
			if r != nil && r.attached {
				// kiwi-sharefs ends with QEMU's connections: the cold
				// boot gets a new one.
				if sfs, sfsDone, err = m.restartShareFS(sfs, sfsDone); err != nil {
					return fail(err)
				}
			}
			r = nil
		}
	}
	var (
		conn    net.Conn
		crashed *guestCrashError // the cold boot's first crash, if any
		kept    string           // its console, kept
	)
	for {
		if r == nil {
			if qemu, qemuDone, err = m.startQEMU(); err != nil {
				return fail(err)
			}
			m.mu.Lock()
			m.qemu = qemu.Process
			stopped := m.bootStop != 0
			m.mu.Unlock()
			if stopped {
				qemu.Process.Kill() // killed before QEMU was there
			}
			go m.acceptQMP(ql, qemu.Process)
		}
		conn, err = m.boot(gl, r, qemu, sfs, qemuDone, sfsDone, creatorGone, sigs)
		if err == nil {
			break
		}
		qemu.Process.Kill()
		<-qemuDone
		// A stop that came meanwhile wins over a retry.
		select {
		case s := <-sigs:
			m.stopBoot(int(s.(syscall.Signal)))
		default:
		}
		// A guest kernel that crashes in a cold boot, before the
		// container's process started, is booted once more: nothing of
		// the container ran yet. Under TCG a guest kernel patching its
		// own code at boot (jump labels) now and then meets a vCPU still
		// running the old code (Oops: int3; once in 150 raw boots with
		// no modules, docs/troubleshooting.md); a second crash ends the
		// box.
		var crash *guestCrashError
		if r == nil && crashed == nil && errors.As(err, &crash) && m.bootSignal() == 0 {
			crashed, kept = crash, crash.console+".1"
			if rerr := os.Rename(crash.console, kept); rerr != nil {
				m.log.Warn("keep the crashed boot's console", "id", m.cfg.ID, "err", rerr)
				kept = crash.console
			}
			m.log.Warn("the guest kernel crashed before the container's process started: booting it again", "id", m.cfg.ID, "crash", crash.line, "console", kept)
			m.forgetQEMU()
			if sfs, sfsDone, err = m.restartShareFS(sfs, sfsDone); err != nil {
				return fail(fmt.Errorf("boot again after a guest kernel crash: %w", err))
			}
			continue
		}
		switch {
		case crashed != nil && errors.As(err, &crash):
			err = fmt.Errorf("%w; the first boot crashed too: %s (its console: %s)", err, crashed.line, kept)
		case crashed != nil:
			err = fmt.Errorf("%w; the first boot had crashed: %s (its console: %s)", err, crashed.line, kept)
		}
		if sfs != nil {
			// The container never started and its QEMU is gone:
			// kiwi-sharefs has nothing left to serve (it may never
			// have had a connection to end it).
			sfs.Process.Kill()
		}
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
		if crash := guestCrash(m.cfg.Machine.ConsoleLog); crash != "" {
			log.Error("the guest kernel crashed", "id", m.cfg.ID, "console", crash)
			fmt.Fprintf(m.err, "kiwi-shim: the VM's kernel crashed: %s (guest console: %s)\n", crash, m.cfg.Machine.ConsoleLog)
		}
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

func (m *monitor) setExit(status int, fromGuest bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.exitSeen && !fromGuest {
		return
	}
	m.exit, m.exitSeen = status, true
}
