package containermode

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiwi-shim/kiwi-shim/pkg/fdutil"
	"github.com/kiwi-shim/kiwi-shim/pkg/hooks"
	"github.com/kiwi-shim/kiwi-shim/pkg/loopdev"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
)

// CreateOptions are the inputs of Create: runc's create flags plus what
// kiwi-shim decided about the container.
type CreateOptions struct {
	// ID, Bundle and Spec identify the container.
	ID, Bundle string
	Spec       *specs.Spec
	// Settings are the container's io.kiwi-shim.* annotations.
	Settings oci.Settings
	// LoopCount is the number of devices to lease.
	LoopCount int
	// Sandbox marks a Kubernetes pod sandbox: no loop lease, no keeper,
	// and the spec runs as given (none of KIWI's capabilities).
	Sandbox bool
	// PidFile, ConsoleSocket, NoPivot, NoNewKeyring and PreserveFds are
	// runc's create flags, passed through.
	PidFile, ConsoleSocket string
	NoPivot, NoNewKeyring  bool
	PreserveFds            int
	// Self is kiwi-shim's binary, which relays the hooks runc runs in
	// the runtime's namespaces so that they see Bundle in the state
	// (hooks.RelayHooks). Empty leaves the hooks as they are.
	Self string
	// KeeperCmd builds the command that runs the loop keeper (Keep).
	KeeperCmd func(KeeperArgs) *exec.Cmd
}

// KeeperArgs say what a keeper leases and for whom.
type KeeperArgs struct {
	// Owner is the container id.
	Owner string
	// Count is the number of devices to lease.
	Count int
	// Timeout bounds the wait for them; 0 waits for ever.
	Timeout time.Duration
	// Lease, when set, is a Kubernetes allocation to adopt instead of
	// leasing Count devices (its devices are the ones the box gets).
	Lease *oci.LoopLease
	// HoldOnly holds the lease without mirroring partitions into the
	// container (a VM-mode box).
	HoldOnly bool
}

// Manager runs containers in container mode.
type Manager struct {
	// Runtime is the low-level runtime.
	Runtime Runtime
	// Store holds kiwi-shim's records.
	Store state.Store
	// Alloc is the host loop allocator, used to clean up after a keeper
	// that died.
	Alloc *loopdev.Allocator
	// Log receives progress and cleanup messages.
	Log *slog.Logger
}

// Create leases the loop devices, writes the rewritten bundle and creates
// the container with the low-level runtime. On any failure it leaves no
// lease, record or runtime state behind.
func (m *Manager) Create(ctx context.Context, o CreateOptions) (err error) {
	rec := &state.Container{
		ID: o.ID, Bundle: o.Bundle, Mode: "container", Created: time.Now().UTC(),
		Annotations: o.Spec.Annotations,
	}
	if err := m.Store.Create(rec); err != nil {
		return err
	}
	var keeper *KeeperHandle
	defer func() {
		if err != nil {
			if keeper != nil {
				keeper.Abort()
			}
			m.Store.Remove(o.ID)
		}
	}()

	if !o.Sandbox {
		kcmd := o.KeeperCmd(KeeperArgs{Owner: o.ID, Count: o.LoopCount, Timeout: o.Settings.LoopTimeout, Lease: o.Settings.LoopLease})
		err = fdutil.WithInheritedHidden(func() error {
			var kerr error
			keeper, kerr = StartKeeper(kcmd)
			return kerr
		})
		if err != nil {
			return fmt.Errorf("lease %d loop device(s): %w", o.LoopCount, err)
		}
		rec.KeeperPID, rec.Devices = keeper.Pid(), keeper.Devices
	}

	spec, err := m.runtimeSpec(o, rec.Devices)
	if err != nil {
		return err
	}
	rec.RuntimeBundle = filepath.Join(m.Store.Dir(o.ID), "bundle")
	if err := writeSpec(rec.RuntimeBundle, spec); err != nil {
		return err
	}
	if err := m.Store.Save(rec); err != nil {
		return err
	}

	pidFile := filepath.Join(m.Store.Dir(o.ID), "init.pid")
	args := []string{"create", "--bundle", rec.RuntimeBundle, "--pid-file", pidFile}
	if o.ConsoleSocket != "" {
		args = append(args, "--console-socket", o.ConsoleSocket)
	}
	if o.NoPivot {
		args = append(args, "--no-pivot")
	}
	if o.NoNewKeyring {
		args = append(args, "--no-new-keyring")
	}
	if o.PreserveFds > 0 {
		args = append(args, "--preserve-fds", strconv.Itoa(o.PreserveFds))
	}
	if err := m.Runtime.Run(ctx, append(args, o.ID)...); err != nil {
		// The runtime may have left a half-made container.
		m.Runtime.Command(context.Background(), "delete", "--force", o.ID).Run()
		return err
	}
	pid, err := readPid(pidFile)
	if err != nil {
		m.Runtime.Command(context.Background(), "delete", "--force", o.ID).Run()
		return err
	}
	rec.Pid = pid
	if err := m.Store.Save(rec); err != nil {
		m.Runtime.Command(context.Background(), "delete", "--force", o.ID).Run()
		return err
	}
	if keeper != nil {
		if err := keeper.Hold(pid); err != nil {
			m.Runtime.Command(context.Background(), "delete", "--force", o.ID).Run()
			return err
		}
	}
	if o.PidFile != "" {
		if err := state.WritePidFile(o.PidFile, pid); err != nil {
			m.Runtime.Command(context.Background(), "delete", "--force", o.ID).Run()
			return err
		}
	}
	m.Log.Debug("created container", "id", o.ID, "pid", pid, "devices", rec.Devices)
	return nil
}

// runtimeSpec is the spec runc gets: a sandbox's as given, a build
// container's with its devices and KIWI's capabilities.
func (m *Manager) runtimeSpec(o CreateOptions, leased []string) (*specs.Spec, error) {
	spec, err := m.rewrittenSpec(o, leased)
	if err != nil {
		return nil, err
	}
	// runc gives hooks the state of the bundle it was handed, ours:
	// the hooks it runs on the host go through kiwi-shim, which
	// puts the caller's bundle into their state.
	if o.Self != "" {
		hooks.RelayHooks(spec.Hooks, o.Self, o.Bundle)
	}
	return spec, nil
}

func (m *Manager) rewrittenSpec(o CreateOptions, leased []string) (*specs.Spec, error) {
	rootfs := oci.RootPath(o.Bundle, o.Spec)
	if o.Sandbox {
		return WithRoot(o.Spec, rootfs)
	}
	devs, err := m.nodes(leased)
	if err != nil {
		return nil, err
	}
	if o.Settings.LoopControl {
		devs = append(devs, LoopControl)
	}
	return Rewrite(o.Spec, rootfs, devs)
}

func (m *Manager) nodes(paths []string) ([]Device, error) {
	host := loopdev.DefaultHost()
	devs := make([]Device, 0, len(paths))
	for _, p := range paths {
		d, err := loopdev.ParseDevice(p)
		if err != nil {
			return nil, err
		}
		maj, min, err := host.DevNumber(d)
		if err != nil {
			return nil, err
		}
		devs = append(devs, Device{Path: d.Path(), Type: "b", Major: int64(maj), Minor: int64(min)})
	}
	return devs, nil
}

// Delete removes the container: the runtime's state, the keeper and its
// lease, and the record. Without force a running container is an error.
func (m *Manager) Delete(ctx context.Context, rec *state.Container, force bool) error {
	args := []string{"delete"}
	if force {
		args = append(args, "--force")
	}
	cmd := m.Runtime.Command(ctx, append(args, rec.ID)...)
	var errb strings.Builder
	cmd.Stdout, cmd.Stderr = nil, &errb
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(errb.String())
		// Already gone from the runtime (it never got that far, or was
		// cleaned): carry on with our own cleanup.
		if !strings.Contains(msg, "does not exist") && !force {
			return fmt.Errorf("delete %s: %s", rec.ID, lastLine(msg, err))
		}
	}
	StopKeeper(rec.KeeperPID, rec.ID)
	// A keeper that was killed leaves a stale lease: clean it now.
	if _, err := m.Alloc.Status(); err != nil {
		m.Log.Warn("clean loop leases", "err", err)
	}
	return m.Store.Remove(rec.ID)
}

// State asks the runtime and answers with the caller's bundle.
func (m *Manager) State(ctx context.Context, rec *state.Container) (*state.OCI, error) {
	st, err := m.Runtime.State(ctx, rec.ID)
	if err != nil {
		// The runtime lost it (e.g. its root was cleared): report the
		// container as stopped so that the caller can delete it.
		st = &state.OCI{OCIVersion: specs.Version, ID: rec.ID, Status: "stopped"}
	}
	st.Bundle = rec.Bundle
	st.Annotations = rec.Annotations
	st.Created = rec.Created.Format(time.RFC3339Nano)
	return st, nil
}

func lastLine(msg string, err error) string {
	if msg == "" {
		return err.Error()
	}
	lines := strings.Split(msg, "\n")
	return lines[len(lines)-1]
}

func writeSpec(dir string, s *specs.Spec) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("runtime bundle: %w", err)
	}
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o600); err != nil {
		return fmt.Errorf("runtime bundle: %w", err)
	}
	return nil
}

func readPid(p string) (int, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, fmt.Errorf("container pid: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("container pid file %s: %q is not a pid", p, b)
	}
	return pid, nil
}
