package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	securejoin "github.com/cyphar/filepath-securejoin"
	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// openPort finds the virtio-serial port with the given name and opens it.
func openPort(name string, timeout time.Duration) (*os.File, error) {
	deadline := time.Now().Add(timeout)
	for {
		ents, _ := os.ReadDir("/sys/class/virtio-ports")
		for _, e := range ents {
			b, err := os.ReadFile(filepath.Join("/sys/class/virtio-ports", e.Name(), "name"))
			if err == nil && strings.TrimSpace(string(b)) == name {
				f, err := os.OpenFile(filepath.Join("/dev", e.Name()), os.O_RDWR, 0)
				if err == nil {
					return f, nil
				}
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("control port %s not found (is virtio_console loaded?)", name)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

const newRoot = "/newroot"

// Mount options of 9p shares. Bind mounts use cache=mmap: coherent with
// the host (which reads the build's results) while still allowing shared
// writable mappings. The root filesystem uses cache=loose: it is the
// container's own and nobody else changes it while the box runs, and
// caching its pages and dentries in the guest is what makes thousands of
// process starts (a debootstrap) bearable over 9p.
const (
	share9pOptions = "trans=virtio,version=9p2000.L,msize=524288,access=client,cache="
	rootCache      = "loose"
	bindCache      = "mmap"
)

// mountShare mounts the share tag at target. In a guest restored from a
// template the share's device was hot-plugged a moment ago: a mount that
// fails is tried again until wait has passed (0: once).
func mountShare(kind, tag, target string, flags uintptr, cache string, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		err := mountShareOnce(kind, tag, target, flags, cache)
		if err == nil || !time.Now().Before(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func mountShareOnce(kind, tag, target string, flags uintptr, cache string) error {
	switch kind {
	case "virtiofs":
		if err := unix.Mount(tag, target, "virtiofs", flags, ""); err != nil {
			return err
		}
		raiseReadahead(target)
		return nil
	default:
		return unix.Mount(tag, target, "9p", flags, share9pOptions+cache)
	}
}

// shareReadaheadKiB is the readahead of virtio-fs shares. FUSE caps a
// mount's readahead at the kernel's default (128 KiB) whatever the file
// server offers, so a sequential read over a share goes in 128 KiB
// requests, each a round trip through the host; kiwi-sharefs takes 1 MiB
// requests (max_write, max_pages).
const shareReadaheadKiB = 1024

// raiseReadahead sets the readahead of the FUSE connection mounted at
// target. A failure only costs speed: it is ignored.
func raiseReadahead(target string) {
	var st unix.Stat_t
	if unix.Stat(target, &st) != nil {
		return
	}
	bdi := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	os.WriteFile(bdi, []byte(strconv.Itoa(shareReadaheadKiB)), 0o644)
}

// setupRoot mounts the container's root and its mounts, then makes it the
// root of this process, so that every process started later lives in it.
func setupRoot(cfg *vmproto.Config) error {
	if err := os.MkdirAll(newRoot, 0o755); err != nil {
		return err
	}
	var flags uintptr
	if cfg.RootReadonly {
		flags |= unix.MS_RDONLY
	}
	wait := hotplugWait(cfg)
	if err := mountShare(cfg.RootShare, cfg.RootTag, newRoot, flags, rootCache, wait); err != nil {
		return fmt.Errorf("mount root share %s (%s): %w", cfg.RootTag, cfg.RootShare, err)
	}
	for i, m := range cfg.Mounts {
		if err := mountOne(i, m, cfg.RootShare, wait); err != nil {
			return fmt.Errorf("mount %s (%s): %w", m.Destination, m.Type, err)
		}
	}
	if err := devLinks(cfg.Mounts); err != nil {
		return err
	}
	for _, d := range cfg.Devices {
		if err := makeDevice(d); err != nil {
			return fmt.Errorf("device %s: %w", d.Path, err)
		}
	}
	// runc's order: sysctls, then read-only paths, then masked ones.
	if err := applySysctl(cfg.Sysctl); err != nil {
		return err
	}
	if err := atTargets(cfg.ReadonlyPaths, "readonly path", readonlyPath); err != nil {
		return err
	}
	if err := atTargets(cfg.MaskedPaths, "masked path", maskPath); err != nil {
		return err
	}
	if cfg.Hostname != "" {
		if err := unix.Sethostname([]byte(cfg.Hostname)); err != nil {
			return fmt.Errorf("sethostname: %w", err)
		}
	}
	if err := os.Chdir(newRoot); err != nil {
		return err
	}
	if err := unix.Mount(newRoot, "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move root: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	if err := os.Chdir("/"); err != nil {
		return err
	}
	if cfg.RootPropagation != "" {
		prop, ok := propagationFlags[cfg.RootPropagation]
		if !ok {
			return fmt.Errorf("unknown rootfsPropagation %q", cfg.RootPropagation)
		}
		if err := unix.Mount("", "/", "", prop, ""); err != nil {
			return fmt.Errorf("rootfsPropagation %s: %w", cfg.RootPropagation, err)
		}
	}
	return nil
}

// devLinks makes the symbolic links the OCI runtime spec puts in a
// container's /dev, when /dev is the guest's devtmpfs (where the box's
// loop and partition nodes appear): /dev/fd, stdin, stdout, stderr, and
// /dev/ptmx pointing into the container's own devpts instance.
func devLinks(mounts []vmproto.Mount) error {
	dev, pts := false, false
	for _, m := range mounts {
		dev = dev || m.Destination == "/dev" && m.Type == "devtmpfs"
		pts = pts || m.Destination == "/dev/pts" && m.Type == "devpts"
	}
	if !dev {
		return nil
	}
	devDir, err := target("/dev")
	if err != nil {
		return err
	}
	links := [][2]string{{"/proc/self/fd", "fd"}, {"/proc/self/fd/0", "stdin"}, {"/proc/self/fd/1", "stdout"}, {"/proc/self/fd/2", "stderr"}}
	if pts {
		if err := os.Remove(filepath.Join(devDir, "ptmx")); err != nil && !os.IsNotExist(err) {
			return fmt.Errorf("/dev/ptmx: %w", err)
		}
		links = append(links, [2]string{"pts/ptmx", "ptmx"})
	}
	for _, l := range links {
		if err := os.Symlink(l[0], filepath.Join(devDir, l[1])); err != nil && !os.IsExist(err) {
			return fmt.Errorf("/dev/%s: %w", l[1], err)
		}
	}
	return nil
}

// atTargets applies fn to each container path, resolved in the new root.
func atTargets(paths []string, what string, fn func(string) error) error {
	for _, p := range paths {
		t, err := target(p)
		if err == nil {
			err = fn(t)
		}
		if err != nil {
			return fmt.Errorf("%s %s: %w", what, p, err)
		}
	}
	return nil
}

// makeDevice makes a linux.devices node in the container's /dev. A node
// that is already there (the guest's devtmpfs has the usual ones) is kept
// when it is the same device, and replaced otherwise.
func makeDevice(d vmproto.Device) error {
	var kind uint32
	switch d.Type {
	case "c", "u":
		kind = unix.S_IFCHR
	case "b":
		kind = unix.S_IFBLK
	case "p":
		kind = unix.S_IFIFO
	default:
		return fmt.Errorf("unknown device type %q", d.Type)
	}
	if !filepath.IsAbs(d.Path) {
		return errors.New("not an absolute path")
	}
	mode := uint32(0o666)
	if d.Mode != nil {
		mode = *d.Mode & 0o7777
	}
	var rdev int
	if kind != unix.S_IFIFO {
		rdev = int(unix.Mkdev(uint32(d.Major), uint32(d.Minor)))
	}
	// The node's directory is resolved in the new root; the node itself
	// is what is at that name, link or not.
	dir, err := target(filepath.Dir(d.Path))
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	p := filepath.Join(dir, filepath.Base(d.Path))
	var st unix.Stat_t
	switch err := unix.Lstat(p, &st); {
	case err == nil && st.Mode&unix.S_IFMT == kind && (kind == unix.S_IFIFO || int(st.Rdev) == rdev):
	case err == nil || !errors.Is(err, unix.ENOENT):
		if err := os.Remove(p); err != nil {
			return err
		}
		fallthrough
	default:
		if err := unix.Mknod(p, kind|mode, rdev); err != nil {
			return fmt.Errorf("mknod: %w", err)
		}
	}
	// The mode again: mknod's is subject to the umask.
	if err := unix.Chmod(p, mode); err != nil {
		return err
	}
	uid, gid := -1, -1
	if d.UID != nil {
		uid = int(*d.UID)
	}
	if d.GID != nil {
		gid = int(*d.GID)
	}
	return unix.Lchown(p, uid, gid)
}

// applySysctl sets kernel parameters: the guest's kernel is the
// container's alone.
func applySysctl(sysctl map[string]string) error {
	for k, v := range sysctl {
		if strings.Contains(k, "..") || strings.HasPrefix(k, "/") {
			return fmt.Errorf("sysctl %q: not a parameter name", k)
		}
		p := filepath.Join("/proc/sys", strings.ReplaceAll(k, ".", "/"))
		if err := os.WriteFile(p, []byte(v), 0o644); err != nil {
			return fmt.Errorf("sysctl %s=%s: %w", k, v, err)
		}
	}
	return nil
}

// readonlyPath makes p read-only by a read-only bind mount of itself; a
// path the image does not have is left alone.
func readonlyPath(p string) error {
	if err := unix.Mount(p, p, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return err
	}
	var st unix.Statfs_t
	if err := unix.Statfs(p, &st); err != nil {
		return err
	}
	// Keep the flags the mount has (nosuid, nodev, ...): a bind remount
	// that drops a locked one fails.
	keep := uintptr(st.Flags) & (unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC)
	return unix.Mount("", p, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_REC|keep, "")
}

// maskPath hides p: /dev/null over a file, an empty read-only tmpfs over
// a directory; a path the image does not have is left alone.
func maskPath(p string) error {
	fi, err := os.Stat(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.IsDir() {
		return unix.Mount("tmpfs", p, "tmpfs", unix.MS_RDONLY, "")
	}
	return unix.Mount("/dev/null", p, "", unix.MS_BIND, "")
}

// target resolves a container path under the new root, following the
// image's symbolic links as the container will see them: an absolute
// link (/var/run -> /run) names a place in the new root, never in the
// initramfs that is this process's root while it sets up. Missing
// components are kept as they are, to be made.
func target(dest string) (string, error) {
	p, err := securejoin.SecureJoin(newRoot, dest)
	if err != nil {
		return "", fmt.Errorf("resolve %s in the container's root: %w", dest, err)
	}
	return p, nil
}

// mountOne makes one of the container's mounts, then gives it the
// propagation its options ask for (a separate mount call: with a
// propagation flag, mount(2) changes nothing else).
func mountOne(i int, m vmproto.Mount, share string, wait time.Duration) error {
	flags, data := parseOptions(m.Options)
	dst, err := target(m.Destination)
	if err != nil {
		return err
	}
	if err := mountAt(i, m, share, dst, flags, data, wait); err != nil {
		return err
	}
	if prop := propagation(m.Options); prop != 0 && m.Type != "cgroup" && m.Type != "cgroup2" {
		if err := unix.Mount("", dst, "", prop, ""); err != nil {
			return fmt.Errorf("propagation: %w", err)
		}
	}
	return nil
}

func mountAt(i int, m vmproto.Mount, share, dst string, flags uintptr, data string, wait time.Duration) error {
	switch m.Type {
	case "share":
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return err
		}
		return mountShare(share, m.Tag, dst, flags&^(unix.MS_BIND|unix.MS_REC), bindCache, wait)
	case "file":
		// A host file (resolv.conf, hosts, ...) arrives by value: put it
		// on a guest tmpfs and bind it over its place, so that nothing is
		// written into the shared image.
		src := fmt.Sprintf("/run/kiwi-files/%d", i)
		if err := os.MkdirAll(filepath.Dir(src), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(src, m.Content, 0o644); err != nil {
			return err
		}
		if err := ensureFile(dst); err != nil {
			return err
		}
		if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
			return err
		}
		if flags&unix.MS_RDONLY != 0 {
			return unix.Mount("", dst, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, "")
		}
		return nil
	case "disk":
		dev, err := findDisk(m.Source, max(10*time.Second, wait))
		if err != nil {
			return err
		}
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return err
		}
		return unix.Mount(dev, dst, "ext4", flags, "")
	case "cgroup", "cgroup2":
		// The VM's own cgroups are not the container's business; best
		// effort only.
		os.MkdirAll(dst, 0o755)
		unix.Mount("cgroup2", dst, "cgroup2", flags, "")
		return nil
	default:
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return err
		}
		src := m.Source
		if src == "" {
			src = m.Type
		}
		return unix.Mount(src, dst, m.Type, flags, data)
	}
}

// findDisk returns the device node of the virtio-blk disk with the given
// serial number, waiting for the driver to probe it.
func findDisk(serial string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		ents, _ := os.ReadDir("/sys/block")
		for _, e := range ents {
			b, err := os.ReadFile(filepath.Join("/sys/block", e.Name(), "serial"))
			if err == nil && strings.TrimSpace(string(b)) == serial {
				return filepath.Join("/dev", e.Name()), nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no disk with serial %q (is virtio_blk loaded?)", serial)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func ensureFile(p string) error {
	if _, err := os.Stat(p); err == nil {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	return f.Close()
}

var optionFlags = map[string]uintptr{
	"ro": unix.MS_RDONLY, "nosuid": unix.MS_NOSUID, "nodev": unix.MS_NODEV,
	"noexec": unix.MS_NOEXEC, "sync": unix.MS_SYNCHRONOUS, "dirsync": unix.MS_DIRSYNC,
	"noatime": unix.MS_NOATIME, "nodiratime": unix.MS_NODIRATIME, "relatime": unix.MS_RELATIME,
	"strictatime": unix.MS_STRICTATIME, "bind": unix.MS_BIND, "rbind": unix.MS_BIND | unix.MS_REC,
}

// propagationFlags are the mount propagation words.
var propagationFlags = map[string]uintptr{
	"shared": unix.MS_SHARED, "rshared": unix.MS_SHARED | unix.MS_REC,
	"slave": unix.MS_SLAVE, "rslave": unix.MS_SLAVE | unix.MS_REC,
	"private": unix.MS_PRIVATE, "rprivate": unix.MS_PRIVATE | unix.MS_REC,
	"unbindable": unix.MS_UNBINDABLE, "runbindable": unix.MS_UNBINDABLE | unix.MS_REC,
}

// propagation is the propagation the options ask for, 0 for none; the
// last word wins, as in runc.
func propagation(opts []string) uintptr {
	var prop uintptr
	for _, o := range opts {
		if f, ok := propagationFlags[o]; ok {
			prop = f
		}
	}
	return prop
}

// ignoredOptions are the words that make no sense for a mount made fresh
// inside the VM, and the propagation words (applied after the mount).
var ignoredOptions = map[string]bool{
	"rw": true, "suid": true, "dev": true, "exec": true, "atime": true, "private": true,
	"rprivate": true, "shared": true, "rshared": true, "slave": true, "rslave": true,
	"unbindable": true, "runbindable": true, "async": true, "nocopyup": true, "copy": true,
	"notmpcopyup": true, "tmpcopyup": true, "Z": true, "z": true,
}

func parseOptions(opts []string) (uintptr, string) {
	var flags uintptr
	var data []string
	for _, o := range opts {
		if f, ok := optionFlags[o]; ok {
			flags |= f
		} else if !ignoredOptions[o] {
			data = append(data, o)
		}
	}
	return flags, strings.Join(data, ",")
}

var rlimitTypes = map[string]int{
	"RLIMIT_AS": unix.RLIMIT_AS, "RLIMIT_CORE": unix.RLIMIT_CORE, "RLIMIT_CPU": unix.RLIMIT_CPU,
	"RLIMIT_DATA": unix.RLIMIT_DATA, "RLIMIT_FSIZE": unix.RLIMIT_FSIZE, "RLIMIT_LOCKS": 10,
	"RLIMIT_MEMLOCK": unix.RLIMIT_MEMLOCK, "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13,
	"RLIMIT_NOFILE": unix.RLIMIT_NOFILE, "RLIMIT_NPROC": unix.RLIMIT_NPROC, "RLIMIT_RSS": unix.RLIMIT_RSS,
	"RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15, "RLIMIT_SIGPENDING": 11, "RLIMIT_STACK": unix.RLIMIT_STACK,
}

// applyRlimits sets the limits on init itself; every process it starts
// inherits them.
func applyRlimits(rl []vmproto.Rlimit) error {
	for _, r := range rl {
		t, ok := rlimitTypes[r.Type]
		if !ok {
			return fmt.Errorf("unknown rlimit %s", r.Type)
		}
		if err := unix.Setrlimit(t, &unix.Rlimit{Cur: r.Soft, Max: r.Hard}); err != nil {
			return fmt.Errorf("setrlimit %s: %w", r.Type, err)
		}
	}
	return nil
}
