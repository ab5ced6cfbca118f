// Package hooks runs OCI lifecycle hooks (runtime-spec config.md, "POSIX
// platform hooks") on the host: each hook's path is executed with its
// args (args[0] is argv[0]) and env, the container's state JSON on its
// standard input, and is killed when its timeout passes. Hooks of a stage
// run in order; the first that fails stops the stage and its error says
// which hook it was, how it ended and what it wrote to stderr.
package hooks

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// Stages kiwi-shim knows, in the order of a container's life.
const (
	Prestart        = "prestart"
	CreateRuntime   = "createRuntime"
	CreateContainer = "createContainer"
	StartContainer  = "startContainer"
	Poststart       = "poststart"
	Poststop        = "poststop"
)

// maxOutput bounds how much of a failing hook's output goes into its
// error.
const maxOutput = 4096

// Of returns the hooks of stage in h (nil for none).
func Of(h *specs.Hooks, stage string) []specs.Hook {
	if h == nil {
		return nil
	}
	switch stage {
	case Prestart:
		//lint:ignore SA1019 deprecated, but podman and nerdctl still use it
		return h.Prestart
	case CreateRuntime:
		return h.CreateRuntime
	case CreateContainer:
		return h.CreateContainer
	case StartContainer:
		return h.StartContainer
	case Poststart:
		return h.Poststart
	case Poststop:
		return h.Poststop
	}
	return nil
}

// Run runs the hooks of one stage in order with st on their standard
// input, and returns the first failure.
func Run(ctx context.Context, stage string, hs []specs.Hook, st specs.State) error {
	if len(hs) == 0 {
		return nil
	}
	in, err := json.Marshal(st)
	if err != nil {
		return fmt.Errorf("%s hook: state: %w", stage, err)
	}
	for i, h := range hs {
		if err := runOne(ctx, h, in); err != nil {
			return fmt.Errorf("%s hook #%d (%s): %w", stage, i, h.Path, err)
		}
	}
	return nil
}

func runOne(ctx context.Context, h specs.Hook, state []byte) error {
	if h.Path == "" {
		return errors.New("no path")
	}
	if h.Timeout != nil && *h.Timeout <= 0 {
		return fmt.Errorf("timeout %d: must be positive", *h.Timeout)
	}
	args := h.Args
	if len(args) == 0 {
		args = []string{h.Path}
	}
	var stdout, stderr bytes.Buffer
	cmd := &exec.Cmd{
		Path: h.Path, Args: args,
		// As runc: a hook without env inherits the runtime's.
		Env:    h.Env,
		Stdin:  bytes.NewReader(state),
		Stdout: &stdout, Stderr: &stderr,
		// Its own process group, so that a timeout kills what it
		// started too.
		SysProcAttr: &syscall.SysProcAttr{Setpgid: true},
		// A child that keeps the output pipes open does not hold us
		// once the hook itself is gone.
		WaitDelay: 2 * time.Second,
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var timeout <-chan time.Time
	if h.Timeout != nil {
		t := time.NewTimer(time.Duration(*h.Timeout) * time.Second)
		defer t.Stop()
		timeout = t.C
	}
	var err error
	select {
	case err = <-done:
	case <-timeout:
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		return fmt.Errorf("killed after its timeout of %ds%s", *h.Timeout, output(&stdout, &stderr))
	case <-ctx.Done():
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		return fmt.Errorf("killed: %w%s", ctx.Err(), output(&stdout, &stderr))
	}
	if err != nil {
		return fmt.Errorf("%w%s", err, output(&stdout, &stderr))
	}
	return nil
}

// output is what a failed hook wrote, for its error.
func output(stdout, stderr *bytes.Buffer) string {
	var s string
	if e := strings.TrimSpace(stderr.String()); e != "" {
		s += ", stderr: " + clip(e)
	}
	if o := strings.TrimSpace(stdout.String()); o != "" {
		s += ", stdout: " + clip(o)
	}
	return s
}

func clip(s string) string {
	if len(s) > maxOutput {
		return s[:maxOutput] + "..."
	}
	return s
}
