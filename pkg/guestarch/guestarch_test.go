package guestarch

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// header makes an ELF header for a machine.
func header(class, data byte, machine uint16) []byte {
	h := make([]byte, 64)
	copy(h, "\x7fELF")
	h[4], h[5], h[6] = class, data, 1
	if data == 2 {
		binary.BigEndian.PutUint16(h[18:], machine)
	} else {
		binary.LittleEndian.PutUint16(h[18:], machine)
	}
	return h
}

func TestFromELFHeader(t *testing.T) {
	for _, tc := range []struct {
		name string
		h    []byte
		want string
		err  bool
	}{
		{"x86_64", header(2, 1, emX86_64), "x86_64", false},
		{"aarch64", header(2, 1, emAArch64), "aarch64", false},
		{"s390x", header(2, 2, emS390), "s390x", false},
		{"ppc64le", header(2, 1, emPPC64), "ppc64le", false},
		{"ppc64 big endian", header(2, 2, emPPC64), "", true},
		{"riscv64", header(2, 1, emRISCV), "riscv64", false},
		{"i386", header(1, 1, 3), "", true},
		{"32-bit arm", header(1, 1, 40), "", true},
		{"bad data encoding", header(2, 7, emX86_64), "", true},
		{"short", []byte("\x7fELF\x02\x01"), "", true},
		{"script", []byte("#!/bin/sh\necho hello world, this is long enough\n"), "", true},
		{"empty", nil, "", true},
	} {
		got, err := FromELFHeader(tc.h)
		if got != tc.want || (err != nil) != tc.err {
			t.Errorf("%s: got %q, %v; want %q, error %v", tc.name, got, err, tc.want, tc.err)
		}
	}
}

func TestNormalize(t *testing.T) {
	for in, want := range map[string]string{"amd64": "x86_64", "ARM64": "aarch64", "aarch64": "aarch64", "ppc64el": "ppc64le", "mips": "", "": ""} {
		if got := Normalize(in); got != want {
			t.Errorf("Normalize(%q) = %q, want %q", in, got, want)
		}
	}
}

// rootfs builds a small root file system: an aarch64 "busybox" behind an
// absolute symlink, a script whose interpreter is it, an x86_64 binary
// outside the root that a symlink tries to reach.
func rootfs(t *testing.T) (string, string) {
	t.Helper()
	dir := t.TempDir()
	root := filepath.Join(dir, "rootfs")
	outside := filepath.Join(dir, "outside")
	for _, d := range []string{"bin", "usr/bin", "work", "dev"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	os.MkdirAll(outside, 0o755)
	os.WriteFile(filepath.Join(root, "bin/busybox"), header(2, 1, emAArch64), 0o755)
	os.Symlink("/bin/busybox", filepath.Join(root, "bin/sh"))
	os.WriteFile(filepath.Join(root, "usr/bin/tool"), []byte("#!/bin/sh -e\necho hi\n"), 0o755)
	os.WriteFile(filepath.Join(root, "usr/bin/loop"), []byte("#!/usr/bin/loop\n"), 0o755)
	os.WriteFile(filepath.Join(outside, "x86"), header(2, 1, emX86_64), 0o755)
	// Absolute and relative escapes: both resolve inside the root.
	os.Symlink(filepath.Join(outside, "x86"), filepath.Join(root, "usr/bin/abs-escape"))
	os.Symlink("../../../outside/x86", filepath.Join(root, "usr/bin/rel-escape"))
	os.WriteFile(filepath.Join(root, "work/local"), header(2, 1, emRISCV), 0o755)
	// Never opened for reading: a FIFO would block a reader.
	syscall.Mkfifo(filepath.Join(root, "usr/bin/fifo"), 0o755)
	return root, outside
}

func TestFromRootfs(t *testing.T) {
	root, _ := rootfs(t)
	for _, tc := range []struct {
		argv0, cwd string
		env        []string
		want       string
		err        bool
	}{
		{"sh", "/", nil, "aarch64", false},
		{"/bin/sh", "/", nil, "aarch64", false},
		{"tool", "/", []string{"PATH=/usr/bin"}, "aarch64", false},
		{"./local", "/work", nil, "riscv64", false},
		{"local", "/", []string{"PATH=/nowhere:/work"}, "riscv64", false},
		{"missing", "/", nil, "", true},
		{"loop", "/", nil, "", true},
		{"abs-escape", "/", nil, "", true},
		{"rel-escape", "/", nil, "", true},
		{"/dev", "/", nil, "", true},
		{"fifo", "/", nil, "", true},
		{"", "/", nil, "", true},
	} {
		got, err := FromRootfs(root, tc.argv0, tc.cwd, tc.env)
		if got != tc.want || (err != nil) != tc.err {
			t.Errorf("FromRootfs(%q, cwd %q, %v) = %q, %v; want %q, error %v", tc.argv0, tc.cwd, tc.env, got, err, tc.want, tc.err)
		}
	}
	if _, err := FromRootfs(filepath.Join(root, "nope"), "sh", "/", nil); err == nil {
		t.Error("missing rootfs accepted")
	}
	if _, err := FromRootfs(root, "tool", "/", []string{"PATH=/usr/bin"}); errors.Is(err, ErrNotELF) {
		t.Error("script not followed")
	}
}

func FuzzFromELFHeader(f *testing.F) {
	f.Add(header(2, 1, emAArch64))
	f.Add(header(2, 2, emS390))
	f.Add([]byte("#!/bin/sh\n"))
	f.Fuzz(func(t *testing.T, h []byte) {
		arch, err := FromELFHeader(h)
		if (err == nil) != (arch != "") {
			t.Fatalf("arch %q with error %v", arch, err)
		}
		if err == nil && Normalize(arch) != arch {
			t.Fatalf("unnormalized arch %q", arch)
		}
	})
}
