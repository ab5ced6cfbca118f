package main

import (
	"encoding/binary"
	"fmt"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// A guest restored from a template wakes with the template's clock, its
// random generator's state and its devices: every box restored from one
// template would share them. The host's configuration brings the current
// time and fresh random bytes, and the box's devices are hot-plugged just
// before it arrives. The host name comes with the configuration as in a
// cold boot, the NICs' MAC addresses with their devices, and
// /proc/sys/kernel/random/boot_id is made by the kernel on its first
// read, which no template's boot does: each box reads its own, from the
// pool reseeded here.

// hotplugBound bounds the wait for a hot-plugged device.
const hotplugBound = 20 * time.Second

// hotplugWait is how long the setup waits for a device of cfg to appear:
// hotplugBound after a restore, nothing in a cold boot (the devices were
// there before the kernel started).
func hotplugWait(cfg *vmproto.Config) time.Duration {
	if cfg.Hotplugged {
		return hotplugBound
	}
	return 0
}

// quiesceBound bounds the wait for the background module loading before
// a template is saved.
const quiesceBound = moduleRequestTimeout

// quiesce waits until the background module loading is over (loaded
// closes), at most quiesceBound, and flushes the guest's writes: the
// guest is idle when its template is saved.
func quiesce(loaded <-chan struct{}) {
	select {
	case <-loaded:
	case <-time.After(quiesceBound):
		fmt.Fprintln(os.Stderr, "kiwi-box-init: module loading still running when the template is saved")
	}
	unix.Sync()
}

// freshen sets the guest's clock to the host's time and adds the host's
// random bytes to the guest's entropy pool, reseeding its random
// generator. A restored guest that cannot be given fresh random state
// must not run a container: that is an error; a cold-booted guest only
// reports it.
func freshen(cfg *vmproto.Config) error {
	if cfg.Time > 0 {
		ts := unix.NsecToTimespec(cfg.Time)
		if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
			if cfg.Hotplugged {
				return fmt.Errorf("set the clock: %w", err)
			}
			fmt.Fprintf(os.Stderr, "kiwi-box-init: set the clock: %v\n", err)
		}
	}
	if len(cfg.Seed) > 0 {
		if err := addEntropy(cfg.Seed); err != nil {
			if cfg.Hotplugged {
				return fmt.Errorf("seed the random generator: %w", err)
			}
			fmt.Fprintf(os.Stderr, "kiwi-box-init: seed the random generator: %v\n", err)
		}
	}
	return nil
}

// maxSeed bounds the seed credited (the kernel's input pool is 256 bits;
// more adds nothing).
const maxSeed = 512

// addEntropy credits seed to the kernel's entropy pool (RNDADDENTROPY,
// struct rand_pool_info) and makes the random generator reseed from it
// at once (RNDRESEEDCRNG): without the reseed the generator would go on
// from the template's state for up to a minute.
func addEntropy(seed []byte) error {
	if len(seed) > maxSeed {
		seed = seed[:maxSeed]
	}
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	info := make([]byte, 8+len(seed)+3)
	binary.NativeEndian.PutUint32(info[0:], uint32(len(seed)*8)) // entropy_count, in bits
	binary.NativeEndian.PutUint32(info[4:], uint32(len(seed)))   // buf_size, in bytes
	copy(info[8:], seed)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&info[0]))); e != 0 {
		return fmt.Errorf("RNDADDENTROPY: %w", e)
	}
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDRESEEDCRNG, 0); e != 0 {
		return fmt.Errorf("RNDRESEEDCRNG: %w", e)
	}
	return nil
}
