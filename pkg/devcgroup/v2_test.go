package devcgroup

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/opencontainers/cgroups"
	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/loopdev"
)

// helperEnv makes the test binary an opener: it reads paths on stdin and
// answers "ok" or the errno of open(2) for each, so that the test can try
// device nodes from inside a cgroup it moved the helper into.
const helperEnv = "KIWI_SHIM_DEVCGROUP_OPENER"

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "1" {
		opener(os.Stdin, os.Stdout)
		return
	}
	os.Exit(m.Run())
}

func opener(in io.Reader, out io.Writer) {
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		f, err := os.OpenFile(sc.Text(), os.O_RDONLY, 0)
		switch {
		case err == nil:
			f.Close()
			fmt.Fprintln(out, "ok")
		case errors.Is(err, unix.EPERM):
			fmt.Fprintln(out, "EPERM")
		default:
			fmt.Fprintln(out, strings.ReplaceAll(err.Error(), "\n", " "))
		}
	}
}

// openerProc is a running opener.
type openerProc struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Reader
}

func startOpener(t *testing.T) *openerProc {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &openerProc{cmd: cmd, in: in, out: bufio.NewReader(out)}
	t.Cleanup(func() {
		in.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	return p
}

func (p *openerProc) open(t *testing.T, path string) string {
	t.Helper()
	if _, err := fmt.Fprintln(p.in, path); err != nil {
		t.Fatal(err)
	}
	line, err := p.out.ReadString('\n')
	if err != nil {
		t.Fatalf("opener: %v", err)
	}
	return strings.TrimSpace(line)
}

// cgroup2 mounts a private cgroup v2 hierarchy and makes a child cgroup
// in it. Device programs attach to cgroup v2 directories without any
// controller, so this works on cgroup v1 hosts too (the machines of this
// project's CI), where /sys/fs/cgroup has only v1 controllers.
func cgroup2(t *testing.T) string {
	t.Helper()
	mnt := t.TempDir()
	if err := unix.Mount("none", mnt, "cgroup2", 0, ""); err != nil {
		t.Fatalf("mount cgroup2: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
			t.Errorf("umount %s: %v", mnt, err)
		}
	})
	dir := filepath.Join(mnt, fmt.Sprintf("kiwi-shim-devcgroup-test-%d", os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// The cgroup goes with its last process; the test killed the
		// opener first (cleanups run in reverse), but the kernel may
		// take a moment to notice.
		var err error
		for range 100 {
			if err = unix.Rmdir(dir); err == nil || errors.Is(err, unix.ENOENT) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Errorf("rmdir %s: %v", dir, err)
	})
	return dir
}

// attached returns the ids of the device programs attached to dir.
func attached(dir string) ([]ebpf.ProgramID, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: ebpf.AttachCGroupDevice})
	if err != nil {
		return nil, err
	}
	ids := make([]ebpf.ProgramID, len(res.Programs))
	for i, p := range res.Programs {
		ids[i] = p.ID
	}
	return ids, nil
}

// partitionedLoop leases a loop device from a private allocator, binds
// a file with two partitions to it and returns the device and the
// numbers of its partitions.
func partitionedLoop(t *testing.T) (loopdev.Device, Dev, []Dev) {
	t.Helper()
	a, err := loopdev.New(loopdev.Options{Dir: t.TempDir(), Capacity: 1})
	if err != nil {
		t.Fatal(err)
	}
	l, err := a.Acquire(context.Background(), loopdev.Request{Owner: "devcgroup-test", Count: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Release(); err != nil {
			t.Errorf("release loop lease: %v", err)
		}
	})
	d := l.Devices()[0]
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 16<<20); err != nil {
		t.Fatal(err)
	}
	sf := exec.Command("sfdisk", "--quiet", img)
	sf.Stdin = strings.NewReader("label: gpt\n,4MiB\n,4MiB\n")
	if out, err := sf.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v: %s", err, out)
	}
	h := loopdev.DefaultHost()
	if err := h.Attach(d, img, loopdev.AttachOptions{}); err != nil {
		t.Fatal(err)
	}
	// What KIWI does: register the partitions with BLKPG.
	if out, err := exec.Command("partx", "-a", d.Path()).CombinedOutput(); err != nil {
		t.Fatalf("partx -a %s: %v: %s", d, err, out)
	}
	maj, min, err := h.DevNumber(d)
	if err != nil {
		t.Fatal(err)
	}
	var parts []Dev
	for i := 1; i <= 2; i++ {
		b, err := os.ReadFile(fmt.Sprintf("/sys/class/block/%sp%d/dev", d.Name(), i))
		if err != nil {
			t.Fatalf("partition %d of %s: %v", i, d, err)
		}
		var p Dev
		if _, err := fmt.Sscanf(strings.TrimSpace(string(b)), "%d:%d", &p.Major, &p.Minor); err != nil {
			t.Fatal(err)
		}
		parts = append(parts, p)
	}
	return d, Dev{maj, min}, parts
}

// watchCount polls the programs attached to dir until stop is closed and
// reports how many looks it took and the fewest and most programs seen.
type watchCount struct {
	looks, fewest, most atomic.Int64
	err                 atomic.Value
}

func watch(dir string, stop <-chan struct{}, wg *sync.WaitGroup) *watchCount {
	w := &watchCount{}
	w.fewest.Store(1 << 30)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			ids, err := attached(dir)
			if errors.Is(err, unix.ENOSPC) {
				// More programs than when the query counted them (a
				// new one attached before the old go): look again.
				continue
			}
			if err != nil {
				w.err.Store(err)
				return
			}
			n := int64(len(ids))
			w.looks.Add(1)
			if n < w.fewest.Load() {
				w.fewest.Store(n)
			}
			if n > w.most.Load() {
				w.most.Store(n)
			}
		}
	}()
	return w
}

// TestV2ReplacesRuncFilter plays the keeper on a cgroup v2 directory
// whose device filter was attached as runc attaches it, and proves with
// a process in that cgroup that exactly the partitions handed over can
// be opened, and that the filter is swapped in place (one program at
// every look, from a watcher polling all the while).
func TestV2ReplacesRuncFilter(t *testing.T) {
	if os.Geteuid() != 0 {
		// CI runs as root; only a developer's unprivileged run skips.
		t.Skip("needs root to mount cgroup2, load BPF programs and attach loop devices")
	}
	dir := cgroup2(t)
	loop, loopNum, parts := partitionedLoop(t)

	// Nodes as the container would have them (the keeper makes them in
	// its /dev; the cgroup decides whether they open).
	nodes := t.TempDir()
	mk := func(name string, mode uint32, maj, min uint32) string {
		p := filepath.Join(nodes, name)
		if err := unix.Mknod(p, mode|0o600, int(unix.Mkdev(maj, min))); err != nil {
			t.Fatal(err)
		}
		return p
	}
	null := mk("null", unix.S_IFCHR, 1, 3)
	loopNode := mk(loop.Name(), unix.S_IFBLK, loopNum.Major, loopNum.Minor)
	p1 := mk(loop.Name()+"p1", unix.S_IFBLK, parts[0].Major, parts[0].Minor)
	p2 := mk(loop.Name()+"p2", unix.S_IFBLK, parts[1].Major, parts[1].Minor)
	full := mk("full", unix.S_IFCHR, 1, 7)

	// runc's rules for this container: deny all, the leased loop
	// device, runc's defaults (runcBase has them for loop3).
	base := runcBase()
	base[1].Major, base[1].Minor = int64(loopNum.Major), int64(loopNum.Minor)
	// As runc does at create: the same library, onto a cgroup with no
	// program, so attached with BPF_F_ALLOW_MULTI.
	if err := cgroups.DevicesSetV2(dir, &cgroups.Resources{Devices: base}); err != nil {
		t.Fatalf("attach runc's filter: %v", err)
	}
	runcProg, err := attached(dir)
	if err != nil || len(runcProg) != 1 {
		t.Fatalf("after runc's attach: programs %v, %v; want one", runcProg, err)
	}

	op := startOpener(t)
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(fmt.Sprint(op.cmd.Process.Pid)), 0); err != nil {
		t.Fatalf("move opener into %s: %v", dir, err)
	}

	expect := func(step string, want map[string]string) {
		t.Helper()
		for _, p := range []string{null, full, loopNode, p1, p2} {
			w, ok := want[p]
			if !ok {
				w = "ok"
			}
			if got := op.open(t, p); got != w {
				t.Errorf("%s: open %s (%s): %s, want %s", step, filepath.Base(p), devOf(p), got, w)
			}
		}
	}
	expect("runc's filter", map[string]string{p1: "EPERM", p2: "EPERM"})

	v2, err := NewV2(dir, base, nil)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	w := watch(dir, stop, &wg)

	steps := []struct {
		name  string
		extra []Dev
		want  map[string]string
	}{
		{"partition 1 handed over", []Dev{parts[0]}, map[string]string{p2: "EPERM"}},
		{"both", []Dev{parts[0], parts[1]}, map[string]string{}},
		{"partition 1 gone", []Dev{parts[1]}, map[string]string{p1: "EPERM"}},
		{"all gone: runc's set again", nil, map[string]string{p1: "EPERM", p2: "EPERM"}},
	}
	prev := runcProg[0]
	for _, s := range steps {
		if err := v2.Set(context.Background(), s.extra); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		ids, err := attached(dir)
		if err != nil || len(ids) != 1 {
			t.Fatalf("%s: programs %v, %v; want exactly one", s.name, ids, err)
		}
		if ids[0] == prev {
			t.Errorf("%s: program %d was not replaced", s.name, ids[0])
		}
		prev = ids[0]
		expect(s.name, s.want)
	}
	// The same set again changes nothing.
	if err := v2.Set(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if ids, _ := attached(dir); len(ids) != 1 || ids[0] != prev {
		t.Errorf("unchanged Set replaced the program: %v, was %d", ids, prev)
	}
	close(stop)
	wg.Wait()
	if err, _ := w.err.Load().(error); err != nil {
		t.Fatalf("watcher: %v", err)
	}
	t.Logf("watcher: %d looks at the attached programs during %d replacements, fewest %d, most %d",
		w.looks.Load(), len(steps), w.fewest.Load(), w.most.Load())
	if w.looks.Load() == 0 || w.fewest.Load() != 1 || w.most.Load() != 1 {
		t.Errorf("watcher saw between %d and %d programs in %d looks, want always exactly one",
			w.fewest.Load(), w.most.Load(), w.looks.Load())
	}
}

func devOf(p string) string {
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		return "?"
	}
	return fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
}
