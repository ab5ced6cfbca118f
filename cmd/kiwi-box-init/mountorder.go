package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// A PID namespace's own /proc is mounted by its first process, long after
// setup mounted the container's other file systems, so the kernel lists it
// last in the container's mount table, where runc's container (which
// mounts everything in its own namespaces, in the spec's order) lists it
// in the spec's place. Tools that read mountinfo (the OCI runtime-tools
// check the order) see the difference. mountProc therefore re-attaches
// the mounts that followed the guest's /proc after the new one, in their
// order, which puts the table back in the spec's order.

// moves says which mounts reattach moves.
type moves struct {
	// Paths are the mount points to re-attach, in the table's order.
	Paths []string
	// Unbindable are the mount points among the moved mounts that are
	// unbindable: a clone cannot be made of them (nor of a tree that
	// holds one), so they are made private for the move and unbindable
	// again after it.
	Unbindable []string
}

// mountsAfter returns the mounts to re-attach so that the mounts listed
// after the topmost one at target come after a new mount there: of the
// mounts after it (not counting those inside it), those whose parent is
// not one of them, in the table's order. Each is re-attached with
// everything mounted on it.
func mountsAfter(mounts []*mountinfo.Info, target string) moves {
	at := -1
	for i, m := range mounts {
		if m.Mountpoint == target {
			at = i
		}
	}
	var mv moves
	if at < 0 {
		return mv
	}
	inside := map[int]bool{mounts[at].ID: true}
	later := map[int]bool{}
	var rest []*mountinfo.Info
	for _, m := range mounts[at+1:] {
		if inside[m.Parent] || isBelow(m.Mountpoint, target) {
			inside[m.ID] = true
			continue
		}
		later[m.ID] = true
		rest = append(rest, m)
	}
	for _, m := range rest {
		if !later[m.Parent] {
			mv.Paths = append(mv.Paths, m.Mountpoint)
		}
		if slices.Contains(strings.Fields(m.Optional), "unbindable") {
			mv.Unbindable = append(mv.Unbindable, m.Mountpoint)
		}
	}
	return mv
}

// isBelow reports whether p is dir or lies below it.
func isBelow(p, dir string) bool {
	p, dir = filepath.Clean(p), filepath.Clean(dir)
	return p == dir || strings.HasPrefix(p, dir+"/") || dir == "/"
}

// reattach moves the mounts mv names (with what is mounted on them) to the
// end of this mount namespace's table, keeping their order: each is cloned
// and detached, last first (so that one mounted over another comes off
// first), then the clones are attached in order. A clone keeps its
// mount's flags and propagation (peer group); unbindable mounts are
// private for the move. If a mount cannot be cloned or detached, the
// ones already detached are put back and the error returned.
func reattach(mv moves) (err error) {
	defer func() {
		for _, p := range mv.Unbindable {
			if uerr := unix.Mount("", p, "", unix.MS_UNBINDABLE, ""); uerr != nil && err == nil {
				err = fmt.Errorf("make %s unbindable again: %w", p, uerr)
			}
		}
	}()
	for _, p := range mv.Unbindable {
		if err := unix.Mount("", p, "", unix.MS_PRIVATE, ""); err != nil {
			return fmt.Errorf("%w: make %s private for the move: %w", errOrderKept, p, err)
		}
	}
	return reattachPaths(mv.Paths)
}

// kernelLog writes a line to the guest kernel's log (dmesg), best effort:
// for what is worth knowing but no business of the container's stderr.
func kernelLog(format string, args ...any) {
	f, err := os.OpenFile("/dev/kmsg", os.O_WRONLY, 0)
	if err != nil {
		return
	}
	fmt.Fprintf(f, "<4>kiwi-box-init: "+format+"\n", args...)
	f.Close()
}

// cloneOrder returns the order in which to clone and detach the mounts at
// paths: first to last, so that the clones are made in the table's
// order, which is the order Linux 6.8 and later list a namespace's mounts
// in (by mount ID) whatever their place; or last to first when a later
// mount sits on an earlier one's place or above it (its path is that
// path or a parent of it), which hides the earlier one until the later
// one is detached (those clones then list in reverse on 6.8+).
func cloneOrder(paths []string) []int {
	order := make([]int, len(paths))
	reverse := false
	for i := range paths {
		order[i] = i
		for _, later := range paths[i+1:] {
			reverse = reverse || isBelow(paths[i], later)
		}
	}
	if reverse {
		slices.Reverse(order)
	}
	return order
}

// reattachPaths clones, detaches and attaches again the mounts at paths.
func reattachPaths(paths []string) error {
	fds := make([]int, len(paths))
	for i := range fds {
		fds[i] = -1
	}
	defer func() {
		for _, fd := range fds {
			if fd >= 0 {
				unix.Close(fd)
			}
		}
	}()
	attach := func() error {
		for i, p := range paths {
			if fds[i] < 0 {
				continue
			}
			if err := unix.MoveMount(fds[i], "", unix.AT_FDCWD, p, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
				return fmt.Errorf("attach %s again: %w", p, err)
			}
		}
		return nil
	}
	for _, i := range cloneOrder(paths) {
		p := paths[i]
		fd, err := unix.OpenTree(unix.AT_FDCWD, p, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_RECURSIVE)
		if err != nil {
			return restore(fmt.Errorf("clone the mounts at %s: %w", p, err), attach)
		}
		if err := unix.Unmount(p, unix.MNT_DETACH); err != nil {
			unix.Close(fd)
			return restore(fmt.Errorf("detach %s: %w", p, err), attach)
		}
		fds[i] = fd
	}
	return attach()
}

// errOrderKept marks a failed move after which every mount was put back:
// the container's mounts are all there, in the old order.
var errOrderKept = errors.New("the mount table keeps its order")

// restore puts back what was detached and returns err, marked
// errOrderKept if that worked, with the restore's failure if not.
func restore(err error, attach func() error) error {
	if rerr := attach(); rerr != nil {
		return fmt.Errorf("%w (and %w)", err, rerr)
	}
	return fmt.Errorf("%w: %w", errOrderKept, err)
}
