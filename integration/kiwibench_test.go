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
		d := at[i+1].Sub(at[i])
		if d < 0 { // the log has times of day: the build crossed midnight
			d += 24 * time.Hour
		}
		out[names[i]] = d.Seconds()
	}
	return out
}

// BenchmarkKiwiBuild builds the oem description with `kiwi-shim boxbuild`
// in container mode (runc), in VM mode with KIWI's tree on the scratch
// disk and the description and target shared over virtio-fs (the
// default) or over 9p, and in VM mode with KIWI's tree on the virtio-fs
// share of the target directory (`--scratch 0`: kiwi-sharefs in mapped
// mode keeps the tree's device nodes as plain files). It prints the wall
// times and the phases from KIWI's log. Under TCG each VM build takes 12
// to 14 minutes on the scratch disk.
//
// KIWI's tree on the 9p share is listed, not run: debootstrap makes
// device nodes in the tree and checks that they work, and on 9p they
// cannot be opened (ENXIO).
func BenchmarkKiwiBuild(b *testing.B) {
	ensureBox(b)
	guestRelease(b)
	desc := renderDescription(b, "bookworm-oem", nil)
	variants := []struct {
		name string
		args []string
	}{
		{"container (runc)", []string{"--container"}},
		{"vm scratch+virtiofs", nil},
		{"vm scratch+9p", []string{"--9p-sharing"}},
		{"vm tree-on-virtiofs", []string{"--scratch", "0"}},
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
	fmt.Printf("\n%-20s %8s", "variant", "wall-s")
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
		fmt.Printf("%-20s %8.0f", v.name, wall)
		for _, p := range kiwiPhases[:len(kiwiPhases)-1] {
			fmt.Printf(" %9.0f", phases[p.name])
		}
		fmt.Println()
	}
	fmt.Printf("%-20s %8s  (debootstrap's device nodes in the tree: ENXIO on 9p)\n", "vm tree-on-9p", "n/a")
}
