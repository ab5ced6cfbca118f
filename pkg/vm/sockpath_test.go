package vm

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A state directory too long for a sockaddr_un (a rootless
// $XDG_RUNTIME_DIR with a 64-character id) still gets working sockets.
func TestSocketPathLong(t *testing.T) {
	for _, tc := range []struct {
		name string
		sub  string
	}{
		{"short", "s"},
		{"long", strings.Repeat("x", 64) + "/" + strings.Repeat("y", 64)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), tc.sub)
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			p := SocketPath(dir, MonitorSocket)
			if long := len(filepath.Join(dir, MonitorSocket)) > maxSockPath; long != (p == MonitorSocket) {
				t.Fatalf("SocketPath = %q for a %d-byte path", p, len(filepath.Join(dir, MonitorSocket)))
			}
			l, err := listenIn(dir, MonitorSocket)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			// QEMU and kiwi-sharefs reach it by SocketPath from the state
			// directory.
			t.Chdir(dir)
			if c, err := net.Dial("unix", p); err != nil {
				t.Fatalf("dial %s from the state directory: %v", p, err)
			} else {
				c.Close()
			}
			go func() {
				l.Accept() // the SocketPath dial
				if c, err := l.Accept(); err == nil {
					c.Write([]byte("hi"))
					c.Close()
				}
			}()
			t.Chdir("/") // a client elsewhere
			c, err := dialIn(dir, MonitorSocket, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			buf := make([]byte, 2)
			if _, err := c.Read(buf); err != nil || string(buf) != "hi" {
				t.Fatalf("read %q, %v", buf, err)
			}
		})
	}
}
