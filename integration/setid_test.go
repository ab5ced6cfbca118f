package integration

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// TestShareClearsSetIDOnWrite: a process without CAP_FSETID (a box's root
// has none by default) that appends to a set-user-ID and set-group-ID,
// group-executable file loses both bits, as on a local file system: on
// the box's root and on a bind-mounted share in a VM (virtio-fs), on a
// kiwi-sharefs host mount, and with runc for reference.
func TestShareClearsSetIDOnWrite(t *testing.T) {
	guestRelease(t)
	noVMLeft(t)
	t.Run("host mount", func(t *testing.T) {
		src := t.TempDir()
		prog := filepath.Join(src, "prog")
		if err := os.WriteFile(prog, []byte("#!/bin/sh\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := unix.Chmod(prog, 06777); err != nil {
			t.Fatal(err)
		}
		mnt := sharefsMount(t, src)
		// An unprivileged user must reach the mount point.
		for d := filepath.Dir(mnt); d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
			os.Chmod(d, 0o755)
		}
		r := run(t, nil, "setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "sh", "-c", "echo more >> "+filepath.Join(mnt, "prog"))
		if r.code != 0 {
			t.Fatalf("write as nobody: exit %d: %s", r.code, r.stderr)
		}
		var st unix.Stat_t
		if err := unix.Stat(prog, &st); err != nil {
			t.Fatal(err)
		}
		if got := st.Mode & 07777; got != 0o777 {
			t.Errorf("mode %#o after an unprivileged write through the host mount, want 0777", got)
		}
	})
	for _, rt := range []string{"runc", "vm"} {
		t.Run(rt, func(t *testing.T) {
			dir := t.TempDir()
			leaveClean(t, dir)
			share := filepath.Join(dir, "share")
			if err := os.Mkdir(share, 0o755); err != nil {
				t.Fatal(err)
			}
			bundle := busyboxBundle(t, dir, `"sh", "-c", "echo more >> /share/prog && echo more >> /prog && echo appended"`, `{}`, true)
			addBind(t, bundle, share, "/share")
			progs := []string{filepath.Join(share, "prog"), filepath.Join(bundle, "rootfs", "prog")}
			for _, p := range progs {
				if err := os.WriteFile(p, []byte("#!/bin/sh\n"), 0o600); err != nil {
					t.Fatal(err)
				}
				if err := unix.Chmod(p, 06777); err != nil {
					t.Fatal(err)
				}
			}
			var out string
			if rt == "runc" {
				r := run(t, nil, "runc", "--root", filepath.Join(dir, "runc-root"), "run", "--bundle", bundle, "setid-runc")
				out = r.stdout + r.stderr
			} else {
				out = runVMBundle(t, dir, bundle, "setid-vm", nil)
			}
			if !strings.Contains(out, "appended") {
				t.Fatalf("the container did not write:\n%s", out)
			}
			for _, p := range progs {
				var st unix.Stat_t
				if err := unix.Stat(p, &st); err != nil {
					t.Fatal(err)
				}
				if got := st.Mode & 07777; got != 0o777 {
					t.Errorf("%s: mode %#o after an unprivileged write, want 0777", p, got)
				}
			}
		})
	}
}

// addBind adds a read-write bind mount of src at dst to bundle's spec.
func addBind(t testing.TB, bundle, src, dst string) {
	t.Helper()
	editSpec(t, bundle, func(s *specs.Spec) {
		s.Mounts = append(s.Mounts, specs.Mount{Destination: dst, Type: "bind", Source: src, Options: []string{"rbind", "rw"}})
	})
}

// editSpec changes bundle's config.json with edit.
func editSpec(t testing.TB, bundle string, edit func(*specs.Spec)) {
	t.Helper()
	p := filepath.Join(bundle, "config.json")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var s specs.Spec
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatal(err)
	}
	edit(&s)
	if b, err = json.Marshal(&s); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
}
