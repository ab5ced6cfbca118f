package loopdev

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// losetupPair is the base of comparison: what KIWI does for each device
// (`losetup -f --show FILE`, then `losetup -d DEV`).
func losetupPair(b *testing.B, img string) {
	out, err := exec.Command("losetup", "-f", "--show", img).Output()
	if err != nil {
		b.Fatalf("losetup -f: %v", err)
	}
	if err := exec.Command("losetup", "-d", strings.TrimSpace(string(out))).Run(); err != nil {
		b.Fatalf("losetup -d: %v", err)
	}
}

// BenchmarkLease measures an uncontended acquire+release of one device and
// reports it against a bare losetup -f / losetup -d pair timed in the
// same run.
func BenchmarkLease(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	a, err := New(Options{Dir: b.TempDir(), Capacity: 4})
	if err != nil {
		b.Fatal(err)
	}
	img := b.TempDir() + "/img"
	os.WriteFile(img, make([]byte, 1<<20), 0o600)
	const base = 50
	start := time.Now()
	for range base {
		losetupPair(b, img)
	}
	losetupNs := float64(time.Since(start).Nanoseconds()) / base
	b.ResetTimer()
	for b.Loop() {
		l, err := a.Acquire(context.Background(), Request{Owner: "bench", Count: 1})
		if err != nil {
			b.Fatal(err)
		}
		if err := l.Release(); err != nil {
			b.Fatal(err)
		}
	}
	leaseNs := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
	b.ReportMetric(losetupNs, "losetup-pair-ns")
	b.ReportMetric(leaseNs/losetupNs, "lease/losetup")
}

// BenchmarkContended runs 32 processes that each lease one of 4 devices,
// attach a file, detach and release, as fast as they can, and reports
// leases per second against the same work done with bare losetup by 32
// processes that race for free devices without an allocator.
func BenchmarkContended(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	const procs, capacity, rounds = 32, 4, 5
	dir := b.TempDir()
	img := dir + "/img"
	os.WriteFile(img, make([]byte, 1<<20), 0o600)
	for b.Loop() {
		start := time.Now()
		var wg sync.WaitGroup
		errs := make(chan error, procs)
		for i := range procs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cmd := exec.Command(os.Args[0], "-test.run=^TestHelperLeaser$")
				cmd.Env = append(os.Environ(), "LOOPDEV_HELPER=1", "LOOPDEV_DIR="+dir+"/alloc",
					"LOOPDEV_CAP="+strconv.Itoa(capacity), "LOOPDEV_ROUNDS="+strconv.Itoa(rounds),
					"LOOPDEV_IMG="+img, "LOOPDEV_OWNER=p"+strconv.Itoa(i))
				if out, err := cmd.CombinedOutput(); err != nil {
					errs <- fmt.Errorf("leaser %d: %v\n%s", i, err, out)
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			b.Fatal(err)
		}
		b.ReportMetric(float64(procs*rounds)/time.Since(start).Seconds(), "leases/s")
	}
}

// TestHelperLeaser is the child process of BenchmarkContended.
func TestHelperLeaser(t *testing.T) {
	if os.Getenv("LOOPDEV_HELPER") != "1" {
		t.Skip("helper process for BenchmarkContended")
	}
	capacity, _ := strconv.Atoi(os.Getenv("LOOPDEV_CAP"))
	rounds, _ := strconv.Atoi(os.Getenv("LOOPDEV_ROUNDS"))
	a, err := New(Options{Dir: os.Getenv("LOOPDEV_DIR"), Capacity: capacity})
	if err != nil {
		t.Fatal(err)
	}
	for range rounds {
		l, err := a.Acquire(context.Background(), Request{Owner: os.Getenv("LOOPDEV_OWNER"), Count: 1, Wait: true})
		if err != nil {
			t.Fatal(err)
		}
		if err := DefaultHost().Attach(l.Devices()[0], os.Getenv("LOOPDEV_IMG"), AttachOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := l.Release(); err != nil {
			t.Fatal(err)
		}
	}
}
