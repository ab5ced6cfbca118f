package vhostuser

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
	"unsafe"
)

// Descriptor flags of a split virtqueue.
const (
	descNext     = 1
	descWrite    = 2
	descIndirect = 4
)

// Limits on what a guest may make us walk.
const (
	// MaxQueueSize is the largest ring QEMU allows (VIRTQUEUE_MAX_SIZE).
	MaxQueueSize = 1024
	// maxIndirect bounds an indirect table; Linux uses at most
	// 4 + max_pages (260) entries for virtio-fs.
	maxIndirect = 1024
	// maxSegments bounds the buffers of one chain after splitting at
	// region boundaries.
	maxSegments = 2048
)

// Chain is one descriptor chain the guest made available: the buffers
// the device reads (the request) and those it writes (the reply), as
// host slices of guest memory.
type Chain struct {
	head     uint16
	Readable [][]byte
	Writable [][]byte
}

// errChain reports a malformed descriptor chain.
type errChain struct{ msg string }

func (e errChain) Error() string { return "descriptor chain: " + e.msg }

// vring is the state of one split virtqueue. The caller serialises
// access (queue.mu).
type vring struct {
	num               uint16
	desc, avail, used []byte
	lastAvail         uint16
	usedIdx           uint16
	eventIdx          bool
	signalledUsed     uint16
	signalledValid    bool
}

// word returns the 32-bit word at b[0:4] for atomic access. Rings are
// at least 4-byte aligned (checked in setAddr).
func word(b []byte) *uint32 { return (*uint32)(unsafe.Pointer(&b[0])) }

// fence is a full memory barrier (a locked instruction on amd64, a
// DMB-equivalent acquire-release on arm64).
func fence() {
	var x uint32
	atomic.AddUint32(&x, 1)
}

// mapRing maps the three parts of a ring of num entries from front-end
// addresses.
func mapRing(mem *Memory, num uint16, a vringAddr) (desc, avail, used []byte, err error) {
	if a.desc%16 != 0 || a.avail%4 != 0 || a.used%4 != 0 {
		return nil, nil, nil, fmt.Errorf("vring %d: misaligned ring (desc %#x avail %#x used %#x)", a.index, a.desc, a.avail, a.used)
	}
	n := uint64(num)
	if desc, err = mem.user(a.desc, 16*n); err != nil {
		return nil, nil, nil, fmt.Errorf("vring %d descriptor table: %w", a.index, err)
	}
	if avail, err = mem.user(a.avail, 6+2*n); err != nil {
		return nil, nil, nil, fmt.Errorf("vring %d available ring: %w", a.index, err)
	}
	if used, err = mem.user(a.used, 6+8*n); err != nil {
		return nil, nil, nil, fmt.Errorf("vring %d used ring: %w", a.index, err)
	}
	return desc, avail, used, nil
}

func (v *vring) availIdx() uint16 { return uint16(atomic.LoadUint32(word(v.avail)) >> 16) }
func (v *vring) availFlags() uint16 {
	return uint16(atomic.LoadUint32(word(v.avail)))
}

// pending reports whether the guest made chains available that we have
// not taken.
func (v *vring) pending() bool { return v.availIdx() != v.lastAvail }

// next takes the next available chain's head, or reports none.
func (v *vring) next() (uint16, bool, error) {
	idx := v.availIdx()
	if idx == v.lastAvail {
		return 0, false, nil
	}
	if uint16(idx-v.lastAvail) > v.num {
		return 0, false, fmt.Errorf("available index %d is more than %d ahead of %d", idx, v.num, v.lastAvail)
	}
	head := binary.LittleEndian.Uint16(v.avail[4+2*int(v.lastAvail%v.num):])
	v.lastAvail++
	return head, true, nil
}

// setAvailEvent tells the guest (EVENT_IDX) to kick again once it makes
// entry lastAvail available.
func (v *vring) setAvailEvent() {
	off := 4 + 8*int(v.num)
	binary.LittleEndian.PutUint16(v.used[off:], v.lastAvail)
	fence()
}

// walk resolves the chain starting at head. A malformed chain returns an
// errChain; the caller completes it with length 0 so that the guest's
// request fails instead of hanging.
func (v *vring) walk(mem *Memory, head uint16) (*Chain, error) {
	c := &Chain{head: head}
	table, n := v.desc, uint32(v.num)
	i := uint32(head)
	indirect := false
	var err error
	// visited counts the descriptors of the current table: a chain
	// longer than its table loops.
	for visited := uint32(1); ; visited++ {
		if i >= n {
			return c, errChain{fmt.Sprintf("descriptor %d of a table of %d", i, n)}
		}
		if visited > n {
			return c, errChain{"loop"}
		}
		d := table[16*i:]
		addr := binary.LittleEndian.Uint64(d)
		length := binary.LittleEndian.Uint32(d[8:])
		flags := binary.LittleEndian.Uint16(d[12:])
		next := binary.LittleEndian.Uint16(d[14:])
		if flags&descIndirect != 0 {
			if indirect {
				return c, errChain{"nested indirect table"}
			}
			if flags&descNext != 0 || len(c.Readable)+len(c.Writable) > 0 {
				return c, errChain{"indirect descriptor inside a chain"}
			}
			if length == 0 || length%16 != 0 || length/16 > maxIndirect {
				return c, errChain{fmt.Sprintf("indirect table of %d bytes", length)}
			}
			if table, err = mem.guestContiguous(addr, uint64(length)); err != nil {
				return c, errChain{fmt.Sprintf("indirect table at %#x: %v", addr, err)}
			}
			n, i, indirect, visited = length/16, 0, true, 0
			continue
		}
		if length > 0 {
			if flags&descWrite != 0 {
				c.Writable, err = mem.Guest(c.Writable, addr, uint64(length))
			} else {
				if len(c.Writable) > 0 {
					return c, errChain{"readable descriptor after a writable one"}
				}
				c.Readable, err = mem.Guest(c.Readable, addr, uint64(length))
			}
			if err != nil {
				return c, errChain{fmt.Sprintf("buffer at %#x+%d: %v", addr, length, err)}
			}
			if len(c.Readable)+len(c.Writable) > maxSegments {
				return c, errChain{"too many buffers"}
			}
		}
		if flags&descNext == 0 {
			return c, nil
		}
		i = uint32(next)
	}
}

// push returns a chain to the guest with the number of bytes written.
func (v *vring) push(head uint16, written uint32) {
	off := 4 + 8*int(v.usedIdx%v.num)
	binary.LittleEndian.PutUint32(v.used[off:], uint32(head))
	binary.LittleEndian.PutUint32(v.used[off+4:], written)
	v.usedIdx++
	// used.flags stays 0: we never ask the guest not to kick.
	atomic.StoreUint32(word(v.used), uint32(v.usedIdx)<<16)
}

// needSignal reports whether the guest wants an interrupt for the chains
// pushed since the last check.
func (v *vring) needSignal() bool {
	fence()
	if !v.eventIdx {
		return v.availFlags()&1 == 0 // VRING_AVAIL_F_NO_INTERRUPT
	}
	usedEvent := binary.LittleEndian.Uint16(v.avail[4+2*int(v.num):])
	old, valid := v.signalledUsed, v.signalledValid
	v.signalledUsed, v.signalledValid = v.usedIdx, true
	if !valid {
		return true
	}
	return v.usedIdx-usedEvent-1 < v.usedIdx-old
}
