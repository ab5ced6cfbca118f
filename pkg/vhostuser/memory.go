package vhostuser

import (
	"errors"
	"fmt"
	"math"
	"sort"

	"golang.org/x/sys/unix"
)

// region is one mapped region of guest memory.
type region struct {
	RegionDesc
	// data is the mapping of [MmapOffset, MmapOffset+Size) of the fd.
	data []byte
}

// Memory is the guest's memory as the front end shared it.
type Memory struct {
	regions []*region // sorted by GuestPhysAddr
}

// ErrAddress is the error for guest addresses outside the shared memory.
var ErrAddress = errors.New("address outside guest memory")

func mapRegion(fd int, d RegionDesc) (*region, error) {
	if d.Size == 0 || d.Size > math.MaxInt || d.MmapOffset > math.MaxInt64-d.Size ||
		d.GuestPhysAddr > math.MaxUint64-d.Size || d.UserAddr > math.MaxUint64-d.Size {
		return nil, fmt.Errorf("memory region %+v: bad size or offset", d)
	}
	if d.MmapOffset%uint64(unix.Getpagesize()) != 0 {
		return nil, fmt.Errorf("memory region %+v: offset not page aligned", d)
	}
	data, err := unix.Mmap(fd, int64(d.MmapOffset), int(d.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("map guest memory region (gpa %#x, %d MiB): %w", d.GuestPhysAddr, d.Size>>20, err)
	}
	// Guest memory has no business in this process's core dumps.
	unix.Madvise(data, unix.MADV_DONTDUMP)
	return &region{RegionDesc: d, data: data}, nil
}

func (r *region) unmap() {
	if r.data != nil {
		unix.Munmap(r.data)
		r.data = nil
	}
}

func (m *Memory) add(r *region) error {
	for _, o := range m.regions {
		if r.GuestPhysAddr < o.GuestPhysAddr+o.Size && o.GuestPhysAddr < r.GuestPhysAddr+r.Size {
			return fmt.Errorf("memory region at %#x overlaps the one at %#x", r.GuestPhysAddr, o.GuestPhysAddr)
		}
	}
	if len(m.regions) >= maxRegions {
		return fmt.Errorf("more than %d memory regions", maxRegions)
	}
	m.regions = append(m.regions, r)
	sort.Slice(m.regions, func(i, j int) bool { return m.regions[i].GuestPhysAddr < m.regions[j].GuestPhysAddr })
	return nil
}

// remove unmaps the region matching d's guest address, user address and
// size (REM_MEM_REG identifies regions so).
func (m *Memory) remove(d RegionDesc) bool {
	for i, r := range m.regions {
		if r.GuestPhysAddr == d.GuestPhysAddr && r.UserAddr == d.UserAddr && r.Size == d.Size {
			r.unmap()
			m.regions = append(m.regions[:i], m.regions[i+1:]...)
			return true
		}
	}
	return false
}

func (m *Memory) unmapAll() {
	for _, r := range m.regions {
		r.unmap()
	}
	m.regions = nil
}

// Guest returns the host memory of guest-physical [addr, addr+size) as
// slices, split where the range crosses regions. It appends to out.
func (m *Memory) Guest(out [][]byte, addr, size uint64) ([][]byte, error) {
	for size > 0 {
		r := m.findGPA(addr)
		if r == nil {
			return out, ErrAddress
		}
		off := addr - r.GuestPhysAddr
		n := min(size, r.Size-off)
		out = append(out, r.data[off:off+n:off+n])
		addr += n
		size -= n
	}
	return out, nil
}

// guestContiguous returns guest-physical [addr, addr+size) as one slice,
// which must lie in one region (descriptor tables do).
func (m *Memory) guestContiguous(addr, size uint64) ([]byte, error) {
	r := m.findGPA(addr)
	if r == nil || size > r.Size-(addr-r.GuestPhysAddr) {
		return nil, ErrAddress
	}
	off := addr - r.GuestPhysAddr
	return r.data[off : off+size : off+size], nil
}

// user returns front-end virtual [addr, addr+size) (ring addresses in
// SET_VRING_ADDR are QEMU's own pointers) as one slice.
func (m *Memory) user(addr, size uint64) ([]byte, error) {
	for _, r := range m.regions {
		if addr >= r.UserAddr && addr-r.UserAddr < r.Size {
			off := addr - r.UserAddr
			if size > r.Size-off {
				return nil, ErrAddress
			}
			return r.data[off : off+size : off+size], nil
		}
	}
	return nil, ErrAddress
}

func (m *Memory) findGPA(addr uint64) *region {
	i := sort.Search(len(m.regions), func(i int) bool {
		r := m.regions[i]
		return r.GuestPhysAddr+r.Size > addr
	})
	if i < len(m.regions) && addr >= m.regions[i].GuestPhysAddr {
		return m.regions[i]
	}
	return nil
}
