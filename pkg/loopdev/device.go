package loopdev

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Host paths. They are fields of Host rather than constants so that tests
// can point the package at a fake sysfs without touching real devices.
const (
	defaultDevDir   = "/dev"
	defaultSysBlock = "/sys/block"
	// defaultClaimDir is host-wide on purpose: allocators with different
	// lease directories (a test's, a second --root's) share the devices.
	defaultClaimDir = "/run/kiwi-shim/loop-claims"
	loopControl     = "loop-control"
	maxLoopParam    = "/sys/module/loop/parameters/max_loop"
)

// blkpg is BLKPG from <linux/fs.h>; x/sys/unix has the argument type but not
// the request number.
const blkpg = 0x1269

// blkpgPartition mirrors struct blkpg_partition from <linux/blkpg.h>.
type blkpgPartition struct {
	Start   int64
	Length  int64
	Pno     int32
	Devname [64]byte
	Volname [64]byte
	_       [4]byte
}

// Device is one loop block device, /dev/loopN.
type Device struct {
	// Index is N in /dev/loopN.
	Index int
}

// Name returns the kernel name of the device, "loopN".
func (d Device) Name() string { return "loop" + strconv.Itoa(d.Index) }

// Path returns the device node path under /dev.
func (d Device) Path() string { return filepath.Join(defaultDevDir, d.Name()) }

// String implements fmt.Stringer.
func (d Device) String() string { return d.Path() }

// ParseDevice parses "loopN" or "/dev/loopN".
func ParseDevice(s string) (Device, error) {
	name := strings.TrimPrefix(filepath.Base(s), "loop")
	n, err := strconv.Atoi(name)
	if err != nil || n < 0 || !strings.HasPrefix(filepath.Base(s), "loop") {
		return Device{}, fmt.Errorf("%q is not a loop device name", s)
	}
	return Device{Index: n}, nil
}

// Host gives access to the host's loop driver through /dev and sysfs.
type Host struct {
	// DevDir is where device nodes live, normally /dev.
	DevDir string
	// SysBlock is sysfs' block class directory, normally /sys/block.
	SysBlock string
	// ClaimDir holds one claim file per device (loopN), which the holder
	// of a lease keeps locked. Every allocator on the host claims a device
	// there before leasing it, whatever its own lease directory, so two
	// allocators never lease one device and one's release never detaches
	// the other's.
	ClaimDir string
}

// DefaultHost is the real host: /dev, /sys/block and the host-wide claim
// directory /run/kiwi-shim/loop-claims.
func DefaultHost() Host {
	return Host{DevDir: defaultDevDir, SysBlock: defaultSysBlock, ClaimDir: defaultClaimDir}
}

// claim takes the host-wide claim on the device without waiting. It
// returns nil when another lease, of any allocator, holds the claim. The
// claim files stay (one per device index, a few bytes): removing a locked
// file would let two processes lock two different files of one name.
func (h Host) claim(d Device) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(h.ClaimDir, d.Name()), os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("claim %s: %w", d, err)
	}
	ok, err := tryLock(f)
	if err != nil || !ok {
		f.Close()
		return nil, err
	}
	return f, nil
}

func (h Host) node(d Device) string { return filepath.Join(h.DevDir, d.Name()) }

// Nodes lists the loop devices that have a node under DevDir, in index order.
func (h Host) Nodes() ([]Device, error) {
	ents, err := os.ReadDir(h.DevDir)
	if err != nil {
		return nil, fmt.Errorf("list loop nodes: %w", err)
	}
	var devs []Device
	for _, e := range ents {
		d, err := ParseDevice(e.Name())
		if err != nil || e.Type()&os.ModeDevice == 0 {
			continue
		}
		devs = append(devs, d)
	}
	sort.Slice(devs, func(i, j int) bool { return devs[i].Index < devs[j].Index })
	return devs, nil
}

// HostCapacity is the number of loop devices the host offers: the loop
// module's max_loop when it is set, otherwise the number of /dev/loopN nodes.
func (h Host) HostCapacity() (int, error) {
	if b, err := os.ReadFile(maxLoopParam); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && n > 0 {
			return n, nil
		}
	}
	nodes, err := h.Nodes()
	if err != nil {
		return 0, err
	}
	if len(nodes) == 0 {
		return 0, errors.New("no loop devices on this host: load the loop module (modprobe loop)")
	}
	return len(nodes), nil
}

// Bound reports whether the device has a backing file. A device without a
// sysfs entry does not exist yet and is therefore not bound.
func (h Host) Bound(d Device) (bool, error) {
	_, err := os.Stat(filepath.Join(h.SysBlock, d.Name(), "loop"))
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, os.ErrNotExist):
		return false, nil
	default:
		return false, fmt.Errorf("probe %s: %w", d, err)
	}
}

// BackingFile returns the file bound to the device, or "" when it is free.
func (h Host) BackingFile(d Device) (string, error) {
	b, err := os.ReadFile(filepath.Join(h.SysBlock, d.Name(), "loop", "backing_file"))
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read backing file of %s: %w", d, err)
	}
	return strings.TrimSpace(string(b)), nil
}

// Partitions lists the partition numbers the kernel has registered on the
// device (loopNpK entries in sysfs), in order.
func (h Host) Partitions(d Device) ([]int, error) {
	ents, err := os.ReadDir(filepath.Join(h.SysBlock, d.Name()))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list partitions of %s: %w", d, err)
	}
	prefix := d.Name() + "p"
	var parts []int
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), prefix) {
			continue
		}
		if n, err := strconv.Atoi(strings.TrimPrefix(e.Name(), prefix)); err == nil {
			parts = append(parts, n)
		}
	}
	sort.Ints(parts)
	return parts, nil
}

// Ensure makes sure the device exists and has a node under DevDir, asking
// the loop driver to create it (LOOP_CTL_ADD) when it does not.
func (h Host) Ensure(d Device) error {
	if _, err := os.Stat(filepath.Join(h.SysBlock, d.Name())); errors.Is(err, os.ErrNotExist) {
		ctl, err := os.OpenFile(filepath.Join(h.DevDir, loopControl), os.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("create %s: %w", d, err)
		}
		// LOOP_CTL_ADD takes the index itself as the ioctl argument.
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, ctl.Fd(), unix.LOOP_CTL_ADD, uintptr(d.Index))
		ctl.Close()
		if errno != 0 && errno != unix.EEXIST {
			return fmt.Errorf("create %s: LOOP_CTL_ADD: %w", d, errno)
		}
	}
	node := h.node(d)
	if _, err := os.Stat(node); err == nil {
		return nil
	}
	// devtmpfs normally creates the node; make it ourselves where /dev is
	// not devtmpfs (e.g. inside a container).
	maj, min, err := h.DevNumber(d)
	if err != nil {
		return err
	}
	if err := unix.Mknod(node, unix.S_IFBLK|0o660, int(unix.Mkdev(maj, min))); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("mknod %s: %w", node, err)
	}
	return nil
}

// DevNumber returns the device's major and minor numbers.
func (h Host) DevNumber(d Device) (major, minor uint32, err error) {
	b, err := os.ReadFile(filepath.Join(h.SysBlock, d.Name(), "dev"))
	if err != nil {
		return 0, 0, fmt.Errorf("device number of %s: %w", d, err)
	}
	if _, err := fmt.Sscanf(strings.TrimSpace(string(b)), "%d:%d", &major, &minor); err != nil {
		return 0, 0, fmt.Errorf("parse device number of %s: %w", d, err)
	}
	return major, minor, nil
}

// AttachOptions tune how a backing file is bound.
type AttachOptions struct {
	// ReadOnly binds the file read-only.
	ReadOnly bool
	// Autoclear detaches the device when its last user closes it.
	Autoclear bool
	// DirectIO bypasses the page cache of the backing file.
	DirectIO bool
	// PartScan asks the kernel to scan the partition table.
	PartScan bool
}

func (o AttachOptions) flags() uint32 {
	var f uint32
	if o.ReadOnly {
		f |= unix.LO_FLAGS_READ_ONLY
	}
	if o.Autoclear {
		f |= unix.LO_FLAGS_AUTOCLEAR
	}
	if o.DirectIO {
		f |= unix.LO_FLAGS_DIRECT_IO
	}
	if o.PartScan {
		f |= unix.LO_FLAGS_PARTSCAN
	}
	return f
}

// Attach binds backing to the device with LOOP_CONFIGURE, falling back to
// LOOP_SET_FD + LOOP_SET_STATUS64 on kernels older than 5.8. The device
// must be free; EBUSY means somebody else bound it first.
func (h Host) Attach(d Device, backing string, opts AttachOptions) error {
	mode := os.O_RDWR
	if opts.ReadOnly {
		mode = os.O_RDONLY
	}
	bf, err := os.OpenFile(backing, mode|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("attach %s to %s: %w", backing, d, err)
	}
	defer bf.Close()
	lf, err := os.OpenFile(h.node(d), mode|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("attach %s to %s: %w", backing, d, err)
	}
	defer lf.Close()

	info := unix.LoopInfo64{Flags: opts.flags()}
	copy(info.File_name[:len(info.File_name)-1], backing)
	cfg := unix.LoopConfig{Fd: uint32(bf.Fd()), Info: info}
	err = unix.IoctlLoopConfigure(int(lf.Fd()), &cfg)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOTTY) {
		// Kernels before 5.8 have no LOOP_CONFIGURE.
		if err = unix.IoctlSetInt(int(lf.Fd()), unix.LOOP_SET_FD, int(bf.Fd())); err == nil {
			if err = unix.IoctlLoopSetStatus64(int(lf.Fd()), &info); err != nil {
				_ = unix.IoctlSetInt(int(lf.Fd()), unix.LOOP_CLR_FD, 0)
			}
		}
	}
	if err != nil {
		return fmt.Errorf("attach %s to %s: %w", backing, d, err)
	}
	return nil
}

// Detach unbinds the device if it is bound and removes every partition
// node the kernel still has for it, including stale ones left by tools
// that registered partitions through BLKPG. It waits up to timeout for a
// device that is still open elsewhere to let go.
func (h Host) Detach(d Device, timeout time.Duration) error {
	bound, err := h.Bound(d)
	if err != nil {
		return err
	}
	parts, err := h.Partitions(d)
	if err != nil {
		return err
	}
	if !bound && len(parts) == 0 {
		return nil
	}
	if bound {
		// Since Linux 5.x LOOP_CLR_FD only marks the device for autoclear;
		// the kernel detaches it when the last opener, this one included,
		// closes it. So issue it and close before waiting.
		if err := h.ioctlNode(d, func(fd int) error {
			return unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0)
		}); err != nil && !errors.Is(err, unix.ENXIO) {
			return fmt.Errorf("detach %s: LOOP_CLR_FD: %w", d, err)
		}
	}
	deadline := time.Now().Add(timeout)
	for {
		bound, err = h.Bound(d)
		if err != nil {
			return err
		}
		parts, err = h.Partitions(d)
		if err != nil {
			return err
		}
		var partErr error
		for _, p := range parts {
			err := h.ioctlNode(d, func(fd int) error { return delPartition(fd, p) })
			if err != nil && !errors.Is(err, unix.ENXIO) {
				partErr = fmt.Errorf("remove partition %sp%d: %w", d, p, err)
			}
		}
		if !bound && partErr == nil {
			if parts, _ = h.Partitions(d); len(parts) == 0 {
				return nil
			}
		}
		if time.Now().After(deadline) {
			if partErr != nil {
				return partErr
			}
			return fmt.Errorf("detach %s: still in use after %s (is it or a partition mounted?)", d, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// ioctlNode opens the device node just for fn, so that this process is
// never the opener that keeps an autoclear device bound.
func (h Host) ioctlNode(d Device, fn func(fd int) error) error {
	f, err := os.OpenFile(h.node(d), os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return fn(int(f.Fd()))
}

func delPartition(fd, pno int) error {
	p := blkpgPartition{Pno: int32(pno)}
	arg := unix.BlkpgIoctlArg{
		Op:      unix.BLKPG_DEL_PARTITION,
		Datalen: int32(unsafe.Sizeof(p)),
		Data:    (*byte)(unsafe.Pointer(&p)),
	}
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), blkpg, uintptr(unsafe.Pointer(&arg)))
	if errno != 0 {
		return errno
	}
	return nil
}
