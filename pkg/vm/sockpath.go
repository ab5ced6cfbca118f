package vm

import (
	"fmt"
	"net"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// maxSockPath is the longest socket path a sockaddr_un holds (108 bytes
// including the terminating NUL).
const maxSockPath = 107

// SocketPath returns how QEMU and kiwi-sharefs name the socket dir/name:
// the absolute path when it fits in a sockaddr_un, else the bare name,
// which they resolve in their working directory, the state directory (a
// state directory below a long $XDG_RUNTIME_DIR with a 64-character
// container id does not fit).
func SocketPath(dir, name string) string {
	if p := filepath.Join(dir, name); len(p) <= maxSockPath {
		return p
	}
	return name
}

// listenIn listens on the socket dir/name from any working directory, as
// dialIn connects to it. The socket file is not removed on Close (its
// name may go through a descriptor that is closed by then); it goes with
// the state directory.
func listenIn(dir, name string) (*net.UnixListener, error) {
	addr, release, err := sockAddr(dir, name)
	if err != nil {
		return nil, err
	}
	defer release()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: addr, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", filepath.Join(dir, name), err)
	}
	l.SetUnlinkOnClose(false)
	return l, nil
}

// dialIn connects to the socket dir/name from any working directory: by
// its path when that fits, else through the directory's descriptor
// (/proc/self/fd/N/name).
func dialIn(dir, name string, timeout time.Duration) (net.Conn, error) {
	addr, release, err := sockAddr(dir, name)
	if err != nil {
		return nil, err
	}
	defer release()
	return net.DialTimeout("unix", addr, timeout)
}

// sockAddr returns an address for the socket dir/name that fits in a
// sockaddr_un from any working directory: its path, or a name through the
// directory's descriptor (/proc/self/fd/N/name), valid until release.
func sockAddr(dir, name string) (addr string, release func(), err error) {
	if p := filepath.Join(dir, name); len(p) <= maxSockPath {
		return p, func() {}, nil
	}
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", nil, fmt.Errorf("open %s: %w", dir, err)
	}
	return fmt.Sprintf("/proc/self/fd/%d/%s", fd, name), func() { unix.Close(fd) }, nil
}
