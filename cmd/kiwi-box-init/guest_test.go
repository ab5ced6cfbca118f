package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// checkProgram refuses what runc refuses, in runc's words, and the status
// a shell gives each case follows from the error.
func TestCheckProgram(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "exe")
	plain := filepath.Join(dir, "plain")
	os.WriteFile(exe, []byte("#!/bin/sh\n"), 0o755)
	os.WriteFile(plain, []byte("data\n"), 0o644)
	env := []string{"PATH=" + dir}
	for _, tc := range []struct {
		prog, msg string
		status    int
	}{
		{exe, "", 0},
		{"exe", "", 0},
		{dir, `exec: "` + dir + `": permission denied`, 126},
		{plain, `exec: "` + plain + `": permission denied`, 126},
		{filepath.Join(dir, "missing"), `exec: "` + dir + `/missing": stat ` + dir + `/missing: no such file or directory`, 127},
		{"missing", `exec: "missing": executable file not found in $PATH`, 127},
		// A file without an execute bit is not found in PATH, as with Go's LookPath.
		{"plain", `exec: "plain": executable file not found in $PATH`, 127},
	} {
		err := checkProgram(vmproto.Process{Args: []string{tc.prog}, Env: env, Cwd: "/"})
		if tc.msg == "" {
			if err != nil {
				t.Errorf("%s: %v", tc.prog, err)
			}
			continue
		}
		if err == nil || err.Error() != tc.msg {
			t.Errorf("%s: %v, want %s", tc.prog, err, tc.msg)
			continue
		}
		if s := startStatus(err); s != tc.status {
			t.Errorf("%s: status %d, want %d", tc.prog, s, tc.status)
		}
	}
}

func TestProcPathsOf(t *testing.T) {
	cfg := &vmproto.Config{
		Mounts:        []vmproto.Mount{{Destination: "/proc", Type: "proc"}, {Destination: "/dev", Type: "devtmpfs"}},
		MaskedPaths:   []string{"/proc/kcore", "/sys/firmware", "/procfoo", "/proc/timer_list"},
		ReadonlyPaths: []string{"/proc/sys", "/sys/fs"},
	}
	pp := procPathsOf(cfg)
	if !pp.mounted || strings.Join(pp.Masked, " ") != "/proc/kcore /proc/timer_list" || strings.Join(pp.Readonly, " ") != "/proc/sys" {
		t.Fatalf("%+v", pp)
	}
	cfg.Mounts = cfg.Mounts[1:]
	if procPathsOf(cfg).mounted {
		t.Fatal("no /proc mount, yet mounted")
	}
}

func TestRegistered(t *testing.T) {
	const fs = "nodev\tsysfs\nnodev\tproc\n\text4\n\tfuseblk\nnodev\tfuse\n"
	for _, tt := range []struct {
		name string
		want bool
	}{{"ext4", true}, {"proc", true}, {"fuse", true}, {"ext", false}, {"nodev", false}, {"", false}, {"xfs", false}} {
		if got := registered(fs, tt.name); got != tt.want {
			t.Errorf("registered(%q) = %v, want %v", tt.name, got, tt.want)
		}
	}
}
