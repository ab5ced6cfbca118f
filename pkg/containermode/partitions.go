package containermode

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

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
// and takes both away again when the partition goes.

// partitionSync mirrors the partitions of the leased devices into one
// container.
type partitionSync struct {
	pid    int
	devs   []loopdev.Device
	host   loopdev.Host
	log    *slog.Logger
	cgroup string            // devices cgroup directory (v1), "" if none
	known  map[string]string // "loop0p1" -> the cgroup rule allowed for it
}

func newPartitionSync(pid int, devs []loopdev.Device, log *slog.Logger) *partitionSync {
	ps := &partitionSync{pid: pid, devs: devs, host: loopdev.DefaultHost(), log: log, known: map[string]string{}}
	cg, err := devicesCgroup(pid)
	if err != nil {
		log.Warn("partition nodes: no devices cgroup; partitions stay invisible in the container", "err", err)
	}
	ps.cgroup = cg
	return ps
}

// devicesCgroup finds the cgroup v1 devices directory of pid.
func devicesCgroup(pid int) (string, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			if c == "devices" {
				dir := filepath.Join("/sys/fs/cgroup/devices", filepath.Clean("/"+parts[2]))
				if _, err := os.Stat(filepath.Join(dir, "devices.allow")); err != nil {
					return "", err
				}
				return dir, nil
			}
		}
	}
	return "", errors.New("cgroup v2 device filters are eBPF programs owned by runc; not supported yet")
}

// run syncs until ctx is done, reacting to kernel uevents and checking
// every second in case one was missed.
func (ps *partitionSync) run(ctx context.Context) {
	if ps.cgroup == "" {
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
	buf := make([]byte, 8192)
	for ctx.Err() == nil {
		ps.sync()
		if fd < 0 {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		if n, _ := unix.Poll(fds, 1000); n > 0 {
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

// sync makes the container's partition nodes match the kernel's.
func (ps *partitionSync) sync() {
	present := map[string]bool{}
	for _, d := range ps.devs {
		parts, _ := ps.host.Partitions(d)
		for _, p := range parts {
			name := fmt.Sprintf("%sp%d", d.Name(), p)
			present[name] = true
			maj, min, err := partitionNumber(name)
			if err != nil {
				continue // gone again since the listing
			}
			// Partition numbers (major 259) are given out host-wide as
			// partitions come: one that went and came back between two
			// looks (a re-read partition table) may have another number
			// now, and a node with the old one answers ENXIO.
			old, ok := ps.known[name]
			if ok && old == blockRule(maj, min) {
				continue
			}
			if ok {
				ps.remove(name, old)
				delete(ps.known, name)
			}
			rule, err := ps.add(name, maj, min)
			if err != nil {
				ps.log.Warn("partition node", "node", name, "err", err)
				continue
			}
			ps.known[name] = rule
		}
	}
	for name, rule := range ps.known {
		if !present[name] {
			ps.remove(name, rule)
			delete(ps.known, name)
		}
	}
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

// blockRule is the devices cgroup rule for one block device.
func blockRule(maj, min uint32) string { return fmt.Sprintf("b %d:%d rwm", maj, min) }

func (ps *partitionSync) add(name string, maj, min uint32) (string, error) {
	rule := blockRule(maj, min)
	dev, err := ps.containerDev()
	if err != nil {
		return "", err
	}
	defer unix.Close(dev)
	err = unix.Mknodat(dev, name, unix.S_IFBLK|0o660, int(unix.Mkdev(maj, min)))
	if errors.Is(err, unix.EEXIST) {
		// Left from a partition that came and went: replace it.
		unix.Unlinkat(dev, name, 0)
		err = unix.Mknodat(dev, name, unix.S_IFBLK|0o660, int(unix.Mkdev(maj, min)))
	}
	if err != nil {
		return "", fmt.Errorf("mknod %s: %w", name, err)
	}
	if err := os.WriteFile(filepath.Join(ps.cgroup, "devices.allow"), []byte(rule), 0); err != nil {
		unix.Unlinkat(dev, name, 0)
		return "", fmt.Errorf("allow %s: %w", rule, err)
	}
	ps.log.Debug("partition node added", "node", name, "rule", rule)
	return rule, nil
}

func (ps *partitionSync) remove(name, rule string) {
	if dev, err := ps.containerDev(); err == nil {
		unix.Unlinkat(dev, name, 0)
		unix.Close(dev)
	}
	// The number may be given to another device's partition next: deny it.
	os.WriteFile(filepath.Join(ps.cgroup, "devices.deny"), []byte(rule), 0)
}
