package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/gc"
	"github.com/kiwi-shim/kiwi-shim/pkg/initramfs"
)

// TestGC: what a crash of the whole host-side stack leaves behind, found
// and removed by `kiwi-shim gc`: a VM container whose monitor was killed
// (its scratch disk), a kiwi-sharefs whose state directory is gone, an
// orphan scratch image, a boxbuild work directory and a half-made state
// directory. A running container is left alone; a second run finds
// nothing; --records removes the stopped record.
func TestGC(t *testing.T) {
	guestRelease(t)
	noVMLeft(t)
	dir := t.TempDir()
	leaveClean(t, dir)
	root, scratch, work := filepath.Join(dir, "root"), filepath.Join(dir, "scratch"), filepath.Join(dir, "work")
	conf := filepath.Join(dir, "kiwi-shim.toml")
	os.WriteFile(conf, []byte(fmt.Sprintf("work_dir = %q\n[vm]\nscratch_dir = %q\n[loop]\ndir = %q\n", work, scratch, filepath.Join(dir, "loop"))), 0o644)
	k := func(args ...string) result {
		return run(t, nil, shim(), append([]string{"--root", root, "--config", conf}, args...)...)
	}

	// Writable: the scratch mount point is made in the root.
	bundle := busyboxBundle(t, dir, `"sleep", "600"`, `{"io.kiwi-shim.vm.scratch": "1G"}`, true)
	create := func(id string) {
		t.Helper()
		out, _ := os.Create(filepath.Join(dir, id+".out"))
		defer out.Close()
		cmd := exec.Command(shim(), "--root", root, "--config", conf, "create", "--bundle", bundle, id)
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Run(); err != nil {
			b, _ := os.ReadFile(out.Name())
			t.Fatalf("create %s: %v\n%s", id, err, b)
		}
		t.Cleanup(func() { k("delete", "--force", id) })
	}
	create("gc-alive")
	create("gc-crashed")
	// The crash: the monitor is killed; QEMU and kiwi-sharefs follow it
	// (PDEATHSIG); the record and the scratch disk stay.
	var rec struct{ Pid int }
	b, _ := os.ReadFile(filepath.Join(root, "containers", "gc-crashed", "container.json"))
	json.Unmarshal(b, &rec)
	syscall.Kill(rec.Pid, syscall.SIGKILL)
	eventually(t, 30*time.Second, "the crashed VM's processes gone", func() bool {
		return len(binaryProcessesOf("gc-crashed")) == 0
	})
	if imgs, _ := filepath.Glob(filepath.Join(scratch, "gc-crashed-*.img")); len(imgs) != 1 {
		t.Fatalf("scratch image of the crashed container: %v", imgs)
	}

	// A kiwi-sharefs whose state directory vanished (its VM's record was
	// removed by hand, say).
	gone := filepath.Join(root, "containers", "gc-gone")
	os.MkdirAll(gone, 0o700)
	share := filepath.Join(dir, "share")
	os.MkdirAll(share, 0o755)
	exports := filepath.Join(gone, "sharefs.json")
	os.WriteFile(exports, []byte(fmt.Sprintf(`[{"tag": "t", "source": %q, "socket": %q}]`, share, filepath.Join(gone, "v0.sock"))), 0o600)
	orphan := exec.Command(filepath.Join(bin, "kiwi-sharefs"), "serve", "--exports", exports)
	if err := orphan.Start(); err != nil {
		t.Fatal(err)
	}
	orphanDone := make(chan struct{})
	go func() { orphan.Wait(); close(orphanDone) }()
	t.Cleanup(func() { orphan.Process.Kill(); <-orphanDone })
	eventually(t, 10*time.Second, "kiwi-sharefs listening", func() bool {
		_, err := os.Stat(filepath.Join(gone, "v0.sock"))
		return err == nil
	})
	os.RemoveAll(gone)

	// Files nothing uses, aged past the grace period, and fresh ones.
	old := time.Now().Add(-time.Hour)
	for _, p := range []string{filepath.Join(scratch, "lost-1.img"), filepath.Join(work, "boxbuild-dead-1"), filepath.Join(root, "containers", "half-made")} {
		os.MkdirAll(filepath.Dir(p), 0o755)
		if strings.HasSuffix(p, ".img") {
			os.WriteFile(p, nil, 0o600)
		} else {
			os.MkdirAll(p, 0o700)
		}
		os.Chtimes(p, old, old)
	}
	os.WriteFile(filepath.Join(scratch, "fresh-1.img"), nil, 0o600)

	// A derived cache file unused since 2000, beside the real cache's
	// files (which the boxes above just used); --cache-age spares every
	// file younger than ten years, so that the host's own cache stays as
	// it was.
	cfg, err := config.Load(conf, false, config.Default())
	if err != nil {
		t.Fatal(err)
	}
	staleCache := filepath.Join(cfg.CacheDir, initramfs.CacheSubdir, fmt.Sprintf("kiwi-shim-test-%d.cpio", time.Now().UnixNano()))
	if err := os.WriteFile(staleCache, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(staleCache) })
	y2k := time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)
	os.Chtimes(staleCache, y2k, y2k)
	const keepHostCache = "87600h"

	r := k("gc", "--cache-age", keepHostCache)
	if r.code != 0 {
		t.Fatalf("gc: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	t.Logf("gc:\n%s", r.stdout)
	for _, want := range []string{"stopped container: gc-crashed", "orphan process: pid", "orphan scratch disk: " + filepath.Join(scratch, "lost-1.img"),
		"orphan work dir: " + filepath.Join(work, "boxbuild-dead-1"), "half-made state: " + filepath.Join(root, "containers", "half-made"),
		"unused cache file: " + staleCache} {
		if !strings.Contains(r.stdout, "removed "+want) {
			t.Errorf("gc did not say: removed %s", want)
		}
	}
	select {
	case <-orphanDone:
	case <-time.After(10 * time.Second):
		t.Error("the orphan kiwi-sharefs still runs")
	}
	if imgs, _ := filepath.Glob(filepath.Join(scratch, "gc-crashed-*.img")); len(imgs) != 0 {
		t.Errorf("the crashed container's scratch image is left: %v", imgs)
	}
	for _, p := range []string{filepath.Join(scratch, "fresh-1.img"), filepath.Join(root, "containers", "gc-crashed", "container.json")} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("gc removed %s: %v", p, err)
		}
	}
	if imgs, _ := filepath.Glob(filepath.Join(scratch, "gc-alive-*.img")); len(imgs) != 1 {
		t.Errorf("the running container's scratch image: %v", imgs)
	}
	if st := k("state", "gc-alive"); !strings.Contains(st.stdout, `"created"`) {
		t.Errorf("the running container after gc: %s%s", st.stdout, st.stderr)
	}
	os.Remove(filepath.Join(scratch, "fresh-1.img"))

	if r := k("gc", "--cache-age", keepHostCache); r.code != 0 || r.stdout != "" {
		t.Errorf("second gc: exit %d, found %q", r.code, r.stdout)
	}
	if r := k("gc", "--records", "--cache-age", "0"); r.code != 0 || !strings.Contains(r.stdout, "removed stopped record") || strings.Contains(r.stdout, "gc-alive") {
		t.Errorf("gc --records: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if _, err := os.Stat(filepath.Join(root, "containers", "gc-crashed")); !os.IsNotExist(err) {
		t.Errorf("the stopped record is left after --records: %v", err)
	}
}

// binaryProcessesOf lists processes of the binaries under test, and QEMU,
// that name the container id.
func binaryProcessesOf(id string) []gc.Proc { return processes(cmdlineHas("/" + id + "/")) }
