package vhostuser

import (
	"encoding/binary"
	"testing"

	"golang.org/x/sys/unix"
)

// FuzzWalk feeds a guest-controlled descriptor table and available ring
// (the whole of a small guest memory) to the ring code: every chain is
// either walked within guest memory or rejected, and nothing panics.
func FuzzWalk(f *testing.F) {
	seed := make([]byte, 4096)
	// head 0 -> indirect table at 0x800 with two entries
	binary.LittleEndian.PutUint64(seed[0:], 0x800)
	binary.LittleEndian.PutUint32(seed[8:], 32)
	binary.LittleEndian.PutUint16(seed[12:], descIndirect)
	binary.LittleEndian.PutUint64(seed[0x800:], 0x900)
	binary.LittleEndian.PutUint32(seed[0x808:], 40)
	binary.LittleEndian.PutUint16(seed[0x80c:], descNext)
	binary.LittleEndian.PutUint16(seed[0x80e:], 1)
	binary.LittleEndian.PutUint64(seed[0x810:], 0xa00)
	binary.LittleEndian.PutUint32(seed[0x818:], 16)
	binary.LittleEndian.PutUint16(seed[0x81c:], descWrite)
	binary.LittleEndian.PutUint16(seed[0x102:], 1) // avail idx
	f.Add(seed)
	f.Fuzz(func(t *testing.T, b []byte) {
		const size = 1 << 16
		data, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
		if err != nil {
			t.Skip(err)
		}
		defer unix.Munmap(data)
		copy(data, b)
		mem := &Memory{regions: []*region{{RegionDesc: RegionDesc{GuestPhysAddr: 0, Size: size, UserAddr: 0x10000}, data: data}}}
		const num = 16
		desc, avail, used, err := mapRing(mem, num, vringAddr{desc: 0x10000, avail: 0x10100, used: 0x10200})
		if err != nil {
			t.Fatal(err)
		}
		v := &vring{num: num, desc: desc, avail: avail, used: used, eventIdx: true}
		for i := 0; i < 2*num; i++ {
			head, ok, err := v.next()
			if err != nil || !ok {
				return
			}
			c, err := v.walk(mem, head)
			if err == nil {
				total := 0
				for _, s := range append(c.Readable, c.Writable...) {
					total += len(s)
				}
				if total > 16*size {
					t.Fatalf("chain of %d bytes from %d bytes of memory", total, size)
				}
			}
			v.push(head, 0)
			v.needSignal()
			v.setAvailEvent()
		}
	})
}
