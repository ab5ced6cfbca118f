package containermode

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/devcgroup"
	"github.com/kiwi-shim/kiwi-shim/pkg/loopdev"
)

// A keeper is a small process that holds a container's loop lease for
// exactly as long as the container's init process lives. It is a process
// of its own because `create` returns long before the container ends, and
// a lease must be held by a live process (see pkg/loopdev). When the
// container's init exits, or the keeper is told to stop, it detaches the
// devices and releases them; if the keeper itself is killed, the lease
// goes stale and the next allocator call cleans it.
//
// The keeper talks to `create` over its stdin and stdout, one line each:
//
//	keeper -> create: "ok /dev/loopA /dev/loopB" | "error MESSAGE"
//	create -> keeper: "pid N" (the container's init) | EOF (create failed)

// KeepOptions configure Keep.
type KeepOptions struct {
	// Lease leases the devices: the allocator's Acquire for a lease of
	// the box's own, or the adoption of a Kubernetes allocation
	// (deviceplugin.Adopt). It bounds its own wait.
	Lease func(context.Context) (*loopdev.Lease, error)
	// Owner names the holder (the container id) in logs.
	Owner string
	// SyncPartitions mirrors the devices' partition nodes into the
	// container's /dev (container mode); a VM-mode box only holds the
	// lease, its guest has loop devices of its own.
	SyncPartitions bool
	// Devices says where the container's device cgroup is described
	// (runc's state on cgroup v2), for the partition sync.
	Devices devcgroup.Options
	// Log receives progress and errors.
	Log *slog.Logger
}

// Keep runs the keeper side: it leases the devices, reports them on out,
// waits for the container's pid on in, then holds the lease until that
// process exits or ctx is cancelled (SIGTERM from delete).
func Keep(ctx context.Context, o KeepOptions, in io.Reader, out io.Writer) error {
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	pids := make(chan int, 1)
	go func() {
		// EOF before a pid means create gave up (or died): stop waiting
		// and release.
		line, err := bufio.NewReader(io.LimitReader(in, 64)).ReadString('\n')
		if f, ok := strings.CutPrefix(strings.TrimSpace(line), "pid "); ok && err == nil {
			if pid, err := strconv.Atoi(f); err == nil && pid > 0 {
				pids <- pid
				return
			}
		}
		cancel()
	}()
	lease, err := o.Lease(ctx)
	if err != nil {
		fmt.Fprintf(out, "error %s\n", strings.ReplaceAll(err.Error(), "\n", " "))
		return err
	}
	defer func() {
		if err := lease.Release(); err != nil {
			log.Error("release loop devices", "owner", o.Owner, "err", err)
		}
	}()
	paths := make([]string, len(lease.Devices()))
	for i, d := range lease.Devices() {
		paths[i] = d.Path()
	}
	if _, err := fmt.Fprintf(out, "ok %s\n", strings.Join(paths, " ")); err != nil {
		return fmt.Errorf("report devices: %w", err)
	}
	var pid int
	select {
	case pid = <-pids:
	case <-ctx.Done():
		return nil
	}
	log.Debug("holding loop devices", "owner", o.Owner, "pid", pid, "devices", paths)
	pctx, stopSync := context.WithCancel(ctx)
	synced := make(chan struct{})
	go func() {
		defer close(synced)
		if o.SyncPartitions {
			newPartitionSync(pid, lease.Devices(), o.Devices, log).run(pctx)
		}
	}()
	err = waitExit(ctx, pid)
	stopSync()
	<-synced
	return err
}

// waitExit waits until process pid exits or ctx is done. pidfd_open works
// for processes that are not our children, and unlike polling kill(pid, 0)
// it cannot be fooled by a recycled pid.
func waitExit(ctx context.Context, pid int) error {
	fd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("watch container process %d: %w", pid, err)
	}
	defer unix.Close(fd)
	for ctx.Err() == nil {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, 200)
		if err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("watch container process %d: %w", pid, err)
		}
		if n > 0 {
			return nil
		}
	}
	return nil
}

// KeeperHandle is the create side of a keeper.
type KeeperHandle struct {
	cmd     *exec.Cmd
	in      io.WriteCloser
	Devices []string
}

// StartKeeper starts a keeper process (cmd must run Keep with its stdin
// and stdout) and waits for its answer: the leased devices or an error.
// The keeper runs in a session of its own so that terminal signals meant
// for the caller do not reach it, and with no stdio of the caller's, so
// that it never holds conmon's pipes open.
func StartKeeper(cmd *exec.Cmd) (*KeeperHandle, error) {
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	outR, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = nil
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start loop keeper: %w", err)
	}
	h := &KeeperHandle{cmd: cmd, in: in}
	line, err := bufio.NewReader(io.LimitReader(outR, 64<<10)).ReadString('\n')
	line = strings.TrimSpace(line)
	if rest, ok := strings.CutPrefix(line, "ok "); ok {
		h.Devices = strings.Fields(rest)
		return h, nil
	}
	h.Abort()
	if msg, ok := strings.CutPrefix(line, "error "); ok {
		return nil, errors.New(msg)
	}
	return nil, fmt.Errorf("loop keeper failed: %v", err)
}

// Pid is the keeper's process id.
func (h *KeeperHandle) Pid() int { return h.cmd.Process.Pid }

// Hold hands the keeper the container's init pid and lets it go on alone.
func (h *KeeperHandle) Hold(pid int) error {
	_, err := fmt.Fprintf(h.in, "pid %d\n", pid)
	h.in.Close()
	h.cmd.Process.Release()
	if err != nil {
		return fmt.Errorf("hand container to loop keeper: %w", err)
	}
	return nil
}

// Abort tells the keeper to release the lease and waits for it to exit.
func (h *KeeperHandle) Abort() {
	h.in.Close()
	done := make(chan struct{})
	go func() { h.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		h.cmd.Process.Kill()
		<-done
	}
}

// StopKeeper stops the keeper of a deleted container and waits for it to
// release the lease. It checks that pid still is a keeper for owner
// before signalling, so a recycled pid is never hit.
func StopKeeper(pid int, owner string) {
	if pid <= 0 || !isKeeper(pid, owner) {
		return
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	_ = unix.PidfdSendSignal(fd, unix.SIGTERM, nil, 0)
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	if n, _ := unix.Poll(fds, 10000); n == 0 {
		_ = unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
	}
}

func isKeeper(pid int, owner string) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	args := strings.Split(string(b), "\x00")
	hasCmd, hasOwner := false, false
	for i, a := range args {
		if a == KeeperCommand {
			hasCmd = true
		}
		if a == "--owner" && i+1 < len(args) && args[i+1] == owner {
			hasOwner = true
		}
	}
	return hasCmd && hasOwner
}

// KeeperCommand is the hidden kiwi-shim command that runs Keep.
const KeeperCommand = "loop-keeper"
