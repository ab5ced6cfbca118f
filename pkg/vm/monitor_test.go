package vm

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// A guest that breaks the control protocol gets its box stopped with a
// message and status 1; a guest that powers off (EOF) does not.
func TestReadGuestProtocolError(t *testing.T) {
	for _, tc := range []struct {
		name    string
		send    func(w io.WriteCloser)
		stopped bool
	}{
		{"unknown frame type", func(w io.WriteCloser) { w.Write([]byte{99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}) }, true},
		{"oversized frame", func(w io.WriteCloser) {
			w.Write([]byte{byte(vmproto.TStdout), 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f})
		}, true},
		{"stdout then poweroff", func(w io.WriteCloser) {
			vmproto.NewWriter(w).Write(vmproto.TStdout, 0, []byte("hello\n"))
			w.Close()
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			host, guest := net.Pipe()
			var out, errb bytes.Buffer
			m := &monitor{log: slog.New(slog.NewTextHandler(io.Discard, nil)), out: &out, err: &errb}
			stopped := false
			done := make(chan struct{})
			go func() { m.readGuest(host, func() { stopped = true }); close(done) }()
			tc.send(guest)
			<-done
			guest.Close()
			if stopped != tc.stopped {
				t.Fatalf("stopped = %v, want %v (stderr %q)", stopped, tc.stopped, errb.String())
			}
			if tc.stopped && (!strings.Contains(errb.String(), "broke the control protocol") || m.exit != 1) {
				t.Fatalf("stderr %q, exit %d", errb.String(), m.exit)
			}
			if !tc.stopped && out.String() != "hello\n" {
				t.Fatalf("stdout %q", out.String())
			}
		})
	}
}
