package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"

	"golang.org/x/sys/unix"
)

// Request types (docs/interop/vhost-user.rst).
const (
	ReqGetFeatures         = 1
	ReqSetFeatures         = 2
	ReqSetOwner            = 3
	ReqResetOwner          = 4
	ReqSetMemTable         = 5
	ReqSetLogBase          = 6
	ReqSetLogFd            = 7
	ReqSetVringNum         = 8
	ReqSetVringAddr        = 9
	ReqSetVringBase        = 10
	ReqGetVringBase        = 11
	ReqSetVringKick        = 12
	ReqSetVringCall        = 13
	ReqSetVringErr         = 14
	ReqGetProtocolFeatures = 15
	ReqSetProtocolFeatures = 16
	ReqGetQueueNum         = 17
	ReqSetVringEnable      = 18
	ReqResetDevice         = 34
	ReqGetMaxMemSlots      = 36
	ReqAddMemReg           = 37
	ReqRemMemReg           = 38
)

// Header flags.
const (
	flagVersion   = 0x1
	flagReply     = 0x4
	flagNeedReply = 0x8
)

// Virtio feature bits.
const (
	FeatureIndirectDesc     = 1 << 28
	FeatureEventIdx         = 1 << 29
	FeatureProtocolFeatures = 1 << 30
	FeatureVersion1         = 1 << 32
)

// Protocol feature bits.
const (
	ProtocolMQ                = 1 << 0
	ProtocolReplyAck          = 1 << 3
	ProtocolConfigureMemSlots = 1 << 15
)

const (
	headerSize = 12
	// maxPayload bounds a message body: the largest legal one is a memory
	// table of maxRegions regions.
	maxPayload = 8 + maxRegions*32
	// maxRegions is what SET_MEM_TABLE carries at most (VHOST_MEMORY_BASELINE_NREGIONS)
	// and what GET_MAX_MEM_SLOTS announces.
	maxRegions = 8
	// maxFds is the most descriptors one message may carry.
	maxFds = maxRegions
	// vringNoFd in a KICK/CALL/ERR index means "no descriptor attached".
	vringNoFd = 0x100
)

// Message is one request from the front end.
type Message struct {
	Request uint32
	Flags   uint32
	Payload []byte
	// Fds are the descriptors attached with SCM_RIGHTS; whoever keeps one
	// takes it out of the slice (sets it to -1), the rest are closed.
	Fds []int
}

// NeedReply reports whether the front end waits for an acknowledgement.
func (m *Message) NeedReply() bool { return m.Flags&flagNeedReply != 0 }

// closeFds closes the descriptors nobody took.
func (m *Message) closeFds() {
	for i, fd := range m.Fds {
		if fd >= 0 {
			unix.Close(fd)
			m.Fds[i] = -1
		}
	}
}

// takeFd takes the only descriptor of the message.
func (m *Message) takeFd() (int, error) {
	if len(m.Fds) != 1 {
		return -1, fmt.Errorf("request %d: want one file descriptor, got %d", m.Request, len(m.Fds))
	}
	fd := m.Fds[0]
	m.Fds[0] = -1
	return fd, nil
}

// ErrClosed is returned by ReadMessage when the front end closed the
// connection.
var ErrClosed = errors.New("vhost-user connection closed")

// ReadMessage reads one message and its descriptors from conn.
func ReadMessage(conn *net.UnixConn) (*Message, error) {
	hdr := make([]byte, headerSize)
	oob := make([]byte, unix.CmsgSpace(maxFds*4))
	n, oobn, _, _, err := conn.ReadMsgUnix(hdr, oob)
	var fds []int
	if oobn > 0 {
		fds = parseRights(oob[:oobn])
	}
	m := &Message{Fds: fds}
	if errors.Is(err, io.EOF) || errors.Is(err, unix.ECONNRESET) {
		m.closeFds()
		return nil, ErrClosed
	}
	if err != nil {
		m.closeFds()
		return nil, fmt.Errorf("read vhost-user header: %w", err)
	}
	if n == 0 {
		m.closeFds()
		return nil, ErrClosed
	}
	if n != headerSize {
		m.closeFds()
		return nil, fmt.Errorf("short vhost-user header: %d bytes", n)
	}
	m.Request = binary.LittleEndian.Uint32(hdr[0:])
	m.Flags = binary.LittleEndian.Uint32(hdr[4:])
	size := binary.LittleEndian.Uint32(hdr[8:])
	if m.Flags&0x3 != flagVersion {
		m.closeFds()
		return nil, fmt.Errorf("vhost-user request %d: unsupported version flags %#x", m.Request, m.Flags)
	}
	if size > maxPayload {
		m.closeFds()
		return nil, fmt.Errorf("vhost-user request %d: payload of %d bytes", m.Request, size)
	}
	m.Payload = make([]byte, size)
	for off := 0; off < int(size); {
		k, err := conn.Read(m.Payload[off:])
		if err != nil {
			m.closeFds()
			return nil, fmt.Errorf("read vhost-user payload: %w", err)
		}
		off += k
	}
	return m, nil
}

// parseRights extracts SCM_RIGHTS descriptors; malformed control data
// yields whatever could be parsed.
func parseRights(oob []byte) []int {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var fds []int
	for i := range msgs {
		if f, err := unix.ParseUnixRights(&msgs[i]); err == nil {
			for _, fd := range f {
				unix.CloseOnExec(fd)
			}
			fds = append(fds, f...)
		}
	}
	return fds
}

// writeReply answers request req with payload.
func writeReply(conn *net.UnixConn, req uint32, payload []byte) error {
	b := make([]byte, headerSize+len(payload))
	binary.LittleEndian.PutUint32(b[0:], req)
	binary.LittleEndian.PutUint32(b[4:], flagVersion|flagReply)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(payload)))
	copy(b[headerSize:], payload)
	_, err := conn.Write(b)
	return err
}

func u64(v uint64) []byte {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint64(b, v)
	return b
}

// payloadU64 decodes an 8-byte payload.
func (m *Message) payloadU64() (uint64, error) {
	if len(m.Payload) < 8 {
		return 0, fmt.Errorf("request %d: payload of %d bytes, want 8", m.Request, len(m.Payload))
	}
	return binary.LittleEndian.Uint64(m.Payload), nil
}

// vringState is {index, num}.
func (m *Message) vringState() (index, num uint32, err error) {
	if len(m.Payload) < 8 {
		return 0, 0, fmt.Errorf("request %d: payload of %d bytes, want a vring state", m.Request, len(m.Payload))
	}
	return binary.LittleEndian.Uint32(m.Payload), binary.LittleEndian.Uint32(m.Payload[4:]), nil
}

// vringAddr is SET_VRING_ADDR's payload.
type vringAddr struct {
	index, flags          uint32
	desc, used, avail, lg uint64
}

func (m *Message) vringAddr() (vringAddr, error) {
	var a vringAddr
	if len(m.Payload) < 40 {
		return a, fmt.Errorf("SET_VRING_ADDR: payload of %d bytes, want 40", len(m.Payload))
	}
	p := m.Payload
	a.index, a.flags = binary.LittleEndian.Uint32(p), binary.LittleEndian.Uint32(p[4:])
	a.desc, a.used, a.avail, a.lg = binary.LittleEndian.Uint64(p[8:]), binary.LittleEndian.Uint64(p[16:]), binary.LittleEndian.Uint64(p[24:]), binary.LittleEndian.Uint64(p[32:])
	return a, nil
}

// RegionDesc describes one region of guest memory.
type RegionDesc struct {
	GuestPhysAddr, Size, UserAddr, MmapOffset uint64
}

func decodeRegion(p []byte) RegionDesc {
	return RegionDesc{
		GuestPhysAddr: binary.LittleEndian.Uint64(p),
		Size:          binary.LittleEndian.Uint64(p[8:]),
		UserAddr:      binary.LittleEndian.Uint64(p[16:]),
		MmapOffset:    binary.LittleEndian.Uint64(p[24:]),
	}
}

// memTable decodes SET_MEM_TABLE's payload.
func (m *Message) memTable() ([]RegionDesc, error) {
	if len(m.Payload) < 8 {
		return nil, fmt.Errorf("SET_MEM_TABLE: payload of %d bytes", len(m.Payload))
	}
	n := binary.LittleEndian.Uint32(m.Payload)
	if n == 0 || n > maxRegions || len(m.Payload) < 8+int(n)*32 {
		return nil, fmt.Errorf("SET_MEM_TABLE: %d regions in %d bytes", n, len(m.Payload))
	}
	if len(m.Fds) != int(n) {
		return nil, fmt.Errorf("SET_MEM_TABLE: %d regions but %d file descriptors", n, len(m.Fds))
	}
	rs := make([]RegionDesc, n)
	for i := range rs {
		rs[i] = decodeRegion(m.Payload[8+i*32:])
	}
	return rs, nil
}

// memReg decodes ADD_MEM_REG and REM_MEM_REG's payload.
func (m *Message) memReg() (RegionDesc, error) {
	if len(m.Payload) < 40 {
		return RegionDesc{}, fmt.Errorf("request %d: payload of %d bytes, want a memory region", m.Request, len(m.Payload))
	}
	return decodeRegion(m.Payload[8:]), nil
}
