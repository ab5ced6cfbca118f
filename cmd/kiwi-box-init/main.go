// Command kiwi-box-init is the guest's PID 1 in a kiwi-shim VM. It is a
// small static binary (standard library and x/sys/unix only) packed into
// the initramfs with the kernel modules the box needs.
//
// It loads the modules, finds the control port (a virtio-serial port named
// org.kiwi-shim.ctl), says hello, receives the container's Config, builds
// the container's root from the host's shares, and then runs the processes
// the host asks for, relaying their stdio and exit statuses. When the
// container's first process ends it powers the VM off; as PID 1 it also
// reaps every orphan.
//
// The host is trusted by the guest (it built the guest); the guest is not
// trusted by the host.
package main

import (
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// portName names the control port in QEMU's virtserialport.
const portName = "org.kiwi-shim.ctl"

func main() {
	if isExecHelper() {
		os.Exit(execHelper())
	}
	if isModuleRequest() {
		// Run by the kernel as its modprobe: never init's work (nor
		// its poweroff).
		os.Exit(moduleRequest())
	}
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "kiwi-box-init: %v\n", err)
	}
	poweroff()
}

// bootClock reads CLOCK_BOOTTIME: the guest's time since its kernel
// started, for vmproto.BootTimes.
func bootClock() int64 {
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts) != nil {
		return 0
	}
	return ts.Nano()
}

func run() error {
	boot := vmproto.BootTimes{Init: bootClock()}
	if err := earlyMounts(); err != nil {
		return err
	}
	// Errors here do not stop the box: a missing module shows up as a
	// clear mount error later, with this message in the console log.
	mods, err := openModules(vmproto.ModuleLoadList)
	if err == nil {
		err = loadModules(mods)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "kiwi-box-init: %v\n", err)
	}
	boot.Modules = bootClock()
	later, err := openModules(vmproto.ModuleLaterList)
	if err == nil && len(later) > 0 {
		err = answerModuleRequests()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "kiwi-box-init: %v\n", err)
	}
	loaded := loadInBackground(later)
	ctl, err := openPort(portName, 30*time.Second)
	if err != nil {
		return err
	}
	g := newGuest(ctl)
	var uts unix.Utsname
	_ = unix.Uname(&uts)
	boot.Hello = bootClock()
	if err := g.w.WriteJSON(vmproto.THello, 0, vmproto.Hello{Version: vmproto.Version, Kernel: unix.ByteSliceToString(uts.Release[:]), Boot: boot}); err != nil {
		return fmt.Errorf("hello: %w", err)
	}
	// Before a template is saved the host asks the guest to finish its
	// background work; a box restored from it continues here and gets its
	// configuration.
	var f vmproto.Frame
	for {
		if f, err = vmproto.ReadFrame(ctl); err != nil {
			return fmt.Errorf("read config: %w", err)
		}
		if f.Type != vmproto.TQuiesce {
			break
		}
		quiesce(loaded)
		if err := g.w.Write(vmproto.TQuiesce, 0, nil); err != nil {
			return fmt.Errorf("quiesce: %w", err)
		}
	}
	if f.Type != vmproto.TConfig {
		return fmt.Errorf("expected config, got frame type %d", f.Type)
	}
	ready := vmproto.Ready{Boot: vmproto.BootTimes{Config: bootClock()}}
	var cfg vmproto.Config
	if err := vmproto.Decode(f.Payload, &cfg); err != nil {
		return err
	}
	if err := freshen(&cfg); err != nil {
		g.w.WriteJSON(vmproto.TError, 0, vmproto.Error{Message: err.Error()})
		return err
	}
	dns, err := planDNS(&cfg)
	if err != nil {
		g.w.WriteJSON(vmproto.TError, 0, vmproto.Error{Message: err.Error()})
		return err
	}
	if err := setupRoot(&cfg); err != nil {
		g.w.WriteJSON(vmproto.TError, 0, vmproto.Error{Message: err.Error()})
		return err
	}
	ready.Boot.Mounts = bootClock()
	if err := setupNetwork(cfg.Network, hotplugWait(&cfg)); err != nil {
		err = fmt.Errorf("network: %w", err)
		g.w.WriteJSON(vmproto.TError, 0, vmproto.Error{Message: err.Error()})
		return err
	}
	if dns != nil {
		if err := serveDNS(dns); err != nil {
			g.w.WriteJSON(vmproto.TError, 0, vmproto.Error{Message: err.Error()})
			return err
		}
	}
	if err := applyRlimits(cfg.Rlimits); err != nil {
		g.w.WriteJSON(vmproto.TError, 0, vmproto.Error{Message: err.Error()})
		return err
	}
	// As runc does: a container whose program is not there fails to be
	// created, rather than starting and exiting 127.
	if err := checkProgram(cfg.Process); err != nil {
		g.w.WriteJSON(vmproto.TError, 0, vmproto.Error{Message: err.Error()})
		return err
	}
	ready.Boot.Ready = bootClock()
	if err := g.w.WriteJSON(vmproto.TReady, 0, ready); err != nil {
		return err
	}
	return g.serve(&cfg)
}

// earlyMounts gives the initramfs the kernel filesystems init needs.
func earlyMounts() error {
	for _, m := range []struct{ src, dst, fstype string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
	} {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.src, m.dst, m.fstype, unix.MS_NOSUID, ""); err != nil && err != unix.EBUSY {
			return fmt.Errorf("mount %s: %w", m.dst, err)
		}
	}
	return nil
}

// poweroff ends the VM. The host sees QEMU exit.
func poweroff() {
	unix.Sync()
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	// Reboot only returns on failure; PID 1 must not exit (kernel panic
	// is also a way out with panic=-1, but a clean poweroff is nicer).
	for {
		time.Sleep(time.Hour)
	}
}
