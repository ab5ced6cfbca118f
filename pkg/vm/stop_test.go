package vm

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestStopSkipsSelf: the monitor that removes its own abandoned
// container finds its own pid in the record. Stop must not signal it: the
// monitor catches SIGTERM, so it would wait the whole timeout for itself
// and then SIGKILL itself before the record is removed. The test process
// stands in for the monitor: its command line holds the "state
// directory" (its binary's directory), so only the pid check spares it:
// a SIGTERM would end the test binary (go test does not catch it).
func TestStopSkipsSelf(t *testing.T) {
	dir := filepath.Dir(os.Args[0])
	if !cmdlineHas(os.Getpid(), dir) {
		t.Fatalf("the test's command line does not hold %s", dir)
	}
	Stop(dir, os.Getpid(), 5*time.Second)
}
