package loopdev

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// ErrBusy is returned by Acquire when a request that must not wait finds
// too few free devices or other requests ahead of it.
var ErrBusy = errors.New("no free loop device")

// maxIndex bounds the search for a free device index; the kernel's minor
// number space for loop devices is 20 bits.
const maxIndex = 1 << 20

// detachTimeout is how long a release waits for a device that is still
// open elsewhere to let go.
const detachTimeout = 5 * time.Second

// Options configure an Allocator.
type Options struct {
	// Dir holds the allocator's locks, queue and leases. Every process that
	// shares the host's loop devices must use the same directory.
	Dir string
	// Capacity caps the number of devices leased at once; 0 means the
	// host's capacity (see Host.HostCapacity).
	Capacity int
	// Host is the loop driver to use; nil means the real host.
	Host *Host
	// Logger receives debug and warning messages; nil discards them.
	Logger *slog.Logger
}

// Allocator leases loop devices. It holds no state of its own besides its
// configuration: everything lives in the directory and in kernel locks, so
// any number of Allocators in any number of processes can share one.
type Allocator struct {
	dir      string
	capacity int
	host     Host
	log      *slog.Logger
}

// New returns an Allocator over opts.Dir, creating the directory.
func New(opts Options) (*Allocator, error) {
	if opts.Dir == "" {
		return nil, errors.New("loop allocator: no state directory given")
	}
	host := DefaultHost()
	if opts.Host != nil {
		host = *opts.Host
	}
	if host.ClaimDir == "" {
		return nil, errors.New("loop allocator: the host has no claim directory")
	}
	capacity := opts.Capacity
	if capacity < 0 {
		return nil, fmt.Errorf("loop capacity %d: must not be negative", capacity)
	}
	if capacity == 0 {
		c, err := host.HostCapacity()
		if err != nil {
			return nil, err
		}
		capacity = c
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	a := &Allocator{dir: opts.Dir, capacity: capacity, host: host, log: log}
	for _, d := range []string{a.dir, a.queueDir(), a.leaseDir(), host.ClaimDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("loop allocator: %w", err)
		}
	}
	return a, nil
}

// Capacity is the number of devices the allocator leases at most at once.
func (a *Allocator) Capacity() int { return a.capacity }

// Dir is the allocator's state directory.
func (a *Allocator) Dir() string { return a.dir }

func (a *Allocator) queueDir() string { return filepath.Join(a.dir, "queue") }
func (a *Allocator) leaseDir() string { return filepath.Join(a.dir, "leases") }

func (a *Allocator) leasePath(d Device) string {
	return filepath.Join(a.leaseDir(), d.Name()+".lease")
}

// Request asks for devices.
type Request struct {
	// Owner names the holder in status output, e.g. a container id.
	Owner string
	// Count is the number of devices wanted, 1..Capacity.
	Count int
	// Wait queues the request until devices are free (bounded by the
	// context); without it Acquire fails at once with ErrBusy.
	Wait bool
}

// Record is what a lease file says about its holder.
type Record struct {
	Device string    `json:"device"`
	Owner  string    `json:"owner"`
	PID    int       `json:"pid"`
	Since  time.Time `json:"since"`
}

func validOwner(s string) error {
	if s == "" {
		return errors.New("lease owner is empty")
	}
	if len(s) > 256 || strings.ContainsAny(s, "\x00\n\r") {
		return fmt.Errorf("lease owner %.40q: at most 256 characters and no control characters", s)
	}
	return nil
}

// Acquire leases req.Count devices for req.Owner. Each device is free (not
// bound, no partition nodes) when handed out. Requests are served in the
// order they arrived, across processes.
func (a *Allocator) Acquire(ctx context.Context, req Request) (*Lease, error) {
	if err := validOwner(req.Owner); err != nil {
		return nil, err
	}
	if req.Count < 1 || req.Count > a.capacity {
		return nil, fmt.Errorf("loop device count %d: must be between 1 and the capacity %d", req.Count, a.capacity)
	}
	mu, err := a.openMutex()
	if err != nil {
		return nil, err
	}
	defer mu.Close()
	w, err := a.enqueue(mu, req)
	if err != nil {
		return nil, err
	}
	defer w.leave()
	// The watcher is made only once a request has to wait: closing an
	// inotify instance costs the kernel an RCU grace period (~10ms), which
	// would triple the cost of an uncontended lease.
	var watch *watcher
	defer func() {
		if watch != nil {
			watch.Close()
		}
	}()
	for {
		lease, why, err := a.tryGrant(mu, w, req)
		if err != nil || lease != nil {
			return lease, err
		}
		if !req.Wait {
			return nil, fmt.Errorf("%w: %s", ErrBusy, why)
		}
		if watch == nil {
			// Watch, then look again: a release between the first look
			// and the watch must not be missed.
			if watch, err = newWatcher(a.queueDir(), a.leaseDir()); err != nil {
				return nil, err
			}
			continue
		}
		a.log.Debug("waiting for loop devices", "owner", req.Owner, "count", req.Count, "reason", why)
		if err := watch.wait(ctx, 500*time.Millisecond); err != nil {
			return nil, fmt.Errorf("wait for %d loop device(s) (%s): %w", req.Count, why, err)
		}
	}
}

func (a *Allocator) openMutex() (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(a.dir, "lock"), os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("loop allocator: %w", err)
	}
	return f, nil
}

// withMutex runs fn holding the allocator mutex.
func withMutex(mu *os.File, fn func() error) error {
	if err := lockWait(mu); err != nil {
		return err
	}
	defer unlock(mu)
	return fn()
}

// waiter is one queued request: its ticket and the locked queue file that
// tells others it is alive.
type waiter struct {
	ticket uint64
	file   *os.File
}

func (w *waiter) leave() {
	os.Remove(w.file.Name())
	w.file.Close()
}

func (a *Allocator) enqueue(mu *os.File, req Request) (*waiter, error) {
	var w *waiter
	err := withMutex(mu, func() error {
		tp := filepath.Join(a.dir, "ticket")
		var last uint64
		if b, err := os.ReadFile(tp); err == nil {
			last, _ = strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
		}
		var (
			t uint64
			p string
			f *os.File
		)
		// A ticket file lost or reset (e.g. /run cleared) must not hand out
		// a ticket that a live waiter already has: skip taken ones.
		for t = last + 1; ; t++ {
			p = filepath.Join(a.queueDir(), fmt.Sprintf("%020d.wait", t))
			var err error
			f, err = os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL|unix.O_CLOEXEC, 0o600)
			if err == nil {
				break
			}
			if !errors.Is(err, os.ErrExist) {
				return fmt.Errorf("queue: %w", err)
			}
		}
		if err := os.WriteFile(tp, []byte(strconv.FormatUint(t, 10)+"\n"), 0o600); err != nil {
			f.Close()
			os.Remove(p)
			return fmt.Errorf("queue ticket: %w", err)
		}
		if ok, err := tryLock(f); !ok || err != nil {
			f.Close()
			os.Remove(p)
			return fmt.Errorf("queue: cannot lock %s: %v", p, err)
		}
		rec := Record{Owner: req.Owner, PID: os.Getpid(), Since: time.Now().UTC()}
		if err := writeRecord(f, rec); err != nil {
			f.Close()
			os.Remove(p)
			return err
		}
		w = &waiter{ticket: t, file: f}
		return nil
	})
	return w, err
}

// queue lists the live waiters' tickets in order, removing entries whose
// waiter died. Call with the mutex held.
func (a *Allocator) queue() ([]uint64, error) {
	ents, err := os.ReadDir(a.queueDir())
	if err != nil {
		return nil, fmt.Errorf("read queue: %w", err)
	}
	var live []uint64
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), ".wait")
		if !ok {
			continue
		}
		t, err := strconv.ParseUint(name, 10, 64)
		if err != nil {
			continue
		}
		p := filepath.Join(a.queueDir(), e.Name())
		held, err := heldElsewhere(p)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if !held {
			os.Remove(p)
			continue
		}
		live = append(live, t)
	}
	sort.Slice(live, func(i, j int) bool { return live[i] < live[j] })
	return live, nil
}

// tryGrant leases the devices if w is at the head of the queue and enough
// are free. Otherwise it returns nil and says why.
func (a *Allocator) tryGrant(mu *os.File, w *waiter, req Request) (*Lease, string, error) {
	var (
		lease *Lease
		why   string
	)
	err := withMutex(mu, func() error {
		q, err := a.queue()
		if err != nil {
			return err
		}
		if len(q) > 0 && q[0] != w.ticket {
			ahead := sort.Search(len(q), func(i int) bool { return q[i] >= w.ticket })
			why = fmt.Sprintf("%d request(s) ahead in the queue", ahead)
			return nil
		}
		held, err := a.reap()
		if err != nil {
			return err
		}
		if free := a.capacity - len(held); free < req.Count {
			owners := make([]string, 0, len(held))
			for _, h := range held {
				owners = append(owners, h.Owner)
			}
			why = fmt.Sprintf("%d of %d loop devices leased (by %s)", len(held), a.capacity, strings.Join(owners, ", "))
			return nil
		}
		lease, err = a.grant(req, held)
		return err
	})
	return lease, why, err
}

// Holder is one leased device as status reports it.
type Holder struct {
	Record
	// Stale marks a lease whose holder died and whose device could not be
	// cleaned yet (e.g. it is still mounted somewhere); it still counts
	// against the capacity.
	Stale bool `json:"stale,omitempty"`
	// Backing is the file bound to the device, if any.
	Backing string `json:"backing,omitempty"`
}

// reap returns the current holders and cleans leases whose holder died:
// it detaches their device, removes its partitions and deletes the lease.
// Call with the mutex held.
func (a *Allocator) reap() ([]Holder, error) {
	ents, err := os.ReadDir(a.leaseDir())
	if err != nil {
		return nil, fmt.Errorf("read leases: %w", err)
	}
	var held []Holder
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), ".lease")
		if !ok {
			continue
		}
		d, err := ParseDevice(name)
		if err != nil {
			continue
		}
		p := filepath.Join(a.leaseDir(), e.Name())
		h, err := a.inspect(p, d)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if h.Stale {
			if err := a.cleanStale(p, d); err != nil {
				a.log.Warn("stale loop lease not cleaned yet", "device", d.Path(), "owner", h.Owner, "err", err)
				held = append(held, h)
			}
			continue
		}
		held = append(held, h)
	}
	sort.Slice(held, func(i, j int) bool { return held[i].Device < held[j].Device })
	return held, nil
}

func (a *Allocator) inspect(p string, d Device) (Holder, error) {
	live, err := heldElsewhere(p)
	if err != nil {
		return Holder{}, err
	}
	var h Holder
	if b, err := os.ReadFile(p); err == nil {
		_ = json.Unmarshal(b, &h.Record)
	}
	h.Device = d.Path()
	h.Stale = !live
	h.Backing, _ = a.host.BackingFile(d)
	return h, nil
}

// cleanStale takes over a lease whose holder died, detaches the device and
// removes the lease. On failure the lease file stays, unlocked, so the
// device keeps counting against the capacity and the next call retries.
// A device that another allocator has claimed since is that allocator's:
// the stale lease goes, the device stays as it is.
func (a *Allocator) cleanStale(p string, d Device) error {
	f, err := os.OpenFile(p, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if ok, err := tryLock(f); err != nil || !ok {
		return fmt.Errorf("lease %s taken over by another process", p)
	}
	claim, err := a.host.claim(d)
	if err != nil {
		return err
	}
	if claim == nil {
		a.log.Info("stale loop lease dropped: the device is leased by another allocator now", "device", d.Path())
		return os.Remove(p)
	}
	defer claim.Close()
	if err := a.host.Detach(d, detachTimeout); err != nil {
		return err
	}
	a.log.Info("cleaned stale loop lease", "device", d.Path())
	return os.Remove(p)
}

// grant picks req.Count free devices and leases them. Call with the mutex
// held, with held from reap.
func (a *Allocator) grant(req Request, held []Holder) (*Lease, error) {
	taken := make(map[string]bool, len(held))
	for _, h := range held {
		taken[h.Device] = true
	}
	l := &Lease{a: a, owner: req.Owner, since: time.Now().UTC()}
	for idx := 0; len(l.devs) < req.Count; idx++ {
		if idx >= maxIndex {
			l.Release()
			return nil, fmt.Errorf("%w: every loop device index is in use", ErrBusy)
		}
		d := Device{Index: idx}
		if taken[d.Path()] {
			continue
		}
		claim, err := a.host.claim(d)
		if err != nil {
			l.Release()
			return nil, err
		}
		if claim == nil {
			continue // leased through another allocator directory
		}
		f, skip, err := a.leaseFree(d, req, l.since)
		if err != nil || skip {
			claim.Close()
			if err != nil {
				l.Release()
				return nil, err
			}
			continue
		}
		l.devs = append(l.devs, d)
		l.files = append(l.files, f)
		l.claims = append(l.claims, claim)
	}
	a.log.Debug("leased loop devices", "owner", req.Owner, "devices", l.devs)
	return l, nil
}

// leaseFree writes and locks the lease of a claimed device if the device
// is free; skip says it is not (bound by somebody outside the allocators,
// stale partitions that will not go, a lease file locked elsewhere).
func (a *Allocator) leaseFree(d Device, req Request, since time.Time) (f *os.File, skip bool, err error) {
	bound, err := a.host.Bound(d)
	if err != nil || bound {
		return nil, bound, err
	}
	if parts, _ := a.host.Partitions(d); len(parts) > 0 {
		// A crashed build left partition nodes on a detached device;
		// they would confuse the next one.
		if err := a.host.Detach(d, detachTimeout); err != nil {
			a.log.Warn("skipping loop device with stale partitions", "device", d.Path(), "err", err)
			return nil, true, nil
		}
	}
	if err := a.host.Ensure(d); err != nil {
		return nil, false, err
	}
	f, err = os.OpenFile(a.leasePath(d), os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, false, fmt.Errorf("lease %s: %w", d, err)
	}
	if ok, err := tryLock(f); err != nil || !ok {
		f.Close()
		return nil, true, nil
	}
	rec := Record{Device: d.Path(), Owner: req.Owner, PID: os.Getpid(), Since: since}
	if err := writeRecord(f, rec); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, false, err
	}
	return f, false, nil
}

func writeRecord(f *os.File, rec Record) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	if err := f.Truncate(0); err != nil {
		return fmt.Errorf("write %s: %w", f.Name(), err)
	}
	if _, err := f.WriteAt(append(b, '\n'), 0); err != nil {
		return fmt.Errorf("write %s: %w", f.Name(), err)
	}
	return nil
}

// Status is a snapshot of the allocator.
type Status struct {
	// Capacity is the most devices leased at once.
	Capacity int `json:"capacity"`
	// Held lists the leased devices.
	Held []Holder `json:"held"`
	// Waiting is the number of queued requests.
	Waiting int `json:"waiting"`
}

// Status reports capacity, holders and waiters. Like every allocator call,
// it first cleans leases whose holders died.
func (a *Allocator) Status() (Status, error) {
	mu, err := a.openMutex()
	if err != nil {
		return Status{}, err
	}
	defer mu.Close()
	st := Status{Capacity: a.capacity, Held: []Holder{}}
	err = withMutex(mu, func() error {
		held, err := a.reap()
		if err != nil {
			return err
		}
		q, err := a.queue()
		if err != nil {
			return err
		}
		if held != nil {
			st.Held = held
		}
		st.Waiting = len(q)
		return nil
	})
	return st, err
}

// Lease is a set of leased devices. It stays valid while the process that
// acquired it (or any process that inherited its Files) lives.
type Lease struct {
	a     *Allocator
	owner string
	since time.Time
	mu    sync.Mutex
	devs  []Device
	files []*os.File
	// claims are the devices' host-wide claims, in the order of devs.
	claims []*os.File
}

// Devices are the leased devices (none once released or closed).
func (l *Lease) Devices() []Device {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]Device(nil), l.devs...)
}

// Since is when the lease was granted. Grants are serialised, so the
// order of Since is the order in which requests were served.
func (l *Lease) Since() time.Time { return l.since }

// Files are the locked lease and claim files. A child process that
// inherits them keeps the lease alive for as long as it lives.
func (l *Lease) Files() []*os.File {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append(append([]*os.File(nil), l.files...), l.claims...)
}

// Release detaches the devices, removes their partition nodes and gives
// them back. A device that cannot be detached stays accounted as a stale
// lease and is retried by later calls. Release is idempotent.
func (l *Lease) Release() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	var errs []error
	for i, d := range l.devs {
		f := l.files[i]
		if err := l.a.host.Detach(d, detachTimeout); err != nil {
			errs = append(errs, fmt.Errorf("release %s: %w", d, err))
		} else if err := os.Remove(f.Name()); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("release %s: %w", d, err))
		}
		f.Close()
		l.claims[i].Close()
	}
	l.devs, l.files, l.claims = nil, nil, nil
	return errors.Join(errs...)
}

// Owner is the name the lease was granted to.
func (l *Lease) Owner() string { return l.owner }

// Close drops this process's hold on the lease without detaching or
// releasing anything: the lease lives on in every process that still has
// its Files (one it handed them to, see Adopt). If none does, the lease
// goes stale and the next allocator call cleans it, as after a crash.
// Close is idempotent; the Lease is empty afterwards.
func (l *Lease) Close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := range l.devs {
		l.files[i].Close()
		l.claims[i].Close()
	}
	l.devs, l.files, l.claims = nil, nil, nil
}

// Adopt makes a Lease of the files of a lease another process holds and
// has handed to this one (over a unix socket, as SCM_RIGHTS): for each of
// devs, in order, its lease file and its claim file, as Lease.Files lists
// them. It checks that every file is the one this allocator keeps for its
// device and that the open file still holds the lock, so a stale or
// forged hand-over cannot pass for a lease; then it records owner and
// this process as the holder. Adopt takes ownership of files: on error
// it closes them all.
func (a *Allocator) Adopt(owner string, devs []Device, files []*os.File) (*Lease, error) {
	fail := func(err error) (*Lease, error) {
		for _, f := range files {
			f.Close()
		}
		return nil, err
	}
	if err := validOwner(owner); err != nil {
		return fail(err)
	}
	if len(devs) == 0 || len(files) != 2*len(devs) {
		return fail(fmt.Errorf("adopt loop lease: %d file(s) for %d device(s), want two per device", len(files), len(devs)))
	}
	l := &Lease{a: a, owner: owner, since: time.Now().UTC()}
	n := len(devs)
	for i, d := range devs {
		lf, cf := files[i], files[n+i]
		if err := holdsLockOn(lf, a.leasePath(d)); err != nil {
			return fail(fmt.Errorf("adopt %s: %w", d, err))
		}
		if err := holdsLockOn(cf, filepath.Join(a.host.ClaimDir, d.Name())); err != nil {
			return fail(fmt.Errorf("adopt %s: %w", d, err))
		}
		l.devs = append(l.devs, d)
		l.files = append(l.files, lf)
		l.claims = append(l.claims, cf)
		if i > 0 && slices.Contains(devs[:i], d) {
			return fail(fmt.Errorf("adopt loop lease: %s named twice", d))
		}
	}
	for _, f := range l.files {
		var rec Record
		if b, err := io.ReadAll(io.NewSectionReader(f, 0, 4096)); err == nil {
			_ = json.Unmarshal(b, &rec)
		}
		rec.Owner, rec.PID = owner, os.Getpid()
		if err := writeRecord(f, rec); err != nil {
			return fail(err)
		}
	}
	a.log.Debug("adopted loop lease", "owner", owner, "devices", l.devs)
	return l, nil
}

// holdsLockOn checks that f is the file at path (not one that a release
// removed and a new lease recreated) and that f's open file holds the
// exclusive lock on it: re-taking an OFD lock through the open file that
// holds it succeeds, through any other it fails.
func holdsLockOn(f *os.File, path string) error {
	var fst, pst unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &fst); err != nil {
		return fmt.Errorf("stat handed-over file: %w", err)
	}
	if err := unix.Stat(path, &pst); err != nil {
		return fmt.Errorf("lease file %s: %w", path, err)
	}
	if fst.Dev != pst.Dev || fst.Ino != pst.Ino {
		return fmt.Errorf("the handed-over file is not %s", path)
	}
	held, err := heldElsewhere(path)
	if err != nil {
		return err
	}
	if !held {
		return fmt.Errorf("%s is not locked: its holder let go", path)
	}
	ok, err := tryLock(f)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%s is locked by another holder", path)
	}
	return nil
}

// AcquireDevices leases exactly devs for owner, without waiting and
// without queueing: it is for a holder that was promised these devices
// (a Kubernetes allocation) and whose first lease on them ended, for
// instance because the process that held them for it died. It fails if
// any of them is leased by somebody else, bound outside the allocators,
// or if the capacity would be exceeded.
func (a *Allocator) AcquireDevices(owner string, devs []Device) (*Lease, error) {
	if err := validOwner(owner); err != nil {
		return nil, err
	}
	if len(devs) < 1 || len(devs) > a.capacity {
		return nil, fmt.Errorf("loop device count %d: must be between 1 and the capacity %d", len(devs), a.capacity)
	}
	mu, err := a.openMutex()
	if err != nil {
		return nil, err
	}
	defer mu.Close()
	var lease *Lease
	err = withMutex(mu, func() error {
		held, err := a.reap()
		if err != nil {
			return err
		}
		if free := a.capacity - len(held); free < len(devs) {
			return fmt.Errorf("%w: %d of %d loop devices leased", ErrBusy, len(held), a.capacity)
		}
		l := &Lease{a: a, owner: owner, since: time.Now().UTC()}
		req := Request{Owner: owner, Count: len(devs)}
		for _, d := range devs {
			if slices.Contains(l.devs, d) {
				l.Release()
				return fmt.Errorf("lease %s: named twice", d)
			}
			if slices.ContainsFunc(held, func(h Holder) bool { return h.Device == d.Path() }) {
				l.Release()
				return fmt.Errorf("%w: %s is leased by another holder", ErrBusy, d)
			}
			claim, err := a.host.claim(d)
			if err != nil {
				l.Release()
				return err
			}
			if claim == nil {
				l.Release()
				return fmt.Errorf("%w: %s is leased through another allocator directory", ErrBusy, d)
			}
			f, skip, err := a.leaseFree(d, req, l.since)
			if err != nil || skip {
				claim.Close()
				l.Release()
				if err == nil {
					err = fmt.Errorf("%w: %s is in use outside the allocator", ErrBusy, d)
				}
				return err
			}
			l.devs = append(l.devs, d)
			l.files = append(l.files, f)
			l.claims = append(l.claims, claim)
		}
		lease = l
		return nil
	})
	if err != nil {
		return nil, err
	}
	a.log.Debug("leased named loop devices", "owner", owner, "devices", lease.devs)
	return lease, nil
}
