package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// guest runs the container's processes for the host.
type guest struct {
	ctl *os.File
	w   *vmproto.Writer

	// userNS, when set, is the user namespace every process gets.
	userNS *vmproto.UserNS
	// pidNS puts the first process in a PID namespace of its own, and
	// in a mount namespace of its own where that namespace's /proc
	// replaces the guest's (nsFlags says which); nsFD, a pidfd of that
	// process once it runs (else -1), is how exec'd processes join them.
	// procPaths are the masked and read-only paths under /proc, made
	// again on the namespace's own /proc.
	pidNS     bool
	nsFD      int
	nsFlags   int
	procPaths procPaths

	mu    sync.Mutex
	procs map[uint32]*proc // by stream
	byPid map[int]*proc
	done  chan struct{} // closed when stream 0 has exited
}

// proc is one process the host asked for.
type proc struct {
	stream uint32
	pid    int
	stdin  *os.File // pipe write end, or the pty master
	pty    *os.File // the pty master when the process has a terminal
	relays sync.WaitGroup
}

func newGuest(ctl *os.File) *guest {
	return &guest{ctl: ctl, w: vmproto.NewWriter(ctl), procs: map[uint32]*proc{}, byPid: map[int]*proc{}, done: make(chan struct{}), nsFD: -1}
}

// serve handles the host's requests until the container's first process
// has ended or the host asks for poweroff.
func (g *guest) serve(cfg *vmproto.Config) error {
	g.userNS = cfg.UserNS
	g.pidNS = cfg.PidNS
	g.procPaths = procPathsOf(cfg)
	sigs := make(chan os.Signal, 64)
	signal.Notify(sigs, unix.SIGCHLD)
	go func() {
		tick := time.NewTicker(time.Second) // covers coalesced SIGCHLDs
		for {
			select {
			case <-sigs:
			case <-tick.C:
			}
			g.reap()
		}
	}()
	frames := make(chan vmproto.Frame)
	readErr := make(chan error, 1)
	go func() {
		for {
			f, err := vmproto.ReadFrame(g.ctl)
			if err != nil {
				readErr <- err
				return
			}
			frames <- f
		}
	}()
	for {
		select {
		case <-g.done:
			return g.shutdown()
		case err := <-readErr:
			// The host went away: nothing left to run for.
			g.shutdown()
			return fmt.Errorf("control channel: %w", err)
		case f := <-frames:
			if stop := g.handle(f, cfg); stop {
				return g.shutdown()
			}
		}
	}
}

func (g *guest) handle(f vmproto.Frame, cfg *vmproto.Config) (stop bool) {
	switch f.Type {
	case vmproto.TStart:
		g.spawn(0, cfg.Process)
	case vmproto.TExec:
		var p vmproto.Process
		if err := vmproto.Decode(f.Payload, &p); err != nil || f.Stream == 0 {
			g.w.WriteJSON(vmproto.TError, f.Stream, vmproto.Error{Message: fmt.Sprintf("bad exec request: %v", err)})
			return false
		}
		g.spawn(f.Stream, p)
	case vmproto.TStdin:
		g.mu.Lock()
		p := g.procs[f.Stream]
		g.mu.Unlock()
		if p == nil || p.stdin == nil {
			return false
		}
		if len(f.Payload) == 0 {
			if p.pty != nil {
				// A terminal has no EOF of its own: send ^D.
				p.stdin.Write([]byte{4})
			} else {
				p.stdin.Close()
				p.stdin = nil
			}
			return false
		}
		p.stdin.Write(f.Payload)
	case vmproto.TSignal:
		var s vmproto.Signal
		if err := vmproto.Decode(f.Payload, &s); err != nil || s.Signal <= 0 || s.Signal > 64 {
			return false
		}
		g.signal(f.Stream, unix.Signal(s.Signal), s.All)
	case vmproto.TResize:
		var r vmproto.Resize
		if vmproto.Decode(f.Payload, &r) != nil {
			return false
		}
		g.mu.Lock()
		p := g.procs[f.Stream]
		g.mu.Unlock()
		if p != nil && p.pty != nil {
			unix.IoctlSetWinsize(int(p.pty.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: r.Rows, Col: r.Cols})
		}
	case vmproto.TPoweroff:
		return true
	}
	return false
}

func (g *guest) signal(stream uint32, sig unix.Signal, all bool) {
	if all {
		// Everything but init: the whole container.
		unix.Kill(-1, sig)
		return
	}
	g.mu.Lock()
	p := g.procs[stream]
	g.mu.Unlock()
	if p != nil && p.pid > 0 {
		unix.Kill(p.pid, sig)
	}
}

// spawn starts a process and its stdio relays. An exec'd process whose
// program is missing or not executable is refused with an Error on its
// stream, in runc's words (exec: "foo": executable file not found in
// $PATH), then an Exit of 127 (126 when not executable), so that the
// host's exec fails as runc's does. A process that cannot be started
// otherwise, or the container's first one (its program was checked at
// create), ends at once with that status and the error on its stderr, as
// a shell would report it.
func (g *guest) spawn(stream uint32, p vmproto.Process) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, dup := g.procs[stream]; dup {
		g.w.WriteJSON(vmproto.TError, stream, vmproto.Error{Message: "stream in use"})
		return
	}
	if stream != 0 {
		// In the container's mount namespace: the program may be on a
		// file system the container mounted.
		if err := g.inContainer(stream, func() error { return checkProgram(p) }); err != nil {
			g.w.WriteJSON(vmproto.TError, stream, vmproto.Error{Message: err.Error()})
			g.w.WriteJSON(vmproto.TExit, stream, vmproto.Exit{Status: startStatus(err)})
			return
		}
	}
	pr := &proc{stream: stream}
	files, err := g.stdio(pr, p)
	if err == nil {
		err = g.start(pr, p, files)
	}
	for _, f := range files {
		f.Close() // the child has its copies
	}
	if err != nil {
		status := startStatus(err)
		g.w.Write(vmproto.TStderr, stream, []byte("kiwi-box-init: "+err.Error()+"\n"))
		g.w.Write(vmproto.TStdout, stream, nil)
		g.w.Write(vmproto.TStderr, stream, nil)
		g.w.WriteJSON(vmproto.TExit, stream, vmproto.Exit{Status: status})
		if stream == 0 {
			close(g.done)
		}
		return
	}
	g.procs[stream] = pr
	g.byPid[pr.pid] = pr
	g.w.WriteJSON(vmproto.TStarted, stream, vmproto.Started{Pid: pr.pid})
}

// stdio makes the child's stdin, stdout and stderr and starts the relays
// of our ends. It returns the child's ends.
func (g *guest) stdio(pr *proc, p vmproto.Process) ([]*os.File, error) {
	if p.Terminal {
		master, slave, err := openPty()
		if err != nil {
			return nil, err
		}
		// A 0x0 terminal confuses programs; the host sends the real size
		// as soon as it knows it.
		rows, cols := p.Rows, p.Cols
		if rows == 0 || cols == 0 {
			rows, cols = 24, 80
		}
		unix.IoctlSetWinsize(int(master.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: rows, Col: cols})
		pr.pty, pr.stdin = master, master
		g.relay(pr, master, vmproto.TStdout)
		g.w.Write(vmproto.TStderr, pr.stream, nil)
		return []*os.File{slave, slave, slave}, nil
	}
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	pr.stdin = inW
	g.relay(pr, outR, vmproto.TStdout)
	g.relay(pr, errR, vmproto.TStderr)
	return []*os.File{inR, outW, errW}, nil
}

// relay copies r to the host as frames of type t until EOF, then sends an
// empty frame.
func (g *guest) relay(pr *proc, r *os.File, t vmproto.Type) {
	pr.relays.Add(1)
	go func() {
		defer pr.relays.Done()
		g.w.Pump(t, pr.stream, r)
		if pr.pty == nil {
			r.Close() // the pty master is closed by finish
		}
	}()
}

func (g *guest) start(pr *proc, p vmproto.Process, files []*os.File) error {
	if len(p.Args) == 0 {
		return errors.New("no command given")
	}
	var path string
	err := g.inContainer(pr.stream, func() (err error) {
		path, err = lookPath(p.Args[0], p.Env)
		return err
	})
	if err != nil {
		return err
	}
	if p.Umask != nil {
		old := unix.Umask(int(*p.Umask))
		defer unix.Umask(old)
	}
	groups := make([]uint32, len(p.AdditionalGids))
	copy(groups, p.AdditionalGids)
	attr := &os.ProcAttr{
		Dir:   p.Cwd,
		Env:   p.Env,
		Files: files,
		Sys: &syscall.SysProcAttr{
			Setsid:  true,
			Setctty: p.Terminal,
			Ctty:    0,
		},
	}
	if ns := g.userNS; ns != nil {
		// Each process gets a namespace of its own with the container's
		// mappings (a multi-threaded init cannot setns into the first
		// one); the ids and what they may touch are the same.
		attr.Sys.Cloneflags = unix.CLONE_NEWUSER
		attr.Sys.UidMappings = idMaps(ns.UIDMappings)
		attr.Sys.GidMappings = idMaps(ns.GIDMappings)
		attr.Sys.GidMappingsEnableSetgroups = true
	}
	first := pr.stream == 0 && g.pidNS
	var remount *procPaths
	pidfd := -1
	if first {
		// The container's PID 1, as under runc: signals it has no
		// handler for do not reach it (SIGKILL does).
		g.nsFlags = unix.CLONE_NEWPID
		if g.userNS == nil && g.procPaths.mounted {
			// In a mount namespace of its own, the PID namespace's
			// /proc replaces the guest's. Not with a user namespace:
			// there the copied mounts would be locked, a masked /proc
			// is not fully visible (the kernel refuses a new proc mount
			// then), and shared mounts would become slaves; the
			// guest's /proc stays.
			g.nsFlags |= unix.CLONE_NEWNS
			remount = &g.procPaths
		}
		attr.Sys.Cloneflags |= uintptr(g.nsFlags)
		attr.Sys.PidFD = &pidfd
	}
	fork := func(name string, argv []string) (*os.Process, error) {
		var proc *os.Process
		err := g.inContainer(pr.stream, func() (err error) {
			proc, err = os.StartProcess(name, argv, attr)
			return err
		})
		return proc, err
	}
	defer func() {
		if pidfd >= 0 {
			g.nsFD = pidfd // kept for the container's lifetime
		}
	}()
	if p.Capabilities == nil && !p.NoNewPrivileges && p.OOMScoreAdj == nil && remount == nil {
		attr.Sys.Credential = &syscall.Credential{Uid: p.UID, Gid: p.GID, Groups: groups}
		proc, err := fork(path, p.Args)
		if err != nil {
			return err
		}
		pr.pid = proc.Pid
		proc.Release() // the reaper waits for it; os.Process must not
		return nil
	}
	// The helper (this binary again) limits the capabilities and
	// becomes the process; it reads what to do from a pipe at fd 3.
	hc, err := json.Marshal(helperConfig{
		Path: path, Args: p.Args, UID: p.UID, GID: p.GID, Groups: groups,
		Capabilities: p.Capabilities, NoNewPrivileges: p.NoNewPrivileges,
		Proc: remount,
	})
	if err != nil {
		return err
	}
	cfgR, cfgW, err := os.Pipe()
	if err != nil {
		return err
	}
	defer cfgR.Close()
	// The helper's copy of doneW closes when it executes the process (or
	// ends): until then it may be changing the container's mounts, and
	// an exec'd process must not join them half made.
	doneR, doneW, err := os.Pipe()
	if err != nil {
		return err
	}
	defer doneR.Close()
	attr.Files = append(append([]*os.File{}, files...), cfgR, doneW)
	if g.userNS != nil {
		// Root of the new namespace, so that the helper keeps its
		// capabilities across the exec; it becomes the user itself.
		attr.Sys.Credential = &syscall.Credential{}
	}
	// /proc/self/exe: this binary, wherever the container's root put it
	// (it lives in the initramfs, outside the container's root).
	proc, err := fork("/proc/self/exe", []string{execHelperName})
	doneW.Close()
	if err != nil {
		cfgW.Close()
		return fmt.Errorf("start %s (needs /proc in the container): %w", path, err)
	}
	if p.OOMScoreAdj != nil {
		// From here, while the helper waits for its config: lowering it
		// takes CAP_SYS_RESOURCE, which a user namespace cannot give.
		err := os.WriteFile(fmt.Sprintf("/proc/%d/oom_score_adj", proc.Pid), []byte(strconv.Itoa(*p.OOMScoreAdj)), 0o644)
		if err != nil {
			proc.Kill()
			cfgW.Close()
			proc.Release()
			return fmt.Errorf("oom_score_adj: %w", err)
		}
	}
	// Bounded by MaxPayload, as the frame it came in: fits the pipe or
	// is read at once by the helper.
	go func() { cfgW.Write(hc); cfgW.Close() }()
	// As runc's start: the process has been executed (or failed to be)
	// when this returns. Bounded, so that a helper stuck in a mount does
	// not stop the guest from serving.
	doneR.SetReadDeadline(time.Now().Add(execDoneTimeout))
	io.Copy(io.Discard, doneR)
	pr.pid = proc.Pid
	// The reaper waits for it; os.Process must not.
	proc.Release()
	return nil
}

// inContainer runs fn in the container's PID (and mount) namespaces when
// the first process has its own and stream is an exec'd process's: on a
// thread of its own that enters them (a thread that unshared its file
// system attributes may join a mount namespace, which a multi-threaded
// process as a whole may not), so that fn's file lookups resolve in the
// container's mounts and the processes fn forks are born in its PID
// namespace. The thread is never given back: it ends with fn.
func (g *guest) inContainer(stream uint32, fn func() error) error {
	if stream == 0 || g.nsFD < 0 {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // and never unlocked: the thread goes
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			errc <- fmt.Errorf("unshare file system attributes: %w", err)
			return
		}
		if err := unix.Setns(g.nsFD, g.nsFlags); err != nil {
			errc <- fmt.Errorf("join the container's namespaces: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// idMaps converts mappings for os.StartProcess.
func idMaps(ms []vmproto.IDMap) []syscall.SysProcIDMap {
	out := make([]syscall.SysProcIDMap, len(ms))
	for i, m := range ms {
		out[i] = syscall.SysProcIDMap{ContainerID: int(m.ContainerID), HostID: int(m.HostID), Size: int(m.Size)}
	}
	return out
}

// startStatus is the shell's status for a program that could not be
// started: 126 when it is not executable, else 127 (not found).
func startStatus(err error) int {
	if errors.Is(err, os.ErrPermission) {
		return 126
	}
	return 127
}

// errNotInPath is lookPath's error, in Go's and runc's words.
var errNotInPath = errors.New("executable file not found in $PATH")

// checkProgram checks that the process's program exists in the
// container's root (its mounts made) and can be executed: a regular file
// with an execute bit, as runc checks it before its exec. The errors are
// runc's: exec: "/etc": permission denied (wrapping os.ErrPermission),
// exec: "/x": stat /x: no such file or directory, exec: "foo":
// executable file not found in $PATH.
func checkProgram(p vmproto.Process) error {
	if len(p.Args) == 0 {
		return errors.New("no command given")
	}
	path, err := lookPath(p.Args[0], p.Env)
	if err != nil {
		return err
	}
	if !filepath.IsAbs(path) {
		path = filepath.Join("/", p.Cwd, path)
	}
	fi, err := os.Stat(path)
	switch {
	case err != nil:
		return fmt.Errorf("exec: %q: %w", p.Args[0], err)
	case !fi.Mode().IsRegular() || fi.Mode()&0o111 == 0:
		return fmt.Errorf("exec: %q: %w", p.Args[0], os.ErrPermission)
	}
	return nil
}

// lookPath finds a command in the container's PATH; a name with a slash
// is returned as it is.
func lookPath(name string, env []string) (string, error) {
	if strings.Contains(name, "/") {
		return name, nil
	}
	path := "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	for _, e := range env {
		if v, ok := strings.CutPrefix(e, "PATH="); ok {
			path = v
		}
	}
	for _, dir := range filepath.SplitList(path) {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("exec: %q: %w", name, errNotInPath)
}

// reap collects every exited child, as PID 1 must, and reports the ones
// the host started.
func (g *guest) reap() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
		g.mu.Lock()
		pr := g.byPid[pid]
		delete(g.byPid, pid)
		g.mu.Unlock()
		if pr == nil {
			continue // an orphan
		}
		status := ws.ExitStatus()
		if ws.Signaled() {
			status = 128 + int(ws.Signal())
		}
		go g.finish(pr, status)
	}
}

// finish reports a process's exit once its output is drained. Output held
// open by a background child of the process is not waited for long.
func (g *guest) finish(pr *proc, status int) {
	drained := make(chan struct{})
	go func() { pr.relays.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(2 * time.Second):
	}
	g.w.WriteJSON(vmproto.TExit, pr.stream, vmproto.Exit{Status: status})
	g.mu.Lock()
	delete(g.procs, pr.stream)
	if pr.stdin != nil {
		pr.stdin.Close()
	}
	g.mu.Unlock()
	if pr.stream == 0 {
		close(g.done)
	}
}

// shutdown ends every remaining process; the caller powers off.
func (g *guest) shutdown() error {
	unix.Kill(-1, unix.SIGKILL)
	time.Sleep(50 * time.Millisecond)
	g.reap()
	unix.Sync()
	return nil
}

// openPty opens a new pseudo-terminal pair in the container's devpts.
func openPty() (master, slave *os.File, err error) {
	ptmx := "/dev/pts/ptmx"
	if _, err := os.Stat(ptmx); err != nil {
		ptmx = "/dev/ptmx"
	}
	mfd, err := unix.Open(ptmx, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("open %s: %w", ptmx, err)
	}
	if err := unix.IoctlSetPointerInt(mfd, unix.TIOCSPTLCK, 0); err != nil {
		unix.Close(mfd)
		return nil, nil, fmt.Errorf("unlock pty: %w", err)
	}
	// TIOCGPTPEER opens the slave without a path lookup (kernel 4.13+).
	sfd, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(mfd), unix.TIOCGPTPEER, uintptr(unix.O_RDWR|unix.O_NOCTTY))
	if errno != 0 {
		unix.Close(mfd)
		return nil, nil, fmt.Errorf("open pty peer: %w", errno)
	}
	return os.NewFile(uintptr(mfd), "ptmx"), os.NewFile(sfd, "pts"), nil
}
