package vhostuser

import (
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// startQueue starts the queue's worker if the ring is ready: enabled,
// configured and with a kick descriptor.
func (b *Backend) startQueue(q *queue) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.enabled || q.done != nil || q.ring.desc == nil || q.kick < 0 {
		return nil
	}
	stop, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return fmt.Errorf("eventfd: %w", err)
	}
	q.stop = stop
	q.done = make(chan struct{})
	go b.worker(q, q.kick, stop, q.done)
	return nil
}

// stopQueue stops the worker and waits for the queue's requests.
func (b *Backend) stopQueue(q *queue) {
	q.mu.Lock()
	done, stop := q.done, q.stop
	q.mu.Unlock()
	if done == nil {
		return
	}
	unix.Write(stop, u64(1))
	<-done
	waited := make(chan struct{})
	go func() { q.inflight.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-time.After(b.cfg.StopTimeout):
		b.log.Error("vring stopped with requests still running", "queue", q.index, "waited", b.cfg.StopTimeout)
	}
	q.mu.Lock()
	unix.Close(q.stop)
	q.stop, q.done = -1, nil
	q.mu.Unlock()
}

// worker waits for kicks and hands the queue's chains to the device.
func (b *Backend) worker(q *queue, kick, stop int, done chan struct{}) {
	defer close(done)
	fds := []unix.PollFd{{Fd: int32(kick), Events: unix.POLLIN}, {Fd: int32(stop), Events: unix.POLLIN}}
	buf := make([]byte, 8)
	for {
		// Kicks that came before the ring was enabled are not lost:
		// drain first, then wait.
		if !b.drain(q) {
			return
		}
		for {
			fds[0].Revents, fds[1].Revents = 0, 0
			_, err := unix.Poll(fds, -1)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				b.log.Error("poll kick", "queue", q.index, "err", err)
				return
			}
			break
		}
		if fds[1].Revents != 0 {
			return
		}
		unix.Read(kick, buf)
	}
}

// drain pops every available chain and has it handled; false means the
// ring is unusable. Each chain's buffers are guest memory: the read lock
// on it is taken before the walk and released when the chain is
// answered, so that the front end cannot unmap them in between.
func (b *Backend) drain(q *queue) bool {
	quick, _ := b.dev.(Quicker)
	for {
		q.sem <- struct{}{} // a slot for the next chain
		b.memMu.RLock()
		q.mu.Lock()
		var head uint16
		var ok bool
		var err error
		if q.ring.desc != nil {
			head, ok, err = q.ring.next()
		}
		if !ok || err != nil {
			usable, again := q.ring.desc != nil && err == nil, false
			if usable && q.ring.eventIdx {
				// Ask for a kick at the next chain, then look again: one
				// may have come before the guest saw the request.
				q.ring.setAvailEvent()
				again = q.ring.pending()
			}
			q.mu.Unlock()
			b.memMu.RUnlock()
			<-q.sem
			if err != nil {
				b.log.Error("virtqueue", "queue", q.index, "err", err)
			}
			if again {
				continue
			}
			return usable
		}
		chain, err := q.ring.walk(&b.mem, head)
		alone := err == nil && quick != nil && len(q.sem) == 1 && !q.ring.pending()
		q.mu.Unlock()
		q.inflight.Add(1)
		if alone && quick.Quick(q.index, chain) {
			b.serveChain(q, head, chain, nil)
			continue
		}
		go b.serveChain(q, head, chain, err)
	}
}

// serveChain answers a chain walked by drain, which holds the read lock on
// guest memory for it.
func (b *Backend) serveChain(q *queue, head uint16, c *Chain, walkErr error) {
	defer func() { <-q.sem; q.inflight.Done() }()
	defer b.memMu.RUnlock()
	written := 0
	if walkErr != nil {
		b.log.Warn("dropping malformed request", "queue", q.index, "err", walkErr)
	} else {
		written = b.dev.Handle(q.index, c)
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.ring.used == nil {
		return
	}
	q.ring.push(head, uint32(written))
	if q.call >= 0 && q.ring.needSignal() {
		unix.Write(q.call, u64(1))
	}
}
