// Package vmmode runs containers in VM mode: each container is a QEMU
// micro-VM ("box") driven by a monitor process (package vm) that
// kiwi-shim starts at create and that outlives it. The Manager owns a
// box's life on the host: Create resolves the machine and starts the
// monitor; State, Start, Signal, Pause, Resume and Exec talk to the
// monitor; Update changes the CPU controls of the box's host processes;
// Release gives back what the box held on the host. Release is the one
// teardown: Delete, the rollback of a failed Create, gc and a monitor
// whose creator went away all go through it.
//
// It mirrors package containermode, which runs containers through runc.
package vmmode

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/hooks"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
)

// ReleaseTimeout bounds each wait of Release: for the monitor to power the
// guest off after SIGTERM (then it is killed), for QEMU and kiwi-sharefs
// to go after SIGKILL, and for the box's cgroup to empty. A create's
// rollback waited 5 s and delete 10 s before both took this one path; the
// longer wait is kept because a shorter one only risks leaving a cgroup
// or a process behind, never a faster success.
const ReleaseTimeout = 10 * time.Second

// Manager runs containers in VM mode.
type Manager struct {
	// Config is the host configuration: the [vm] section, the cache
	// directory (initramfs images) and the defaults.
	Config config.Config
	// Rootless is set without real root: the box's processes then stay
	// in the caller's cgroup.
	Rootless bool
	// CacheDirs are where guest kernels are looked for, in order.
	CacheDirs []string
	// InitBinary returns kiwi-box-init for a guest architecture.
	InitBinary func(arch string) ([]byte, error)
	// HelperArgs are kiwi-shim's global flags, repeated for the helpers
	// Create and Exec start from kiwi-shim's own binary (the monitor,
	// the exec relay).
	HelperArgs []string
	// Debug turns on the helpers' debug output (kiwi-sharefs).
	Debug bool
	// Store holds kiwi-shim's records.
	Store state.Store
	// Log receives progress and cleanup messages.
	Log *slog.Logger
	// Host reaches the host's processes and kernel objects; nil is the
	// real host (OSHost). Tests substitute a fake.
	Host Host
	// Monitor reaches a box's monitor; nil is the real one (package
	// vm's client over the monitor's socket). Tests substitute a fake.
	Monitor Monitor
}

func (m *Manager) host() Host {
	if m.Host == nil {
		return OSHost{}
	}
	return m.Host
}

func (m *Manager) monitor() Monitor {
	if m.Monitor == nil {
		return MonitorClient{}
	}
	return m.Monitor
}

// dir is the state directory of the container id, where its monitor
// keeps its sockets, pid files and logs.
func (m *Manager) dir(id string) string { return m.Store.Dir(id) }

// State answers `state` for a VM container from its monitor; a monitor
// that does not answer is a stopped container.
func (m *Manager) State(_ context.Context, rec *state.Container) (*state.OCI, error) {
	return m.state(rec), nil
}

func (m *Manager) state(rec *state.Container) *state.OCI {
	st := &state.OCI{
		OCIVersion: specs.Version, ID: rec.ID, Bundle: rec.Bundle, Annotations: rec.Annotations,
		Created: rec.Created.Format(time.RFC3339Nano), Owner: "root", Status: "stopped",
	}
	if ms, err := m.monitor().State(m.dir(rec.ID)); err == nil {
		st.Status, st.Pid = ms.Status, ms.Pid
	} else if vm.MonitorAlive(m.dir(rec.ID), rec.Pid) {
		// The monitor waits for create's go-ahead while the prestart
		// and createRuntime hooks run: the container is being created.
		st.Status, st.Pid = string(specs.StateCreating), rec.Pid
	}
	return st
}

// Start starts the container's process in the guest, then runs the
// poststart hooks on the host; as the runtime spec says, a failing
// poststart hook is logged, and the container goes on.
func (m *Manager) Start(ctx context.Context, rec *state.Container) error {
	if err := m.monitor().Start(m.dir(rec.ID)); err != nil {
		return err
	}
	if err := hooks.Run(ctx, hooks.Poststart, hooks.Of(rec.Hooks, hooks.Poststart), HookState(rec, specs.StateRunning)); err != nil {
		m.Log.Warn("poststart hook failed", "id", rec.ID, "err", err)
	}
	return nil
}

// Signal delivers sig to the container's process, or with all to every
// process of the container.
func (m *Manager) Signal(_ context.Context, rec *state.Container, sig int, all bool) error {
	return notRunning(m.monitor().Signal(m.dir(rec.ID), sig, all))
}

// Pause stops the VM's vCPUs (QEMU's QMP stop, from the monitor).
func (m *Manager) Pause(_ context.Context, rec *state.Container) error {
	return notRunning(m.monitor().Pause(m.dir(rec.ID)))
}

// Resume continues a paused VM's vCPUs (QEMU's QMP cont).
func (m *Manager) Resume(_ context.Context, rec *state.Container) error {
	return notRunning(m.monitor().Resume(m.dir(rec.ID)))
}

// notRunning words a monitor that is gone as runc does: containerd's
// shim takes "container not running" for "already finished", which is
// what a VM that is gone is.
func notRunning(err error) error {
	if errors.Is(err, vm.ErrMonitorGone) {
		return fmt.Errorf("container not running: %w", err)
	}
	return err
}

// Delete removes the container: what it holds on the host (Release),
// then its poststop hooks, whose failures are logged as runc's are, then
// its record. Without force a container that is running, being created
// or paused is an error.
func (m *Manager) Delete(ctx context.Context, rec *state.Container, force bool) error {
	if st := m.state(rec); (st.Status == "running" || st.Status == "creating" || st.Status == "paused") && !force {
		return fmt.Errorf("cannot delete container %s that is %s: stop it first or use --force", rec.ID, st.Status)
	}
	if err := m.Release(ctx, rec); err != nil {
		return err
	}
	m.poststop(ctx, rec)
	return m.Store.Remove(rec.ID)
}

// poststop runs the poststop hooks of a box that is gone; their failures
// are logged, as runc's are.
func (m *Manager) poststop(ctx context.Context, rec *state.Container) {
	if err := hooks.Run(ctx, hooks.Poststop, hooks.Of(rec.Hooks, hooks.Poststop), HookState(rec, specs.StateStopped)); err != nil {
		m.Log.Warn("poststop hook failed", "id", rec.ID, "err", err)
	}
}

// Pids lists the host processes of a VM container: its monitor and QEMU.
func (m *Manager) Pids(rec *state.Container) []int {
	pids := []int{}
	if rec.Pid > 0 {
		pids = append(pids, rec.Pid)
	}
	if b, err := os.ReadFile(filepath.Join(m.dir(rec.ID), "qemu.pid")); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// HookState is the state a VM container's hooks get: the caller's
// bundle, and the monitor's pid (the one --pid-file got).
func HookState(rec *state.Container, status specs.ContainerState) specs.State {
	st := specs.State{Version: specs.Version, ID: rec.ID, Status: status, Bundle: rec.Bundle, Annotations: rec.Annotations}
	if status != specs.StateStopped {
		st.Pid = rec.Pid
	}
	return st
}
