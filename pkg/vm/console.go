package vm

import (
	"fmt"
	"os"
	"time"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/fdutil"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// OpenConsole makes a pty pair, hands the master to the console socket
// (as runc does for conmon and containerd) and returns the slave in raw
// mode: the guest's own pty does the terminal processing, the host side
// only carries bytes.
func OpenConsole(socket string, rows, cols uint16) (*os.File, error) {
	master, slave, err := pty.Open()
	if err != nil {
		return nil, fmt.Errorf("open pty: %w", err)
	}
	defer master.Close()
	if err := makeRaw(slave); err != nil {
		slave.Close()
		return nil, err
	}
	if rows > 0 && cols > 0 {
		pty.Setsize(master, &pty.Winsize{Rows: rows, Cols: cols})
	}
	if err := fdutil.SendFd(socket, master); err != nil {
		slave.Close()
		return nil, fmt.Errorf("send pty to console socket %s: %w", socket, err)
	}
	return slave, nil
}

func makeRaw(f *os.File) error {
	t, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	if err != nil {
		return fmt.Errorf("pty termios: %w", err)
	}
	t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	t.Oflag &^= unix.OPOST
	t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Cflag &^= unix.CSIZE | unix.PARENB
	t.Cflag |= unix.CS8
	t.Cc[unix.VMIN], t.Cc[unix.VTIME] = 1, 0
	return unix.IoctlSetTermios(int(f.Fd()), unix.TCSETS, t)
}

// WatchWinsize polls the size of tty, which the holder of the master
// (conmon) changes, and reports each change until send fails or the tty
// goes away. Polling is used because the slave's holder is not the
// terminal's session leader and gets no SIGWINCH.
func WatchWinsize(tty *os.File, send func(vmproto.Resize) error) {
	var last *unix.Winsize
	for {
		ws, err := unix.IoctlGetWinsize(int(tty.Fd()), unix.TIOCGWINSZ)
		if err != nil {
			return
		}
		if last == nil || *ws != *last {
			if send(vmproto.Resize{Rows: ws.Row, Cols: ws.Col}) != nil {
				return
			}
			last = ws
		}
		time.Sleep(250 * time.Millisecond)
	}
}
