//go:build parallel

package integration

import (
	"testing"
	"time"
)

// TestParallelBuilds (make test-parallel): three VM-mode and three
// container-mode KIWI oem builds at once on one host, the container-mode
// ones over a loop capacity of four (two devices each, so one waits; the
// VM boxes use their guests' own loop devices), every build downloading
// from the mirror; all succeed with identical package lists and nothing
// is left behind. Then the same six one after another, for the total
// time.
func TestParallelBuilds(t *testing.T) {
	ensureBox(t)
	p := newPodman(t, 4, "")
	desc := renderDescription(t, "bookworm-oem", nil)
	modes := []string{"vm", "container", "vm", "container", "vm", "container"}
	wall, builds, waiting := runBuilds(t, p, desc, modes, true)
	checkBuilds(t, builds)
	if waiting == 0 {
		t.Errorf("loop status never showed a waiting request")
	}
	t.Logf("6 builds at once: %s (%s; up to %d waiting for loop devices)", wall.Round(time.Second), modeTimes(builds), waiting)
	seqWall, seq, _ := runBuilds(t, p, desc, modes, false)
	checkBuilds(t, seq)
	t.Logf("the same one after another: %s (%s); at once / one after another = %.2f", seqWall.Round(time.Second), modeTimes(seq), wall.Seconds()/seqWall.Seconds())
}
