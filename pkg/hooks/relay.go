package hooks

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// RelayCommand is the hidden kiwi-shim command (its first argument) that
// a relayed hook runs: see Relay.
const RelayCommand = "hook-relay"

// RelayStages are the stages whose hooks container mode relays: the ones
// runc runs in the runtime's namespaces, where kiwi-shim's binary is.
// createContainer and startContainer run in the container's namespaces
// (startContainer after pivot_root, where host paths are gone) and are
// left to runc as they are.
var RelayStages = []string{Prestart, CreateRuntime, Poststart, Poststop}

// RelayHooks rewrites, in place, the hooks of RelayStages in h so that
// the low-level runtime runs self (kiwi-shim) instead, which replaces the
// state's bundle with bundle and then executes the original hook (Relay).
// runc still decides when each hook runs, with what timeout and what its
// failure does; only the bundle in the state differs, which runc takes
// from the directory it was given (kiwi-shim's rewritten bundle).
func RelayHooks(h *specs.Hooks, self, bundle string) {
	if h == nil {
		return
	}
	//lint:ignore SA1019 prestart is deprecated, but engines still use it
	for _, list := range []*[]specs.Hook{&h.Prestart, &h.CreateRuntime, &h.Poststart, &h.Poststop} {
		for i, hk := range *list {
			(*list)[i] = relayed(hk, self, bundle)
		}
	}
}

func relayed(h specs.Hook, self, bundle string) specs.Hook {
	args := []string{self, RelayCommand, bundle, h.Path, "--"}
	args = append(args, h.Args...)
	return specs.Hook{Path: self, Args: args, Env: h.Env, Timeout: h.Timeout}
}

// Relay is the relay command's work, args being what follows
// RelayCommand: it reads the state from stdin, sets its bundle and
// executes the original hook (same process: the runtime's timeout and
// the hook's exit status and output reach the runtime unchanged) with
// the new state on its standard input. It returns only on failure.
func Relay(args []string, stdin io.Reader) error {
	if len(args) < 3 || args[2] != "--" {
		return errors.New("usage: hook-relay BUNDLE PATH -- [ARGS...]")
	}
	bundle, path, argv := args[0], args[1], args[3:]
	if len(argv) == 0 {
		argv = []string{path}
	}
	in, err := io.ReadAll(stdin)
	if err != nil {
		return fmt.Errorf("hook %s: read state: %w", path, err)
	}
	out, err := withBundle(in, bundle)
	if err != nil {
		return fmt.Errorf("hook %s: %w", path, err)
	}
	fd, err := unix.MemfdCreate("state", unix.MFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("hook %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), "state")
	if _, err := f.Write(out); err != nil {
		return fmt.Errorf("hook %s: %w", path, err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("hook %s: %w", path, err)
	}
	// dup3 onto 0 clears close-on-exec there.
	if err := unix.Dup3(fd, 0, 0); err != nil {
		return fmt.Errorf("hook %s: %w", path, err)
	}
	f.Close()
	if err := syscall.Exec(path, argv, os.Environ()); err != nil {
		return fmt.Errorf("hook %s: %w", path, err)
	}
	return nil
}

// withBundle returns the state JSON in with its bundle replaced, keeping
// every other field as the runtime wrote it.
func withBundle(in []byte, bundle string) ([]byte, error) {
	var st map[string]json.RawMessage
	if err := json.Unmarshal(in, &st); err != nil {
		return nil, fmt.Errorf("state %q: %w", clip(string(in)), err)
	}
	b, err := json.Marshal(bundle)
	if err != nil {
		return nil, err
	}
	st["bundle"] = b
	return json.Marshal(st)
}
