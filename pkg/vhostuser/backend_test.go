package vhostuser

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Test guest memory: one region, guest-physical 0, front-end address
// userBase, and a ring of ringSize entries at ringAt.
const (
	memSize  = 1 << 20
	userBase = 0x7f0000000000
	ringSize = 8
	ringAt   = 0x1000
	descAt   = ringAt
	availAt  = ringAt + 16*ringSize
	usedAt   = ringAt + 0x800
	bufAt    = 0x10000
)

// frontEnd plays QEMU: it owns the socket's other end and the guest's
// memory.
type frontEnd struct {
	t    *testing.T
	conn *net.UnixConn
	mem  []byte
	memf *os.File
	kick int
	call int
	// next avail index the "driver" publishes
	availIdx uint16
}

func newPair(t *testing.T, dev Device, queues int) (*frontEnd, <-chan error) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "sock")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	fe := &frontEnd{t: t, conn: conn(fds[0])}
	mfd, err := unix.MemfdCreate("guest", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	fe.memf = os.NewFile(uintptr(mfd), "guest")
	fe.memf.Truncate(memSize)
	if fe.mem, err = unix.Mmap(mfd, 0, memSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
		t.Fatal(err)
	}
	fe.kick, _ = unix.Eventfd(0, unix.EFD_CLOEXEC)
	fe.call, _ = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	b := NewBackend(conn(fds[1]), dev, Config{Queues: queues, StopTimeout: 5 * time.Second})
	done := make(chan error, 1)
	finished := make(chan struct{})
	go func() { done <- b.Serve(context.Background()); close(finished) }()
	t.Cleanup(func() {
		fe.conn.Close()
		select {
		case <-finished:
		case <-time.After(10 * time.Second):
			t.Error("back end did not stop after the front end closed")
		}
		unix.Munmap(fe.mem)
		fe.memf.Close()
		unix.Close(fe.kick)
		unix.Close(fe.call)
	})
	return fe, done
}

func (fe *frontEnd) send(req uint32, flags uint32, payload []byte, fds ...int) {
	fe.t.Helper()
	b := make([]byte, headerSize+len(payload))
	binary.LittleEndian.PutUint32(b, req)
	binary.LittleEndian.PutUint32(b[4:], flagVersion|flags)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(payload)))
	copy(b[headerSize:], payload)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := fe.conn.WriteMsgUnix(b, oob, nil); err != nil {
		fe.t.Fatal(err)
	}
}

func (fe *frontEnd) recv(req uint32) []byte {
	fe.t.Helper()
	fe.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	h := make([]byte, headerSize)
	if _, err := fe.conn.Read(h); err != nil {
		fe.t.Fatalf("reply to %d: %v", req, err)
	}
	if got := binary.LittleEndian.Uint32(h); got != req {
		fe.t.Fatalf("reply to %d names request %d", req, got)
	}
	if f := binary.LittleEndian.Uint32(h[4:]); f != flagVersion|flagReply {
		fe.t.Fatalf("reply flags %#x, want 0x5", f)
	}
	p := make([]byte, binary.LittleEndian.Uint32(h[8:]))
	if _, err := fe.conn.Read(p); err != nil {
		fe.t.Fatal(err)
	}
	return p
}

func state(index, num uint32) []byte {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint32(b, index)
	binary.LittleEndian.PutUint32(b[4:], num)
	return b
}

// start runs QEMU's start sequence for queue q.
func (fe *frontEnd) start(q uint32, eventIdx bool) {
	fe.t.Helper()
	fe.send(ReqGetFeatures, 0, nil)
	feat := binary.LittleEndian.Uint64(fe.recv(ReqGetFeatures))
	if feat&FeatureVersion1 == 0 || feat&FeatureProtocolFeatures == 0 {
		fe.t.Fatalf("features %#x lack VERSION_1 or PROTOCOL_FEATURES", feat)
	}
	fe.send(ReqGetProtocolFeatures, 0, nil)
	proto := binary.LittleEndian.Uint64(fe.recv(ReqGetProtocolFeatures))
	fe.send(ReqSetProtocolFeatures, 0, u64(proto&ProtocolReplyAck))
	fe.send(ReqSetOwner, 0, nil)
	want := uint64(FeatureVersion1 | FeatureProtocolFeatures | FeatureIndirectDesc)
	if eventIdx {
		want |= FeatureEventIdx
	}
	fe.send(ReqSetFeatures, 0, u64(want))
	table := make([]byte, 8+32)
	binary.LittleEndian.PutUint32(table, 1)
	binary.LittleEndian.PutUint64(table[8:], 0)         // gpa
	binary.LittleEndian.PutUint64(table[16:], memSize)  // size
	binary.LittleEndian.PutUint64(table[24:], userBase) // uva
	fe.send(ReqSetMemTable, flagNeedReply, table, int(fe.memf.Fd()))
	if ack := binary.LittleEndian.Uint64(fe.recv(ReqSetMemTable)); ack != 0 {
		fe.t.Fatalf("SET_MEM_TABLE ack %d", ack)
	}
	fe.send(ReqSetVringNum, 0, state(q, ringSize))
	fe.send(ReqSetVringBase, 0, state(q, 0))
	addr := make([]byte, 40)
	binary.LittleEndian.PutUint32(addr, q)
	binary.LittleEndian.PutUint64(addr[8:], userBase+descAt)
	binary.LittleEndian.PutUint64(addr[16:], userBase+usedAt)
	binary.LittleEndian.PutUint64(addr[24:], userBase+availAt)
	fe.send(ReqSetVringAddr, 0, addr)
	fe.send(ReqSetVringKick, 0, u64(uint64(q)), fe.kick)
	fe.send(ReqSetVringCall, 0, u64(uint64(q)), fe.call)
	fe.send(ReqSetVringEnable, 0, state(q, 1))
}

// desc writes descriptor i of the table at tableAt.
func (fe *frontEnd) desc(tableAt, i int, addr uint64, length uint32, flags, next uint16) {
	d := fe.mem[tableAt+16*i:]
	binary.LittleEndian.PutUint64(d, addr)
	binary.LittleEndian.PutUint32(d[8:], length)
	binary.LittleEndian.PutUint16(d[12:], flags)
	binary.LittleEndian.PutUint16(d[14:], next)
}

// publish makes head available and kicks.
func (fe *frontEnd) publish(head uint16) {
	binary.LittleEndian.PutUint16(fe.mem[availAt+4+2*int(fe.availIdx%ringSize):], head)
	fe.availIdx++
	atomic.StoreUint32((*uint32)(unsafePointer(fe.mem[availAt:])), uint32(fe.availIdx)<<16)
	unix.Write(fe.kick, u64(1))
}

// used waits until the used index reaches n and returns element n-1.
func (fe *frontEnd) used(n uint16) (id, length uint32) {
	fe.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		idx := uint16(atomic.LoadUint32((*uint32)(unsafePointer(fe.mem[usedAt:]))) >> 16)
		if idx == n {
			e := fe.mem[usedAt+4+8*int((n-1)%ringSize):]
			return binary.LittleEndian.Uint32(e), binary.LittleEndian.Uint32(e[4:])
		}
		if time.Now().After(deadline) {
			fe.t.Fatalf("used index %d, want %d", idx, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// echo copies the request into the reply buffers.
type echo struct{ calls atomic.Int32 }

func (e *echo) Handle(q int, c *Chain) int {
	e.calls.Add(1)
	var in []byte
	for _, b := range c.Readable {
		in = append(in, b...)
	}
	n := 0
	for _, w := range c.Writable {
		k := copy(w, in[n:])
		n += k
	}
	return n
}

func TestChains(t *testing.T) {
	dev := &echo{}
	fe, _ := newPair(t, dev, 2)
	fe.start(1, true)

	// A direct chain: 5 readable bytes split over two descriptors, one
	// writable buffer.
	copy(fe.mem[bufAt:], "hello")
	fe.desc(descAt, 0, bufAt, 2, descNext, 1)
	fe.desc(descAt, 1, bufAt+2, 3, descNext, 2)
	fe.desc(descAt, 2, bufAt+0x100, 64, descWrite, 0)
	fe.publish(0)
	if id, n := fe.used(1); id != 0 || n != 5 || string(fe.mem[bufAt+0x100:bufAt+0x105]) != "hello" {
		t.Fatalf("used {%d %d}, reply %q", id, n, fe.mem[bufAt+0x100:bufAt+0x105])
	}

	// An indirect chain, as Linux sends every virtio-fs request.
	const table = bufAt + 0x1000
	copy(fe.mem[bufAt+0x200:], "indirect")
	fe.desc(table, 0, bufAt+0x200, 8, descNext, 1)
	fe.desc(table, 1, bufAt+0x300, 8, descWrite, 0)
	fe.desc(descAt, 3, table, 32, descIndirect, 0)
	fe.publish(3)
	if id, n := fe.used(2); id != 3 || n != 8 || string(fe.mem[bufAt+0x300:bufAt+0x308]) != "indirect" {
		t.Fatalf("indirect: used {%d %d}", id, n)
	}

	// Malformed chains are completed with length 0, never handled.
	calls := dev.calls.Load()
	bad := []func(){
		func() { fe.desc(descAt, 4, bufAt, 1, descNext, 4) },                                               // loop
		func() { fe.desc(descAt, 4, bufAt, 1, descNext, 200) },                                             // next out of the table
		func() { fe.desc(descAt, 4, memSize-1, 16, 0, 0) },                                                 // buffer beyond memory
		func() { fe.desc(descAt, 4, table, 0, descIndirect, 0) },                                           // empty indirect table
		func() { fe.desc(descAt, 4, table, 17, descIndirect, 0) },                                          // not a multiple of 16
		func() { fe.desc(descAt, 4, memSize-16, 32, descIndirect, 0) },                                     // table beyond memory
		func() { fe.desc(descAt, 4, bufAt, 4, descWrite|descNext, 5); fe.desc(descAt, 5, bufAt, 4, 0, 0) }, // readable after writable
		func() { // nested indirect table
			fe.desc(table, 0, table, 16, descIndirect, 0)
			fe.desc(descAt, 4, table, 16, descIndirect, 0)
		},
	}
	for i, mk := range bad {
		mk()
		fe.publish(4)
		if id, n := fe.used(uint16(3 + i)); id != 4 || n != 0 {
			t.Fatalf("malformed chain %d: used {%d %d}, want {4 0}", i, id, n)
		}
	}
	if dev.calls.Load() != calls {
		t.Fatalf("the device saw %d malformed chains", dev.calls.Load()-calls)
	}
}

// gate is an echo device whose chains starting with "slow" wait for
// release, and whose other chains are quick.
type gate struct {
	echo
	release chan struct{}
}

func (g *gate) Quick(q int, c *Chain) bool {
	return len(c.Readable) == 0 || !bytes.HasPrefix(c.Readable[0], []byte("slow"))
}

func (g *gate) Handle(q int, c *Chain) int {
	if !g.Quick(q, c) {
		<-g.release
	}
	return g.echo.Handle(q, c)
}

// TestQuickBesideSlow: a quick request (served by the queue's worker
// itself when alone) is answered while a slow one is still running.
func TestQuickBesideSlow(t *testing.T) {
	dev := &gate{release: make(chan struct{})}
	fe, _ := newPair(t, dev, 2)
	fe.start(1, true)
	chain := func(head, at int, text string) {
		copy(fe.mem[bufAt+at:], text)
		fe.desc(descAt, head, uint64(bufAt+at), uint32(len(text)), descNext, uint16(head+1))
		fe.desc(descAt, head+1, uint64(bufAt+at+0x80), 64, descWrite, 0)
	}
	chain(0, 0, "quick one")
	fe.publish(0)
	if id, n := fe.used(1); id != 0 || n != 9 {
		t.Fatalf("quick request alone: used {%d %d}", id, n)
	}
	chain(2, 0x100, "slow one")
	fe.publish(2)
	chain(4, 0x200, "quick two")
	fe.publish(4)
	if id, n := fe.used(2); id != 4 || n != 9 {
		t.Fatalf("quick request beside a slow one: used {%d %d}, want {4 9}", id, n)
	}
	close(dev.release)
	if id, n := fe.used(3); id != 2 || n != 8 {
		t.Fatalf("slow request: used {%d %d}, want {2 8}", id, n)
	}
}

// TestStopReplies: GET_VRING_BASE is answered with the next index to
// consume, after the ring's requests finished, and the ring restarts.
func TestStopReplies(t *testing.T) {
	fe, _ := newPair(t, &echo{}, 2)
	fe.start(1, false)
	fe.desc(descAt, 0, bufAt, 4, descNext, 1)
	fe.desc(descAt, 1, bufAt+0x100, 4, descWrite, 0)
	fe.publish(0)
	fe.used(1)
	fe.send(ReqSetVringEnable, 0, state(1, 0))
	fe.send(ReqGetVringBase, 0, state(1, 0))
	r := fe.recv(ReqGetVringBase)
	if len(r) != 8 || binary.LittleEndian.Uint32(r) != 1 || binary.LittleEndian.Uint32(r[4:]) != 1 {
		t.Fatalf("GET_VRING_BASE reply %v, want {1, 1}", r)
	}
	// Restart from where it stopped.
	fe.send(ReqSetVringBase, 0, state(1, 1))
	addr := make([]byte, 40)
	binary.LittleEndian.PutUint32(addr, 1)
	binary.LittleEndian.PutUint64(addr[8:], userBase+descAt)
	binary.LittleEndian.PutUint64(addr[16:], userBase+usedAt)
	binary.LittleEndian.PutUint64(addr[24:], userBase+availAt)
	fe.send(ReqSetVringAddr, 0, addr)
	fe.send(ReqSetVringKick, 0, u64(1), fe.kick)
	fe.send(ReqSetVringEnable, 0, state(1, 1))
	fe.publish(0)
	if id, _ := fe.used(2); id != 0 {
		t.Fatalf("after restart: used id %d", id)
	}
}

// TestBadMessages: malformed messages end the connection with an error;
// the process lives.
func TestBadMessages(t *testing.T) {
	for _, tc := range []struct {
		name    string
		req     uint32
		payload []byte
	}{
		{"queue out of range", ReqSetVringNum, state(7, 8)},
		{"ring size not a power of two", ReqSetVringNum, state(0, 6)},
		{"short payload", ReqSetVringAddr, []byte{1, 2}},
		{"memory table without fds", ReqSetMemTable, append(state(1, 0), make([]byte, 32)...)},
		{"address before memory", ReqSetVringAddr, make([]byte, 40)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fe, done := newPair(t, &echo{}, 2)
			if tc.req == ReqSetVringAddr {
				fe.send(ReqSetVringNum, 0, state(0, 8))
			}
			fe.send(tc.req, 0, tc.payload)
			select {
			case err := <-done:
				if err == nil {
					t.Fatal("served on after a malformed message")
				}
			case <-time.After(5 * time.Second):
				t.Fatal("no error")
			}
		})
	}
}

func FuzzReadMessage(f *testing.F) {
	f.Add(append(append([]byte{}, []byte{1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0}...), nil...))
	f.Add([]byte{9, 0, 0, 0, 1, 0, 0, 0, 40, 0, 0, 0})
	f.Add([]byte{5, 0, 0, 0, 9, 0, 0, 0, 40, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Skip(err)
		}
		w := os.NewFile(uintptr(fds[0]), "w")
		rf := os.NewFile(uintptr(fds[1]), "r")
		c, _ := net.FileConn(rf)
		rf.Close()
		w.Write(b)
		w.Close()
		conn := c.(*net.UnixConn)
		defer conn.Close()
		// The back end must only ever return: the payload is whatever
		// QEMU could send.
		be := NewBackend(conn, &echo{}, Config{Queues: 2})
		be.Serve(context.Background())
	})
}

func unsafePointer(b []byte) unsafe.Pointer { return unsafe.Pointer(&b[0]) }
