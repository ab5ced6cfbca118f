package loopdev

import (
	"context"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// watcher wakes a waiting Acquire when a lease or a queue entry goes away.
// A holder that exits, cleanly or not, closes its lease file, which the
// kernel reports as IN_CLOSE_WRITE; a waiter that leaves deletes its queue
// entry. The periodic timeout only covers events lost to queue overflow.
type watcher struct {
	fd int
}

const watchMask = unix.IN_CLOSE_WRITE | unix.IN_DELETE | unix.IN_MOVED_FROM | unix.IN_Q_OVERFLOW

func newWatcher(dirs ...string) (*watcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("inotify: %w", err)
	}
	for _, d := range dirs {
		if _, err := unix.InotifyAddWatch(fd, d, watchMask); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("watch %s: %w", d, err)
		}
	}
	return &watcher{fd: fd}, nil
}

// wait blocks until something changed, the period passed, or ctx is done.
func (w *watcher) wait(ctx context.Context, period time.Duration) error {
	deadline := time.Now().Add(period)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		left := time.Until(deadline)
		if left <= 0 {
			return ctx.Err()
		}
		// Wake at least every 100ms to notice cancellation.
		ms := min(int(left/time.Millisecond)+1, 100)
		fds := []unix.PollFd{{Fd: int32(w.fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, ms)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("poll inotify: %w", err)
		}
		if n > 0 {
			w.drain()
			return nil
		}
	}
}

func (w *watcher) drain() {
	var buf [4096]byte
	for {
		n, err := unix.Read(w.fd, buf[:])
		if n <= 0 || err != nil {
			return
		}
	}
}

func (w *watcher) Close() error { return unix.Close(w.fd) }
