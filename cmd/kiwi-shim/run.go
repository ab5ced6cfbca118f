package main

import (
	"errors"
	"fmt"
	"os"
	"os/signal"

	"github.com/urfave/cli"
	"golang.org/x/sys/unix"
)

var runCommand = cli.Command{
	Name:      "run",
	Usage:     "create and start a container, and wait for it unless --detach",
	ArgsUsage: "<container-id>",
	Flags: append(append([]cli.Flag{}, createFlags...),
		cli.BoolFlag{Name: "detach, d", Usage: "return once the container started"},
		cli.BoolFlag{Name: "keep", Usage: "do not delete the container after it exits"},
	),
	Action: withEnv(func(ctx *cli.Context, e *env) error {
		id, err := idArg(ctx)
		if err != nil {
			return err
		}
		detach := ctx.Bool("detach")
		if !detach {
			// The container's init is made by the low-level runtime and
			// re-parented to us on its exit, so that we can wait for it.
			if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
				return fmt.Errorf("run: become subreaper: %w", err)
			}
		}
		if err := createContainer(ctx, e, id); err != nil {
			return err
		}
		c, err := e.load(ctx, id)
		if err != nil {
			return err
		}
		if err := c.Start(); err != nil {
			c.Delete(true)
			return err
		}
		if detach {
			return nil
		}
		sigs := make(chan os.Signal, 16)
		signal.Notify(sigs, unix.SIGINT, unix.SIGTERM, unix.SIGHUP, unix.SIGQUIT, unix.SIGUSR1, unix.SIGUSR2, unix.SIGWINCH)
		go func() {
			for s := range sigs {
				c.Signal(s.(unix.Signal), false)
			}
		}()
		status := waitFor(c.Record().Pid)
		signal.Stop(sigs)
		if !ctx.Bool("keep") {
			if err := c.Delete(true); err != nil {
				e.log.Error("delete after run", "id", id, "err", err)
			}
		}
		return exitError{code: status}
	}),
}

// waitFor reaps children until pid exits and returns its shell-style
// status; other children (re-parented orphans) are reaped on the way.
func waitFor(pid int) int {
	for {
		var ws unix.WaitStatus
		got, err := unix.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return 255
		}
		if got != pid {
			continue
		}
		if ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return ws.ExitStatus()
	}
}
