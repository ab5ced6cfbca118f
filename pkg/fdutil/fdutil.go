// Package fdutil handles file descriptors a runtime inherits from its
// caller (conmon's pipes, --preserve-fds) when it starts long-lived helper
// processes that must not hold them.
package fdutil

import (
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// WithInheritedHidden runs fn with every inherited descriptor above stderr
// marked close-on-exec, so that a long-lived helper started by fn never
// holds the caller's pipes or the container's --preserve-fds open. The
// marks are undone afterwards for whoever needs the descriptors next.
func WithInheritedHidden(fn func() error) error {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return fn()
	}
	var marked []int
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd < 3 {
			continue
		}
		flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
		if err != nil || flags&unix.FD_CLOEXEC != 0 {
			continue
		}
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, flags|unix.FD_CLOEXEC); err == nil {
			marked = append(marked, fd)
		}
	}
	defer func() {
		for _, fd := range marked {
			if flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil {
				unix.FcntlInt(uintptr(fd), unix.F_SETFD, flags&^unix.FD_CLOEXEC)
			}
		}
	}()
	return fn()
}

// SendFd sends f over the unix socket at path, the way runc hands a pty
// master to the --console-socket.
func SendFd(path string, f *os.File) error {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Connect(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		return err
	}
	return unix.Sendmsg(fd, []byte(f.Name()), unix.UnixRights(int(f.Fd())), nil, 0)
}
