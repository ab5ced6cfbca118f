package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// boxbuild runs `kiwi-shim boxbuild` with its own state root, work and
// scratch directories, and checks that it leaves all three empty.
func boxbuild(t testing.TB, args ...string) result {
	t.Helper()
	dir := t.TempDir()
	root, work, scratch := filepath.Join(dir, "root"), filepath.Join(dir, "work"), filepath.Join(dir, "scratch")
	conf := filepath.Join(dir, "kiwi-shim.toml")
	body := fmt.Sprintf("work_dir = %q\n[vm]\nscratch_dir = %q\n[loop]\ndir = %q\n", work, scratch, filepath.Join(dir, "loop"))
	if err := os.WriteFile(conf, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	leaveClean(t, "")
	noVMLeft(t)
	start := time.Now()
	r := run(t, nil, shim(), append([]string{"--root", root, "--config", conf, "boxbuild"}, args...)...)
	t.Logf("boxbuild %s: exit %d after %s", strings.Join(args, " "), r.code, time.Since(start).Round(time.Second))
	for _, d := range []string{filepath.Join(root, "containers"), work, scratch} {
		if left, _ := os.ReadDir(d); len(left) > 0 {
			t.Errorf("boxbuild left %d entries in %s", len(left), d)
		}
	}
	return r
}

// TestBoxbuildVM: `kiwi-shim boxbuild` builds the oem description in VM
// mode (TCG here) with KIWI's tree on the guest-local scratch disk: the
// image, KIWI's log and result files reach the target directory.
func TestBoxbuildVM(t *testing.T) {
	ensureBox(t)
	guestRelease(t)
	out := filepath.Join(t.TempDir(), "target")
	r := boxbuild(t, "--box-memory", "4G", "--", "--description", renderDescription(t, "bookworm-oem", nil), "--target-dir", out)
	if r.code != 0 {
		log, _ := os.ReadFile(filepath.Join(out, "build", "image-root.log"))
		t.Fatalf("boxbuild exit %d\n%s\n%s\nKIWI log tail:\n%s", r.code, tailLines(r.stdout, 20), tailLines(r.stderr, 20), tailLines(string(log), 20))
	}
	checkImage(t, out)
	for _, f := range []string{"kiwi.result.json", "build/image-root.log"} {
		if _, err := os.Stat(filepath.Join(out, f)); err != nil {
			t.Errorf("result %s: %v", f, err)
		}
	}
	if _, err := os.Stat(filepath.Join(out, "build", "image-root")); err == nil {
		t.Error("KIWI's image root crossed the share: it belongs on the scratch disk")
	}
}

// TestBoxbuildFailure: a description naming an unknown package fails the
// build: boxbuild exits non-zero with KIWI's error, unlike KIWI's own
// plugin, and cleans up.
func TestBoxbuildFailure(t *testing.T) {
	ensureBox(t)
	desc := renderDescription(t, "bookworm-oem", func(s string) string {
		return strings.Replace(s, `<package name="hello"/>`, `<package name="kiwi-shim-no-such-package"/>`, 1)
	})
	r := boxbuild(t, "--container", "--", "--description", desc, "--target-dir", filepath.Join(t.TempDir(), "target"))
	if r.code == 0 || !strings.Contains(r.stdout+r.stderr, "kiwi-shim-no-such-package") {
		t.Fatalf("exit %d, want KIWI's failure naming the package:\n%s\n%s", r.code, tailLines(r.stdout, 20), r.stderr)
	}
	// Bad command lines fail before anything starts.
	for _, args := range [][]string{
		{"--", "--target-dir", "/tmp/x"},
		{"--box", "no-such-box", "--", "--description", desc, "--target-dir", t.TempDir()},
		{"--9p-sharing", "--virtiofs-sharing", "--", "--description", desc, "--target-dir", t.TempDir()},
	} {
		if r := boxbuild(t, args...); r.code == 0 || r.stderr == "" {
			t.Errorf("boxbuild %v: exit %d, stderr %q; want a one-line error", args, r.code, r.stderr)
		}
	}
}
