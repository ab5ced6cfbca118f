package vhostuser

import (
	"fmt"
)

func (b *Backend) reply(m *Message, payload []byte) error {
	return writeReply(b.conn, m.Request, payload)
}

// ack answers a request that asked for an acknowledgement.
func (b *Backend) ack(m *Message, err error) error {
	if !m.NeedReply() {
		return err
	}
	status := uint64(0)
	if err != nil {
		status = 1
	}
	if werr := b.reply(m, u64(status)); werr != nil {
		return werr
	}
	return err
}

// vringState decodes a {index, num} payload and finds the queue.
func (b *Backend) vringState(m *Message) (*queue, uint32, error) {
	idx, num, err := m.vringState()
	if err != nil {
		return nil, 0, err
	}
	q, err := b.queue(idx)
	return q, num, err
}

func (b *Backend) queue(index uint32) (*queue, error) {
	if int(index) >= len(b.queues) {
		return nil, fmt.Errorf("vring %d of %d", index, len(b.queues))
	}
	return b.queues[index], nil
}

func (b *Backend) handle(m *Message) error {
	switch m.Request {
	case ReqGetFeatures:
		return b.reply(m, u64(offeredFeatures|b.cfg.Features))
	case ReqSetFeatures:
		f, err := m.payloadU64()
		if err == nil {
			if f&^(offeredFeatures|b.cfg.Features) != 0 {
				err = fmt.Errorf("features %#x not offered", f&^(offeredFeatures|b.cfg.Features))
			} else {
				b.feature = f
			}
		}
		return b.ack(m, err)
	case ReqGetProtocolFeatures:
		return b.reply(m, u64(offeredProtocol))
	case ReqSetProtocolFeatures:
		f, err := m.payloadU64()
		if err == nil {
			b.proto = f & offeredProtocol
		}
		return err
	case ReqSetOwner, ReqResetOwner, ReqResetDevice:
		if m.Request != ReqSetOwner {
			for _, q := range b.queues {
				b.stopQueue(q)
			}
		}
		return b.ack(m, nil)
	case ReqGetQueueNum:
		return b.reply(m, u64(uint64(len(b.queues))))
	case ReqGetMaxMemSlots:
		return b.reply(m, u64(maxRegions))
	case ReqSetMemTable:
		return b.ack(m, b.setMemTable(m))
	case ReqAddMemReg:
		return b.ack(m, b.addMemReg(m))
	case ReqRemMemReg:
		return b.ack(m, b.remMemReg(m))
	case ReqSetVringNum:
		return b.ack(m, b.setVringNum(m))
	case ReqSetVringAddr:
		return b.ack(m, b.setVringAddr(m))
	case ReqSetVringBase:
		return b.ack(m, b.setVringBase(m))
	case ReqGetVringBase:
		return b.getVringBase(m)
	case ReqSetVringKick, ReqSetVringCall, ReqSetVringErr:
		return b.ack(m, b.setVringFd(m))
	case ReqSetVringEnable:
		return b.ack(m, b.setVringEnable(m))
	default:
		// Migration logging, inflight tracking, configuration space:
		// never offered, so never used by a conforming front end.
		b.log.Warn("vhost-user request not supported", "request", m.Request)
		return b.ack(m, nil)
	}
}
