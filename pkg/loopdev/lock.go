package loopdev

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Leases are open-file-description (OFD) locks: like flock they belong to an
// open file, so the kernel drops them when the last process holding that
// file exits, however it exits; unlike flock they can be tested without
// being taken (F_OFD_GETLK), which lets status and the queue look at a lock
// without racing the process that is about to take it.

func wholeFile(typ int16) *unix.Flock_t {
	return &unix.Flock_t{Type: typ, Whence: 0, Start: 0, Len: 0}
}

// tryLock takes an exclusive lock on f without waiting. It reports false
// when another open file holds it.
func tryLock(f *os.File) (bool, error) {
	err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, wholeFile(unix.F_WRLCK))
	if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	return true, nil
}

// lockWait takes an exclusive lock on f, waiting for it.
func lockWait(f *os.File) error {
	for {
		err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLKW, wholeFile(unix.F_WRLCK))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("lock %s: %w", f.Name(), err)
		}
		return nil
	}
}

// unlock drops the lock taken on f.
func unlock(f *os.File) error {
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, wholeFile(unix.F_UNLCK)); err != nil {
		return fmt.Errorf("unlock %s: %w", f.Name(), err)
	}
	return nil
}

// heldElsewhere reports whether some open file other than our own holds a
// lock on path. The file is opened read-only so that looking does not wake
// the inotify watchers that wait for holders to close their files.
func heldElsewhere(path string) (bool, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, err
	}
	defer f.Close()
	lk := wholeFile(unix.F_WRLCK)
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, lk); err != nil {
		return false, fmt.Errorf("test lock %s: %w", path, err)
	}
	return lk.Type != unix.F_UNLCK, nil
}
