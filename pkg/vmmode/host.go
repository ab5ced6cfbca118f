package vmmode

import (
	"context"
	"os"
	"os/exec"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/fdutil"
	"github.com/kiwi-shim/kiwi-shim/pkg/gc"
	"github.com/kiwi-shim/kiwi-shim/pkg/hostcgroup"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmnet"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// Host is what a box's life does to the host outside its state
// directory: starting and killing its processes, its cgroup, its scratch
// disk and its network. OSHost is the real one.
type Host interface {
	// StartProcess starts a helper (the monitor, an exec relay) without
	// handing it descriptors it was not given, after joining the
	// namespaces join (kind -> path, see vm.StartIn); cmd's
	// SysProcAttr may ask for new ones.
	StartProcess(cmd *exec.Cmd, join map[int]string) error
	// Helpers lists the monitor, QEMU and kiwi-sharefs processes of the
	// state directory dir, found by their command lines.
	Helpers(dir string) []gc.Proc
	// Kill sends SIGKILL to pid.
	Kill(pid int) error
	// CreateCgroup makes the box's cgroup; SetCPU writes its CPU
	// controls; RemoveCgroup removes it, waiting up to timeout for
	// exiting processes.
	CreateCgroup(path string) error
	SetCPU(path string, cpu *specs.LinuxCPU) error
	RemoveCgroup(path string, timeout time.Duration) error
	// LeaveCgroup moves the calling process to the root cgroup (a
	// monitor about to remove its own container's).
	LeaveCgroup() error
	// CreateScratch makes a scratch disk image of size bytes in dir and
	// returns its path.
	CreateScratch(ctx context.Context, dir, id string, size int64) (string, error)
	// PlanNetwork plans the guest's network from what the network
	// namespace at nsPath holds (vm.PlanNetworkAt).
	PlanNetwork(nsPath string) vm.NetworkPlan
	// TeardownNetwork gives the interfaces the monitor moved onto taps
	// back to the namespace (vmnet.Teardown).
	TeardownNetwork(st *vmnet.State) error
}

// Monitor is the control connection to a box's monitor, and the last
// resort when the monitor does not answer (Stop).
type Monitor interface {
	State(dir string) (vmproto.State, error)
	Start(dir string) error
	Signal(dir string, sig int, all bool) error
	Pause(dir string) error
	Resume(dir string) error
	// Stop ends the box: the monitor monitorPid is asked to power the
	// guest off, then killed after timeout, and QEMU and kiwi-sharefs
	// are killed if they outlived it (see vm.Stop).
	Stop(dir string, monitorPid int, timeout time.Duration)
}

// OSHost is the real host.
type OSHost struct{}

var _ Host = OSHost{}

// StartProcess starts cmd in the namespaces join, with the caller's
// inherited descriptors hidden (see fdutil.WithInheritedHidden).
func (OSHost) StartProcess(cmd *exec.Cmd, join map[int]string) error {
	return vm.StartIn(join, func() error { return fdutil.WithInheritedHidden(cmd.Start) })
}

// Helpers finds the helpers of dir among the host's processes.
func (OSHost) Helpers(dir string) []gc.Proc { return gc.Helpers(gc.Processes(), dir) }

// Kill sends SIGKILL to pid.
func (OSHost) Kill(pid int) error { return unix.Kill(pid, unix.SIGKILL) }

// CreateCgroup creates the cgroup path.
func (OSHost) CreateCgroup(path string) error { return hostcgroup.Create(path) }

// SetCPU writes the CPU controls of the cgroup path.
func (OSHost) SetCPU(path string, cpu *specs.LinuxCPU) error { return hostcgroup.SetCPU(path, cpu) }

// RemoveCgroup removes the cgroup path.
func (OSHost) RemoveCgroup(path string, timeout time.Duration) error {
	return hostcgroup.Remove(path, timeout)
}

// LeaveCgroup moves the calling process to the root cgroup.
func (OSHost) LeaveCgroup() error { return hostcgroup.Leave(os.Getpid()) }

// CreateScratch makes a scratch disk (vm.CreateScratch).
func (OSHost) CreateScratch(ctx context.Context, dir, id string, size int64) (string, error) {
	return vm.CreateScratch(ctx, dir, id, size)
}

// PlanNetwork plans the guest's network from the namespace at nsPath.
func (OSHost) PlanNetwork(nsPath string) vm.NetworkPlan { return vm.PlanNetworkAt(nsPath) }

// TeardownNetwork restores the namespace's interfaces (vmnet.Teardown).
func (OSHost) TeardownNetwork(st *vmnet.State) error { return vmnet.Teardown(st) }

// MonitorClient talks to a box's monitor over its socket (package vm).
type MonitorClient struct{}

var _ Monitor = MonitorClient{}

// State asks the monitor for the container's state.
func (MonitorClient) State(dir string) (vmproto.State, error) { return vm.QueryState(dir) }

// Start asks the monitor to start the container's process.
func (MonitorClient) Start(dir string) error { return vm.Start(dir) }

// Signal asks the monitor to signal the container's process or all.
func (MonitorClient) Signal(dir string, sig int, all bool) error { return vm.Signal(dir, sig, all) }

// Pause asks the monitor to stop the vCPUs.
func (MonitorClient) Pause(dir string) error { return vm.Pause(dir) }

// Resume asks the monitor to continue the vCPUs.
func (MonitorClient) Resume(dir string) error { return vm.Resume(dir) }

// Stop ends the box (vm.Stop).
func (MonitorClient) Stop(dir string, monitorPid int, timeout time.Duration) {
	vm.Stop(dir, monitorPid, timeout)
}
