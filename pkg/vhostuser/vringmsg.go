package vhostuser

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/sys/unix"
)

func (b *Backend) setVringNum(m *Message) error {
	q, num, err := b.vringState(m)
	if err != nil {
		return err
	}
	if num == 0 || num > MaxQueueSize || num&(num-1) != 0 {
		return fmt.Errorf("vring %d size %d: want a power of two up to %d", q.index, num, MaxQueueSize)
	}
	q.mu.Lock()
	q.num = uint16(num)
	q.mu.Unlock()
	return nil
}

func (b *Backend) setVringAddr(m *Message) error {
	a, err := m.vringAddr()
	if err != nil {
		return err
	}
	q, err := b.queue(a.index)
	if err != nil {
		return err
	}
	b.memMu.RLock()
	defer b.memMu.RUnlock()
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.num == 0 {
		return fmt.Errorf("vring %d: address before size", a.index)
	}
	desc, avail, used, err := mapRing(&b.mem, q.num, a)
	if err != nil {
		return err
	}
	q.addr = &a
	q.ring = vring{
		num: q.num, desc: desc, avail: avail, used: used, lastAvail: q.base,
		// The used index survives a pause of the VM: start from the
		// guest's view.
		usedIdx:  binary.LittleEndian.Uint16(used[2:]),
		eventIdx: b.feature&FeatureEventIdx != 0,
	}
	return nil
}

func (b *Backend) setVringBase(m *Message) error {
	q, num, err := b.vringState(m)
	if err != nil {
		return err
	}
	q.mu.Lock()
	q.base = uint16(num)
	q.ring.lastAvail = uint16(num)
	q.mu.Unlock()
	return nil
}

// getVringBase stops the ring, waits for its requests and answers with
// the next index to consume: QEMU blocks on this answer when the guest
// resets the device or powers off.
func (b *Backend) getVringBase(m *Message) error {
	q, _, err := b.vringState(m)
	if err != nil {
		return err
	}
	b.stopQueue(q)
	q.mu.Lock()
	last := q.ring.lastAvail
	q.base = last
	swapFd(&q.kick, -1)
	q.enabled = false
	q.mu.Unlock()
	p := make([]byte, 8)
	binary.LittleEndian.PutUint32(p, uint32(q.index))
	binary.LittleEndian.PutUint32(p[4:], uint32(last))
	return b.reply(m, p)
}

func (b *Backend) setVringFd(m *Message) error {
	v, err := m.payloadU64()
	if err != nil {
		return err
	}
	q, err := b.queue(uint32(v & 0xff))
	if err != nil {
		return err
	}
	fd := -1
	if v&vringNoFd == 0 {
		if fd, err = m.takeFd(); err != nil {
			return err
		}
	}
	switch m.Request {
	case ReqSetVringKick:
		b.stopQueue(q)
		q.mu.Lock()
		swapFd(&q.kick, fd)
		// Without PROTOCOL_FEATURES a ring runs as soon as it has a kick.
		if b.feature&FeatureProtocolFeatures == 0 {
			q.enabled = true
		}
		q.mu.Unlock()
		return b.startQueue(q)
	case ReqSetVringCall:
		q.mu.Lock()
		swapFd(&q.call, fd)
		q.mu.Unlock()
	case ReqSetVringErr:
		q.mu.Lock()
		swapFd(&q.errFd, fd)
		q.mu.Unlock()
	}
	return nil
}

func (b *Backend) setVringEnable(m *Message) error {
	q, on, err := b.vringState(m)
	if err != nil {
		return err
	}
	if on == 0 {
		b.stopQueue(q)
		q.mu.Lock()
		q.enabled = false
		q.mu.Unlock()
		return nil
	}
	q.mu.Lock()
	q.enabled = true
	q.mu.Unlock()
	return b.startQueue(q)
}

// swapFd closes the descriptor *p holds, if any, and puts fd in its
// place (-1 for none).
func swapFd(p *int, fd int) {
	if *p >= 0 {
		unix.Close(*p)
	}
	*p = fd
}
