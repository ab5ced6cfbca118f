//go:build soak

package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestSoak (make soak): SOAK_VMS (default 8) VM-mode containers at once,
// SOAK_ROUNDS (default 3) rounds. Each writes 256 MiB of pseudo-random
// data to its share, reads it back and compares checksums with the host's
// view, and attaches a loop device to a file on the share with a
// partition table and a file system. Every container must succeed, every
// checksum match, and the resident memory of the host-side processes
// (monitors and kiwi-sharefs, summed at each round's end) stay flat.
func TestSoak(t *testing.T) {
	guestRelease(t)
	vms, rounds := envInt("SOAK_VMS", 8), envInt("SOAK_ROUNDS", 3)
	p := newPodman(t, 2, "")
	noVMLeft(t)
	rootfs := busyboxRootfs(t, "losetup", "sfdisk", "mke2fs")
	script := `set -e
head -c 268435456 /dev/urandom > /share/data
sync
sha256sum /share/data | cut -d" " -f1 > /share/guest.sum
echo 3 > /proc/sys/vm/drop_caches
sha256sum /share/data | cut -d" " -f1 > /share/guest-reread.sum
truncate -s 64M /share/disk.img
dev=$(/usr/sbin/losetup -f --show -P /share/disk.img)
printf 'label: dos\n,32M,L\n' | /usr/sbin/sfdisk -q "$dev"
/usr/sbin/losetup -d "$dev"
dev=$(/usr/sbin/losetup -f --show -P /share/disk.img)
/usr/sbin/mke2fs -q -t ext2 "${dev}p1"
/usr/sbin/losetup -d "$dev"
echo done`
	fmt.Printf("%-6s %6s %8s %14s %14s\n", "round", "ok", "wall-s", "monitor-rss-MiB", "sharefs-rss-MiB")
	var firstRSS, lastRSS int
	for round := 1; round <= rounds; round++ {
		start := time.Now()
		var wg sync.WaitGroup
		errs := make([]error, vms)
		shares := make([]string, vms)
		var peakMon, peakSFS int
		stop := make(chan struct{})
		go func() { // sample while the round runs
			for {
				select {
				case <-stop:
					return
				case <-time.After(2 * time.Second):
				}
				m, s := rssOf("vm-monitor"), rssOf("kiwi-sharefs")
				if m+s > peakMon+peakSFS {
					peakMon, peakSFS = m, s
				}
			}
		}()
		for i := range vms {
			shares[i] = t.TempDir()
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := p.run("", "run", "--rm", "--annotation", "io.kiwi-shim.vm.memory=1G", "-v", shares[i]+":/share", "--rootfs", rootfs, "sh", "-c", script)
				if r.code != 0 || !strings.Contains(r.stdout, "done") {
					errs[i] = fmt.Errorf("vm %d: exit %d: %s", i, r.code, tailLines(r.stderr, 5))
					return
				}
				host := sha256File(t, filepath.Join(shares[i], "data"))
				for _, f := range []string{"guest.sum", "guest-reread.sum"} {
					if b, _ := os.ReadFile(filepath.Join(shares[i], f)); strings.TrimSpace(string(b)) != host {
						errs[i] = fmt.Errorf("vm %d: %s %q differs from the host's %s", i, f, b, host)
					}
				}
			}()
		}
		wg.Wait()
		close(stop)
		ok := 0
		for _, err := range errs {
			if err != nil {
				t.Error(err)
			} else {
				ok++
			}
		}
		for _, s := range shares {
			os.RemoveAll(s)
		}
		fmt.Printf("%-6d %3d/%-2d %8.0f %14d %14d\n", round, ok, vms, time.Since(start).Seconds(), peakMon>>10, peakSFS>>10)
		if round == 1 {
			firstRSS = peakMon + peakSFS
		}
		lastRSS = peakMon + peakSFS
	}
	// Flat: the last round's peak within a quarter of the first's.
	if firstRSS > 0 && float64(lastRSS) > 1.25*float64(firstRSS) {
		t.Errorf("host-side memory grew from %d KiB to %d KiB over %d rounds", firstRSS, lastRSS, rounds)
	}
}

func envInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n > 0 {
		return n
	}
	return def
}

// rssOf sums the resident memory (KiB) of processes whose command line
// has word.
func rssOf(word string) int { return rssKiB(processes(cmdlineHas(word))) }

func sha256File(t *testing.T, p string) string {
	out := mustRun(t, nil, "sha256sum", p)
	f := strings.Fields(out)
	if len(f) == 0 {
		return ""
	}
	return f[0]
}
