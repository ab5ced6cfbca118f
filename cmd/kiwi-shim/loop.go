package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/loopdev"
)

// exitTempFail is EX_TEMPFAIL from sysexits.h: no device came in time.
const exitTempFail = 75

var loopCommand = cli.Command{
	Name:  "loop",
	Usage: "inspect and lease the host's loop devices",
	Subcommands: []cli.Command{
		{
			Name:   "status",
			Usage:  "show capacity, leased devices and waiting requests",
			Flags:  []cli.Flag{cli.StringFlag{Name: "format, f", Value: "table", Usage: "table or json"}},
			Action: withEnv(loopStatus),
		},
		{
			Name:      "acquire",
			Usage:     "run a command holding leased loop devices",
			ArgsUsage: "-- CMD [ARGS...]",
			Description: `Waits for --count free loop devices, first come first served among all
   kiwi-shim users of this host, then runs CMD with KIWI_LOOP_DEVICES set to
   the device paths. The devices are detached and released when CMD ends,
   however it ends; kiwi-shim exits with CMD's status (128+N for signal N),
   or 75 when --timeout passed without devices.`,
			Flags: []cli.Flag{
				cli.IntFlag{Name: "count, n", Value: 1, Usage: "number of devices"},
				cli.StringFlag{Name: "owner", Usage: "name shown in loop status (default: CMD)"},
				cli.DurationFlag{Name: "timeout", Usage: "give up after this long (default: wait)"},
				cli.BoolFlag{Name: "no-wait", Usage: "fail at once instead of queueing"},
			},
			SkipArgReorder: true,
			Action:         withEnv(loopAcquire),
		},
	},
}

func (e *env) allocator() (*loopdev.Allocator, error) {
	return loopdev.New(loopdev.Options{
		Dir:      e.cfg.Loop.Dir,
		Capacity: e.cfg.Loop.Capacity,
		Logger:   e.log,
	})
}

func loopStatus(ctx *cli.Context, e *env) error {
	format := ctx.String("format")
	if format != "table" && format != "json" {
		return fmt.Errorf("--format %q: want table or json", format)
	}
	a, err := e.allocator()
	if err != nil {
		return err
	}
	st, err := a.Status()
	if err != nil {
		return err
	}
	if format == "json" {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	fmt.Printf("capacity: %d  leased: %d  waiting: %d\n", st.Capacity, len(st.Held), st.Waiting)
	if len(st.Held) == 0 {
		return nil
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "DEVICE\tOWNER\tPID\tSINCE\tBACKING")
	for _, h := range st.Held {
		owner := h.Owner
		if h.Stale {
			owner += " (stale)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", h.Device, owner, h.PID, h.Since.Local().Format(time.RFC3339), h.Backing)
	}
	return tw.Flush()
}

func loopAcquire(ctx *cli.Context, e *env) error {
	args := []string(ctx.Args())
	if len(args) > 0 && args[0] == "--" {
		args = args[1:]
	}
	if len(args) == 0 {
		return errors.New("loop acquire: no command given (usage: kiwi-shim loop acquire --count N -- CMD [ARGS...])")
	}
	owner := ctx.String("owner")
	if owner == "" {
		owner = strings.Join(args, " ")
		if len(owner) > 64 {
			owner = owner[:64]
		}
	}
	a, err := e.allocator()
	if err != nil {
		return err
	}

	// Signals that arrive while waiting cancel the wait; later ones are
	// forwarded to CMD.
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT)
	defer signal.Stop(sigs)
	wctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if t := ctx.Duration("timeout"); t > 0 {
		wctx, cancel = context.WithTimeout(wctx, t)
		defer cancel()
	}
	go func() {
		select {
		case <-sigs:
			cancel()
		case <-wctx.Done():
		}
	}()

	lease, err := a.Acquire(wctx, loopdev.Request{Owner: owner, Count: ctx.Int("count"), Wait: !ctx.Bool("no-wait")})
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, loopdev.ErrBusy) {
			return codedError{code: exitTempFail, err: fmt.Errorf("no %d free loop device(s) in time: %w", ctx.Int("count"), err)}
		}
		return err
	}
	cancel()
	status, runErr := runHolding(lease, args, sigs)
	if err := lease.Release(); err != nil {
		// The lease stays accounted as stale and is cleaned by the next
		// allocator call; CMD's own status still matters most.
		e.log.Error("release loop devices", "err", err)
		if runErr == nil && status == 0 {
			runErr = err
		}
	}
	if runErr != nil {
		return runErr
	}
	return exitError{code: status}
}

// runHolding runs args while lease is held and returns its exit status.
func runHolding(lease *loopdev.Lease, args []string, sigs <-chan os.Signal) (int, error) {
	paths := make([]string, 0, len(lease.Devices()))
	for _, d := range lease.Devices() {
		paths = append(paths, d.Path())
	}
	// Pdeathsig belongs to the thread that forks: keep this goroutine on
	// it so that CMD dies with us even if we are killed with SIGKILL.
	runtime.LockOSThread()
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = append(os.Environ(), "KIWI_LOOP_DEVICES="+strings.Join(paths, " "))
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	// CMD inherits the locked lease files, so the lease stays held for as
	// long as CMD or anything it started with them lives, even if we die.
	cmd.ExtraFiles = lease.Files()
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("loop acquire: %w", err)
	}
	done := make(chan struct{})
	go func() {
		for {
			select {
			case s := <-sigs:
				_ = cmd.Process.Signal(s)
			case <-done:
				return
			}
		}
	}()
	err := cmd.Wait()
	close(done)
	return exitStatus(cmd.ProcessState, err)
}

// exitStatus turns a finished process into a shell-style status.
func exitStatus(ps *os.ProcessState, err error) (int, error) {
	if ps == nil {
		return 0, err
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal()), nil
	}
	return ps.ExitCode(), nil
}
