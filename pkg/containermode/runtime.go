package containermode

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/kiwi-shim/kiwi-shim/pkg/state"
	"github.com/kiwi-shim/kiwi-shim/pkg/sysbin"
)

// Runtime is the low-level OCI runtime container mode delegates to, with
// the global flags every call carries.
type Runtime struct {
	// Path is the runtime binary.
	Path string
	// Root is its --root; kiwi-shim keeps it apart from its own records.
	Root string
	// Log and LogFormat are passed through so that the caller (podman,
	// containerd's runc shim) finds the runtime's errors where it looks.
	Log, LogFormat string
	// SystemdCgroup passes --systemd-cgroup.
	SystemdCgroup bool
	// Debug passes --debug.
	Debug bool
}

// FindRuntime resolves the configured runtime: a path, a name in PATH or
// the usual system directories, or "" for runc, else crun.
func FindRuntime(name string) (string, error) {
	if strings.Contains(name, "/") {
		if _, err := os.Stat(name); err != nil {
			return "", fmt.Errorf("container.runtime %s: %w", name, err)
		}
		return name, nil
	}
	names := []string{name}
	if name == "" {
		names = []string{"runc", "crun"}
	}
	for _, n := range names {
		if p, err := sysbin.Find(n); err == nil {
			return p, nil
		}
	}
	if name != "" {
		return "", fmt.Errorf("container.runtime %q not found: install it or set container.runtime in the config", name)
	}
	return "", errors.New("container mode needs runc or crun: install runc (apt-get install runc) or set container.runtime")
}

func (r Runtime) globalArgs() []string {
	args := []string{"--root", r.Root}
	if r.Log != "" {
		args = append(args, "--log", r.Log)
	}
	if r.LogFormat != "" {
		args = append(args, "--log-format", r.LogFormat)
	}
	if r.SystemdCgroup {
		args = append(args, "--systemd-cgroup")
	}
	if r.Debug {
		args = append(args, "--debug")
	}
	return args
}

// Command returns the runtime invocation for args, with the caller's
// stdio: the container's stdio travels through it unchanged.
func (r Runtime) Command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, r.Path, append(r.globalArgs(), args...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	return cmd
}

// Run runs the runtime with the caller's stdio. When it fails and logs to
// a file (engines pass --log), the error carries the runtime's own last
// error message: kiwi-shim's error is logged to the same file after it,
// and engines report only the last one.
func (r Runtime) Run(ctx context.Context, args ...string) error {
	cmd := r.Command(ctx, args...)
	var from int64
	if fi, err := os.Stat(r.Log); r.Log != "" && err == nil {
		from = fi.Size() // only what this run logs
	}
	if err := cmd.Run(); err != nil {
		if msg := lastLogError(r.Log, from); msg != "" {
			return fmt.Errorf("%s %s: %w: %s", filepath.Base(r.Path), args[0], err, msg)
		}
		return fmt.Errorf("%s %s: %w", filepath.Base(r.Path), args[0], err)
	}
	return nil
}

// logTail bounds how much of a runtime log lastLogError reads.
const logTail = 64 << 10

// lastLogError returns the message of the last error-level entry logged
// after offset from in a runc-style log file (JSON lines or logfmt text),
// or "".
func lastLogError(path string, from int64) string {
	if path == "" {
		return ""
	}
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil {
		f.Seek(max(from, fi.Size()-logTail), io.SeekStart)
	}
	b, _ := io.ReadAll(io.LimitReader(f, logTail))
	msg := ""
	for _, line := range strings.Split(string(b), "\n") {
		var e struct{ Level, Msg string }
		switch {
		case json.Unmarshal([]byte(line), &e) == nil:
			if e.Level == "error" && e.Msg != "" {
				msg = e.Msg
			}
		case strings.Contains(line, "level=error"):
			if _, m, ok := strings.Cut(line, "msg="); ok {
				msg = strings.Trim(m, `"`)
			}
		}
	}
	return msg
}

// State asks the runtime for the container's state.
func (r Runtime) State(ctx context.Context, id string) (*state.OCI, error) {
	cmd := exec.CommandContext(ctx, r.Path, append(r.globalArgs(), "state", id)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%s state %s: %v: %s", filepath.Base(r.Path), id, err, strings.TrimSpace(errb.String()))
	}
	var st state.OCI
	if err := json.Unmarshal(out.Bytes(), &st); err != nil {
		return nil, fmt.Errorf("%s state %s: %w", filepath.Base(r.Path), id, err)
	}
	return &st, nil
}
