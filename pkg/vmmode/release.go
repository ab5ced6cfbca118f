package vmmode

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/kiwi-shim/kiwi-shim/pkg/state"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmnet"
)

// Release stops what is left of a VM container's host side and gives
// back what it held: its processes (also ones without a pid file), the
// network redirects and addresses, the scratch disk and the cgroup. The
// record stays, updated; releasing again finds nothing to do. Each step
// is tried even when an earlier one failed; the error is the scratch
// disk's, which then stays in the record so that a later delete or gc
// retries it.
//
// Delete, the rollback of a failed Create, gc (of a stopped container
// whose monitor died) and a monitor that removes its abandoned box all
// release through here.
func (m *Manager) Release(_ context.Context, rec *state.Container) error {
	dir := m.dir(rec.ID)
	m.monitor().Stop(dir, rec.Pid, ReleaseTimeout)
	// Helpers that lost their pid file or their monitor.
	m.killHelpers(rec.ID, dir)
	// QEMU is gone, and with it the taps; the redirects and the
	// interfaces' addresses are restored in the namespace, if it lives.
	if st, err := vmnet.Load(dir); err != nil {
		m.Log.Warn("container network state", "id", rec.ID, "err", err)
	} else if st != nil {
		if err := m.host().TeardownNetwork(st); err != nil {
			m.Log.Warn("container network teardown", "id", rec.ID, "err", err)
		} else {
			os.Remove(filepath.Join(dir, vmnet.StateFile))
		}
	}
	changed := false
	var scratchErr error
	if rec.Scratch != "" {
		if err := os.Remove(rec.Scratch); err != nil && !os.IsNotExist(err) {
			scratchErr = fmt.Errorf("remove scratch disk: %w", err)
		} else {
			rec.Scratch, changed = "", true
		}
	}
	if rec.Cgroup != "" {
		// QEMU and kiwi-sharefs were killed above; they may still be
		// on their way out. A cgroup that stays is logged, not worth
		// keeping a container that cannot be deleted.
		if err := m.host().RemoveCgroup(rec.Cgroup, ReleaseTimeout); err != nil {
			m.Log.Warn("remove the VM's cgroup", "id", rec.ID, "err", err)
		} else {
			rec.Cgroup, changed = "", true
		}
	}
	if changed {
		if err := m.Store.Save(rec); err != nil && !errors.Is(err, os.ErrNotExist) {
			return errors.Join(scratchErr, err)
		}
	}
	return scratchErr
}

// killHelpers kills the monitor, QEMU and kiwi-sharefs processes of the
// state directory dir, found by their command lines, not by pid files.
func (m *Manager) killHelpers(id, dir string) {
	for _, p := range m.host().Helpers(dir) {
		if p.Pid == os.Getpid() {
			continue // a monitor removing its own abandoned container
		}
		if err := m.host().Kill(p.Pid); err == nil {
			m.Log.Info("killed a leftover helper", "id", id, "pid", p.Pid, "cmd", filepath.Base(p.Argv[0]))
		}
	}
}

// RemoveUnrecorded removes the state directory of the container id that
// has no record: a create that died before writing one. What it started
// goes with it.
func (m *Manager) RemoveUnrecorded(id string) {
	dir := m.dir(id)
	m.killHelpers(id, dir)
	os.RemoveAll(dir)
}

// RemoveAbandoned deletes the VM container of the state directory dir
// from inside its own monitor, once the monitor has stopped the VM:
// create went away before the VM was ready, so no engine knows this
// container, and none will delete it.
func (m *Manager) RemoveAbandoned(ctx context.Context, dir string) {
	rec, err := m.Store.Load(filepath.Base(dir))
	if err != nil || m.dir(rec.ID) != dir {
		m.Log.Warn("abandoned container not removed", "dir", dir, "err", err)
		return
	}
	if rec.Cgroup != "" {
		// The monitor is in the box's cgroup, which Release removes.
		if err := m.host().LeaveCgroup(); err != nil {
			m.Log.Warn("leave the abandoned container's cgroup", "id", rec.ID, "err", err)
		}
	}
	if err := m.Release(ctx, rec); err != nil {
		m.Log.Warn("abandoned container not released", "id", rec.ID, "err", err)
		return
	}
	if err := m.Store.Remove(rec.ID); err != nil {
		m.Log.Warn("abandoned container not removed", "id", rec.ID, "err", err)
		return
	}
	m.Log.Info("abandoned container removed", "id", rec.ID)
}
