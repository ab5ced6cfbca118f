package containermode

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/devcgroup"
	"github.com/kiwi-shim/kiwi-shim/pkg/loopdev"
)

// Partition nodes. KIWI partitions its loop device and registers the
// partitions with partx (BLKPG); the kernel then makes loopNpK block
// devices with dynamic numbers of major 259 (blkext), which the container
// cannot see: its /dev is a tmpfs with only the nodes it was given, and its
// device cgroup allows only its leased loop devices.
//
// Allowing all of major 259 would be simpler and wrong: NVMe namespaces and
// their partitions share that major, so with CAP_MKNOD the container could
// open every NVMe disk of the host. Instead the keeper watches its own
// devices and, for exactly their partitions, creates the node in the
// container's /dev and allows exactly that number in its device cgroup,
// and takes both away again when the partition goes (pkg/devcgroup: the
// v1 devices controller, or on cgroup v2 runc's eBPF filter replaced by
// one with the partitions added, and systemd's DeviceAllow list).

// partitionSync mirrors the partitions of the leased devices into one
// container.
type partitionSync struct {
	pid     int
	devs    []loopdev.Device
	host    loopdev.Host
	log     *slog.Logger
	access  devcgroup.Access         // nil: partitions stay invisible
	devDir  func() (int, error)      // opens the container's /dev (containerDev)
	known   map[string]devcgroup.Dev // "loop0p1" -> its number, as made and allowed
	synced  bool                     // known matches the container
	lastErr string                   // last Set error logged, to log each once
}

func newPartitionSync(pid int, devs []loopdev.Device, opts devcgroup.Options, log *slog.Logger) *partitionSync {
	ps := &partitionSync{pid: pid, devs: devs, host: loopdev.DefaultHost(), log: log, known: map[string]devcgroup.Dev{}}
	ps.devDir = ps.containerDev
	access, err := devcgroup.Open(pid, opts)
	if err != nil {
		log.Warn("partition nodes: cannot change the container's device cgroup; partitions stay invisible in the container", "err", err)
		return ps
	}
	log.Debug("partition nodes: device cgroup", "access", access.String())
	ps.access = access
	return ps
}

// run syncs until ctx is done, reacting to kernel uevents and checking
// every second in case one was missed.
func (ps *partitionSync) run(ctx context.Context) {
	if ps.access == nil {
		return
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_KOBJECT_UEVENT)
	if err == nil {
		if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: 1}); err != nil {
			unix.Close(fd)
			fd = -1
		}
	} else {
		fd = -1
	}
	if fd >= 0 {
		defer unix.Close(fd)
	}
	// wake ends the wait as soon as ctx is done: the keeper releases
	// the lease only after this returns, and a device it still holds
	// cannot go to the next box.
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		wake = -1
	} else {
		defer unix.Close(wake)
		defer context.AfterFunc(ctx, func() {
			one := []byte{1, 0, 0, 0, 0, 0, 0, 0} // any non-zero uint64
			unix.Write(wake, one)
		})()
	}
	buf := make([]byte, 8192)
	for ctx.Err() == nil {
		ps.sync(ctx)
		if fd < 0 {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		if wake >= 0 {
			fds = append(fds, unix.PollFd{Fd: int32(wake), Events: unix.POLLIN})
		}
		if n, _ := unix.Poll(fds, 1000); n > 0 && fds[0].Revents != 0 {
			// Drain; any block event is a reason to look.
			for {
				m, _, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
				if m <= 0 || err != nil {
					break
				}
			}
		}
	}
}

// sync makes the container's partition nodes and device cgroup match the
// kernel's partitions of the leased devices.
func (ps *partitionSync) sync(ctx context.Context) {
	present := map[string]devcgroup.Dev{}
	for _, d := range ps.devs {
		parts, _ := ps.host.Partitions(d)
		for _, p := range parts {
			name := fmt.Sprintf("%sp%d", d.Name(), p)
			maj, min, err := partitionNumber(name)
			if err != nil {
				continue // gone again since the listing
			}
			present[name] = devcgroup.Dev{Major: maj, Minor: min}
		}
	}
	// Partition numbers (major 259) are given out host-wide as
	// partitions come: one that went and came back between two looks
	// (a re-read partition table) may have another number now, and a
	// node with the old one answers ENXIO. Its node goes, and is made
	// again below.
	if ps.synced && maps.Equal(present, ps.known) {
		return
	}
	for name, d := range ps.known {
		if nd, ok := present[name]; !ok || nd != d {
			ps.unlink(name)
			delete(ps.known, name)
		}
	}
	allowed := slices.Collect(maps.Values(present))
	if err := ps.access.Set(ctx, allowed); err != nil {
		if msg := err.Error(); msg != ps.lastErr {
			ps.log.Warn("partition nodes: device cgroup", "access", ps.access.String(), "err", err)
			ps.lastErr = msg
		}
		ps.synced = false // try again at the next look
		return
	}
	ps.lastErr = ""
	for name, d := range present {
		if _, ok := ps.known[name]; ok {
			continue
		}
		if err := ps.mknod(name, d); err != nil {
			ps.log.Warn("partition node", "node", name, "err", err)
			continue
		}
		ps.log.Debug("partition node added", "node", name, "rule", d.String())
		ps.known[name] = d
	}
	ps.synced = len(ps.known) == len(present)
}

func partitionNumber(name string) (uint32, uint32, error) {
	b, err := os.ReadFile(filepath.Join("/sys/class/block", name, "dev"))
	if err != nil {
		return 0, 0, err
	}
	var maj, min uint32
	if _, err := fmt.Sscanf(strings.TrimSpace(string(b)), "%d:%d", &maj, &min); err != nil {
		return 0, 0, err
	}
	return maj, min, nil
}

// containerDev opens the container's /dev. RESOLVE_IN_ROOT makes every
// symlink resolve inside the container's root, so a container that
// replaces /dev with a link cannot make us create nodes on the host.
func (ps *partitionSync) containerDev() (int, error) {
	root, err := unix.Open(fmt.Sprintf("/proc/%d/root", ps.pid), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	defer unix.Close(root)
	return unix.Openat2(root, "dev", &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
	})
}

func (ps *partitionSync) mknod(name string, d devcgroup.Dev) error {
	dev, err := ps.devDir()
	if err != nil {
		return err
	}
	defer unix.Close(dev)
	num := int(unix.Mkdev(d.Major, d.Minor))
	err = unix.Mknodat(dev, name, unix.S_IFBLK|0o660, num)
	if errors.Is(err, unix.EEXIST) {
		// Left from a partition that came and went: replace it.
		unix.Unlinkat(dev, name, 0)
		err = unix.Mknodat(dev, name, unix.S_IFBLK|0o660, num)
	}
	if err != nil {
		return fmt.Errorf("mknod %s: %w", name, err)
	}
	return nil
}

func (ps *partitionSync) unlink(name string) {
	if dev, err := ps.devDir(); err == nil {
		unix.Unlinkat(dev, name, 0)
		unix.Close(dev)
	}
}
