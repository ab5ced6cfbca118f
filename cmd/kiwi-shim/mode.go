package main

import (
	"context"
	"errors"
	"strconv"

	"github.com/urfave/cli"
	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/containermode"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmmode"
)

// container is one existing container as the commands see it, in either
// mode: a VM (package vmmode) or runc with leased loop devices (package
// containermode). open picks the mode once, from the record.
type container interface {
	// Record is the container's record.
	Record() *state.Container
	// State answers `state`.
	State() (*state.OCI, error)
	// Start starts the created container's process.
	Start() error
	// Signal delivers sig to the container's process, or with all to
	// every process of the container.
	Signal(sig unix.Signal, all bool) error
	// Delete removes the container and everything it holds; without
	// force a running container is an error.
	Delete(force bool) error
	// Exec, Ps, Pause, Resume and Update are the commands of those
	// names, which container mode passes to runc with their arguments
	// untouched.
	Exec(ctx *cli.Context) error
	Ps(ctx *cli.Context) error
	Pause(ctx *cli.Context) error
	Resume(ctx *cli.Context) error
	Update(ctx *cli.Context) error
}

// open returns the container of the record rec in its mode.
func (e *env) open(ctx *cli.Context, rec *state.Container) (container, error) {
	if rec.Mode == config.ModeVM {
		return &vmContainer{m: e.vmManager(ctx), rec: rec}, nil
	}
	m, err := e.manager(ctx)
	if err != nil {
		return nil, err
	}
	return &runcContainer{m: m, rec: rec}, nil
}

// vmContainer is a VM-mode container.
type vmContainer struct {
	m   *vmmode.Manager
	rec *state.Container
}

var _ container = (*vmContainer)(nil)

func (c *vmContainer) Record() *state.Container { return c.rec }

func (c *vmContainer) State() (*state.OCI, error) { return c.m.State(context.Background(), c.rec) }

func (c *vmContainer) Start() error { return c.m.Start(context.Background(), c.rec) }

func (c *vmContainer) Signal(sig unix.Signal, all bool) error {
	return c.m.Signal(context.Background(), c.rec, int(sig), all)
}

func (c *vmContainer) Delete(force bool) error { return c.m.Delete(context.Background(), c.rec, force) }

// Exec runs the process in the guest through a host relay (see
// vmmode.Manager.Exec) and exits with its status.
func (c *vmContainer) Exec(ctx *cli.Context) error {
	if err := vmmode.CheckPreserveFds(ctx.Int("preserve-fds")); err != nil {
		return err
	}
	p, err := execProcess(ctx, c.rec)
	if err != nil {
		return err
	}
	detach := ctx.Bool("detach")
	status, err := c.m.Exec(context.Background(), c.rec, vmmode.ExecOptions{
		Process: p, ConsoleSocket: ctx.String("console-socket"), Detach: detach, PidFile: ctx.String("pid-file"),
	})
	var se *vmmode.StartError
	if errors.As(err, &se) {
		return codedError{code: 255, err: err} // runc's status for it
	}
	if err != nil || detach {
		return err
	}
	return exitError{code: status}
}

// Ps lists the host processes of the box: its monitor and QEMU.
func (c *vmContainer) Ps(ctx *cli.Context) error { return printPids(ctx, c.m.Pids(c.rec)) }

// Pause stops the VM's vCPUs (QEMU's QMP stop, from the monitor).
func (c *vmContainer) Pause(*cli.Context) error { return c.m.Pause(context.Background(), c.rec) }

// Resume continues the VM's vCPUs (QEMU's QMP cont).
func (c *vmContainer) Resume(*cli.Context) error { return c.m.Resume(context.Background(), c.rec) }

// Update writes the request's CPU controls to the box's cgroup (see
// vmmode.Manager.Update).
func (c *vmContainer) Update(ctx *cli.Context) error {
	req, err := updateRequest(ctx)
	if err != nil {
		return err
	}
	return c.m.Update(context.Background(), c.rec, req)
}

// runcContainer is a container-mode container.
type runcContainer struct {
	m   *containermode.Manager
	rec *state.Container
}

var _ container = (*runcContainer)(nil)

func (c *runcContainer) Record() *state.Container { return c.rec }

func (c *runcContainer) State() (*state.OCI, error) { return c.m.State(context.Background(), c.rec) }

func (c *runcContainer) Start() error {
	return c.m.Runtime.Run(context.Background(), "start", c.rec.ID)
}

func (c *runcContainer) Signal(sig unix.Signal, all bool) error {
	args := []string{"kill"}
	if all {
		args = append(args, "--all")
	}
	return c.m.Runtime.Run(context.Background(), append(args, c.rec.ID, strconv.Itoa(int(sig)))...)
}

func (c *runcContainer) Delete(force bool) error {
	return c.m.Delete(context.Background(), c.rec, force)
}

// Exec hands exec to runc, with KIWI's capabilities added to the
// process of a box (not of a pod sandbox).
func (c *runcContainer) Exec(*cli.Context) (err error) {
	args := rawArgs("exec")
	if !oci.IsPodSandbox(c.rec.Annotations) {
		var cleanup func()
		args, cleanup, err = withKiwiCapabilities(args, c.m.Store.Dir(c.rec.ID))
		if err != nil {
			return err
		}
		defer cleanup()
	}
	return c.m.Runtime.Run(context.Background(), append([]string{"exec"}, args...)...)
}

func (c *runcContainer) Ps(*cli.Context) error     { return c.passthrough("ps") }
func (c *runcContainer) Pause(*cli.Context) error  { return c.passthrough("pause") }
func (c *runcContainer) Resume(*cli.Context) error { return c.passthrough("resume") }
func (c *runcContainer) Update(*cli.Context) error { return c.passthrough("update") }

// passthrough hands the command name to runc with its arguments untouched.
func (c *runcContainer) passthrough(name string) error {
	return c.m.Runtime.Run(context.Background(), append([]string{name}, rawArgs(name)...)...)
}
