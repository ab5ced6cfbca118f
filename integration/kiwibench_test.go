package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// kiwiPhases are markers in KIWI's log that start a phase, in order.
var kiwiPhases = []struct{ name, marker string }{
	{"prepare", "Loading XML description"},
	{"bootstrap", "Installing bootstrap packages"},
	{"packages", "Installing system (chroot)"},
	{"disk", "Creating raw disk image"},
	{"results", "Result files"},
}

// kiwiPhaseTimes extracts the seconds between phase markers of KIWI's log.
func kiwiPhaseTimes(log string) map[string]float64 {
	var at []time.Time
	var names []string
	for _, p := range kiwiPhases {
		for _, l := range strings.Split(log, "\n") {
			if !strings.Contains(l, p.marker) {
				continue
			}
			if i := strings.Index(l, "]: "); i >= 0 && len(l) > i+11 {
				if t, err := time.Parse("15:04:05", l[i+3:i+11]); err == nil {
					at = append(at, t)
					names = append(names, p.name)
				}
			}
			break
		}
	}
	out := map[string]float64{}
	for i := 0; i+1 < len(at); i++ {
		out[names[i]] = at[i+1].Sub(at[i]).Seconds()
	}
	return out
}

// BenchmarkKiwiBuild builds the oem description with `kiwi-shim boxbuild`
// in container mode (runc), in VM mode on the scratch disk (the default),
// and in VM mode directly on the shared target directory over virtio-fs
// and over 9p; it prints the wall times and the phases from KIWI's log.
// Under TCG each VM build takes 10 to 20 minutes.
func BenchmarkKiwiBuild(b *testing.B) {
	ensureBox(b)
	guestRelease(b)
	desc := renderDescription(b, "bookworm-oem", nil)
	variants := []struct {
		name string
		args []string
	}{
		{"container (runc)", []string{"--container"}},
		{"vm scratch disk", nil},
		{"vm virtio-fs", []string{"--scratch", "0", "--virtiofs-sharing"}},
		{"vm 9p", []string{"--scratch", "0", "--9p-sharing"}},
	}
	if v := os.Getenv("KIWI_BENCH_VARIANTS"); v != "" {
		var keep = variants[:0]
		for _, x := range variants {
			if strings.Contains(v, strings.Fields(x.name)[1]) || strings.Contains(v, x.name) {
				keep = append(keep, x)
			}
		}
		variants = keep
	}
	fmt.Printf("\n%-18s %8s", "variant", "wall-s")
	for _, p := range kiwiPhases[:len(kiwiPhases)-1] {
		fmt.Printf(" %9s", p.name)
	}
	fmt.Println()
	for _, v := range variants {
		out := filepath.Join(b.TempDir(), "target")
		start := time.Now()
		r := boxbuild(b, append(append(v.args, "--box-memory", "4G", "--"), "--description", desc, "--target-dir", out)...)
		wall := time.Since(start).Seconds()
		if r.code != 0 {
			b.Fatalf("%s: exit %d\n%s", v.name, r.code, tailLines(r.stderr+r.stdout, 30))
		}
		log, _ := os.ReadFile(filepath.Join(out, "build", "image-root.log"))
		phases := kiwiPhaseTimes(string(log))
		fmt.Printf("%-18s %8.0f", v.name, wall)
		for _, p := range kiwiPhases[:len(kiwiPhases)-1] {
			fmt.Printf(" %9.0f", phases[p.name])
		}
		fmt.Println()
	}
}
