package vhostuser

import (
	"fmt"

	"golang.org/x/sys/unix"
)

func (b *Backend) setMemTable(m *Message) error {
	rs, err := m.memTable()
	if err != nil {
		return err
	}
	var mapped []*region
	for i, d := range rs {
		r, err := mapRegion(m.Fds[i], d)
		if err != nil {
			for _, r := range mapped {
				r.unmap()
			}
			return err
		}
		mapped = append(mapped, r)
	}
	b.memMu.Lock()
	defer b.memMu.Unlock()
	b.mem.unmapAll()
	for _, r := range mapped {
		if err := b.mem.add(r); err != nil {
			r.unmap()
			return err
		}
	}
	return b.remapRings()
}

func (b *Backend) addMemReg(m *Message) error {
	d, err := m.memReg()
	if err != nil {
		return err
	}
	fd, err := m.takeFd()
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	r, err := mapRegion(fd, d)
	if err != nil {
		return err
	}
	b.memMu.Lock()
	defer b.memMu.Unlock()
	if err := b.mem.add(r); err != nil {
		r.unmap()
		return err
	}
	return b.remapRings()
}

func (b *Backend) remMemReg(m *Message) error {
	d, err := m.memReg()
	if err != nil {
		return err
	}
	b.memMu.Lock()
	defer b.memMu.Unlock()
	if !b.mem.remove(d) {
		return fmt.Errorf("no memory region at %#x to remove", d.GuestPhysAddr)
	}
	return b.remapRings()
}

// remapRings refreshes the ring slices of configured queues after the
// memory table changed (memMu held for writing).
func (b *Backend) remapRings() error {
	for _, q := range b.queues {
		q.mu.Lock()
		if q.addr != nil && q.ring.desc != nil {
			desc, avail, used, err := mapRing(&b.mem, q.num, *q.addr)
			if err != nil {
				q.ring.desc, q.ring.avail, q.ring.used = nil, nil, nil
			} else {
				q.ring.desc, q.ring.avail, q.ring.used = desc, avail, used
			}
		}
		q.mu.Unlock()
	}
	return nil
}
