package vmproto

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	if err := w.WriteJSON(TExec, 7, Process{Args: []string{"sh"}, Cwd: "/"}); err != nil {
		t.Fatal(err)
	}
	if err := w.Write(TStdout, 7, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := w.Write(TStdin, 7, nil); err != nil {
		t.Fatal(err)
	}
	f, err := ReadFrame(&buf)
	if err != nil || f.Type != TExec || f.Stream != 7 {
		t.Fatalf("frame %+v, %v", f, err)
	}
	var p Process
	if err := Decode(f.Payload, &p); err != nil || p.Args[0] != "sh" {
		t.Fatalf("process %+v, %v", p, err)
	}
	if f, err = ReadFrame(&buf); err != nil || string(f.Payload) != "hello" {
		t.Fatalf("stdout frame %+v, %v", f, err)
	}
	if f, err = ReadFrame(&buf); err != nil || f.Type != TStdin || len(f.Payload) != 0 {
		t.Fatalf("EOF frame %+v, %v", f, err)
	}
	if _, err = ReadFrame(&buf); err != io.EOF {
		t.Fatalf("after last frame: %v, want EOF", err)
	}
}

func header(t Type, stream, n uint32) []byte {
	h := make([]byte, HeaderSize)
	h[0] = byte(t)
	binary.LittleEndian.PutUint32(h[4:8], stream)
	binary.LittleEndian.PutUint32(h[8:12], n)
	return h
}

func TestReadFrameRejects(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []byte
		want error
	}{
		{"too large", header(TStdout, 0, MaxPayload+1), ErrTooLarge},
		{"unknown type", header(99, 0, 0), nil},
		{"zero type", header(0, 0, 0), nil},
		{"reserved set", append([]byte{byte(TStdout), 1}, make([]byte, 10)...), nil},
		{"short payload", append(header(TStdout, 0, 10), 'x'), nil},
		{"short header", []byte{1, 0}, io.ErrUnexpectedEOF},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ReadFrame(bytes.NewReader(tc.in))
			if err == nil {
				t.Fatal("accepted")
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("err %v, want %v", err, tc.want)
			}
		})
	}
	if err := NewWriter(io.Discard).Write(TStdout, 0, make([]byte, MaxPayload+1)); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("oversized write: %v", err)
	}
	if err := Decode(nil, &Exit{}); err == nil {
		t.Fatal("empty control message accepted")
	}
}

// FuzzReadFrame feeds arbitrary bytes, as a hostile guest could, and
// checks that decoding never panics or over-allocates.
func FuzzReadFrame(f *testing.F) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	w.WriteJSON(THello, 0, Hello{Version: Version, Kernel: "6.1", Boot: BootTimes{Init: 1, Modules: 2, Hello: 3}})
	w.WriteJSON(TReady, 0, Ready{Boot: BootTimes{Config: 4, Mounts: 5, Ready: 6}})
	w.WriteJSON(TExit, 3, Exit{Status: 1})
	w.Write(TStdout, 1, []byte("data"))
	f.Add(buf.Bytes())
	f.Add(header(TStdout, 0, MaxPayload+1))
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		for {
			fr, err := ReadFrame(r)
			if err != nil {
				return
			}
			if len(fr.Payload) > MaxPayload {
				t.Fatal("payload above the bound")
			}
			var v struct {
				Hello
				Exit
				Config
			}
			_ = Decode(fr.Payload, &v)
			var rd Ready
			_ = Decode(fr.Payload, &rd)
		}
	})
}
