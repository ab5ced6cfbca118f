package deviceplugin

import (
	"sync"
	"time"

	"github.com/kiwi-shim/kiwi-shim/pkg/loopdev"
)

// allocation is a lease the plugin holds for a container that has not
// adopted it yet.
type allocation struct {
	id    string
	lease *loopdev.Lease
	// devices are the lease's devices' names, "loopN".
	devices []string
	// slots are the kubelet's device ids of the allocation.
	slots []string
	since time.Time
}

// ledger is the plugin's table of allocations not yet adopted. Entries
// leave it when a keeper adopts them, when the kubelet reuses one of
// their slots, when they are older than the adopt bound, or when the
// plugin stops; whoever takes an entry out releases or hands over its
// lease, so no lease is released twice or while it is being handed over.
type ledger struct {
	mu     sync.Mutex
	byID   map[string]*allocation
	bySlot map[string]string
}

func newLedger() *ledger {
	return &ledger{byID: map[string]*allocation{}, bySlot: map[string]string{}}
}

// add records a.
func (l *ledger) add(a *allocation) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.byID[a.id] = a
	for _, s := range a.slots {
		l.bySlot[s] = a.id
	}
}

// remove takes a out of the ledger; call with l.mu held.
func (l *ledger) remove(a *allocation) {
	delete(l.byID, a.id)
	for _, s := range a.slots {
		if l.bySlot[s] == a.id {
			delete(l.bySlot, s)
		}
	}
}

// take takes the allocation id out, or returns nil.
func (l *ledger) take(id string) *allocation {
	l.mu.Lock()
	defer l.mu.Unlock()
	a := l.byID[id]
	if a != nil {
		l.remove(a)
	}
	return a
}

// takeSlots takes out the allocations that hold any of slots: the
// kubelet gives a slot to a new allocation only after the pod that had
// it is gone, so such an allocation will never be adopted.
func (l *ledger) takeSlots(slots []string) []*allocation {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []*allocation
	for _, s := range slots {
		if id, ok := l.bySlot[s]; ok {
			a := l.byID[id]
			l.remove(a)
			out = append(out, a)
		}
	}
	return out
}

// takeOlder takes out the allocations made before t.
func (l *ledger) takeOlder(t time.Time) []*allocation {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []*allocation
	for _, a := range l.byID {
		if a.since.Before(t) {
			l.remove(a)
			out = append(out, a)
		}
	}
	return out
}

// takeAll empties the ledger.
func (l *ledger) takeAll() []*allocation {
	return l.takeOlder(time.Unix(1<<62, 0))
}

// len is the number of allocations waiting for adoption.
func (l *ledger) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.byID)
}
