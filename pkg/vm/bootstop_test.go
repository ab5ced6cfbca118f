package vm

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmshare"
	"golang.org/x/sys/unix"
)

// TestStopDuringBoot: a kill at any moment of the boot ends the box with
// 128+signal and says so, never with the guest console's last line (the
// firmware's banner, when the guest had not got further).
func TestStopDuringBoot(t *testing.T) {
	for _, tc := range []struct {
		sig  int
		want int
		name string
	}{{9, 137, "SIGKILL"}, {15, 143, "SIGTERM"}} {
		t.Run(tc.name, func(t *testing.T) {
			dir, err := os.MkdirTemp("/tmp", "kbs")
			if err != nil {
				t.Fatal(err)
			}
			defer os.RemoveAll(dir)
			// A QEMU that never boots, with a console that shows the
			// firmware's banner.
			qemu := filepath.Join(dir, "qemu")
			os.WriteFile(qemu, []byte("#!/bin/sh\nexec sleep 60\n"), 0o755)
			mc := MonitorConfig{ID: "t", QEMU: qemu, BootTimeout: time.Minute,
				Machine: Machine{QEMU: qemu, Arch: HostArch(), Accel: "tcg", MemoryMiB: 128, CPUs: 1, Kernel: "/k", Initrd: "/i"}}
			mc.Paths(dir)
			os.WriteFile(mc.Machine.ConsoleLog, []byte("Press Ctrl-B to configure iPXE\n"), 0o600)
			done, r := runMonitor(t, dir, mc)
			deadline := time.Now().Add(20 * time.Second)
			for {
				st, err := QueryState(dir)
				_, qerr := os.Stat(filepath.Join(dir, qemuPidFile))
				if err == nil && st.Status == "creating" && qerr == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("monitor not booting: %v %v", err, qerr)
				}
				time.Sleep(50 * time.Millisecond)
			}
			if err := Signal(dir, tc.sig, false); err != nil {
				t.Fatalf("kill during boot: %v", err)
			}
			select {
			case code := <-done:
				if code != tc.want {
					t.Errorf("status %d, want %d", code, tc.want)
				}
			case <-time.After(20 * time.Second):
				t.Fatal("the box did not end")
			}
			line, _ := bufio.NewReader(r).ReadString('\n')
			if !strings.Contains(line, "stopped by "+tc.name+" during its boot") || strings.Contains(line, "iPXE") {
				t.Errorf("create got %q", line)
			}
		})
	}
}

// TestShareFSDiesDuringBoot: a kiwi-sharefs that dies while the guest
// boots ends the boot at once with that reason, instead of leaving the
// guest to wait on its root until the boot timeout.
func TestShareFSDiesDuringBoot(t *testing.T) {
	dir, err := os.MkdirTemp("/tmp", "kbs")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	qemu := filepath.Join(dir, "qemu")
	os.WriteFile(qemu, []byte("#!/bin/sh\nexec sleep 60\n"), 0o755)
	// Ready, then gone: as when it is killed once the VM is booting.
	sfs := filepath.Join(dir, "kiwi-sharefs")
	os.WriteFile(sfs, []byte("#!/bin/sh\necho ready >&3\nsleep 0.2\nexit 1\n"), 0o755)
	mc := MonitorConfig{ID: "t", QEMU: qemu, BootTimeout: time.Minute,
		ShareFS: &ShareFS{Binary: sfs, Exports: []vmshare.Export{{Tag: "root", Source: dir, Socket: "root.sock"}}},
		Machine: Machine{QEMU: qemu, Arch: HostArch(), Accel: "tcg", MemoryMiB: 128, CPUs: 1, Kernel: "/k", Initrd: "/i"}}
	mc.Paths(dir)
	start := time.Now()
	done, r := runMonitor(t, dir, mc)
	select {
	case code := <-done:
		line, _ := bufio.NewReader(r).ReadString('\n')
		if code == 0 || !strings.Contains(line, "kiwi-sharefs") || !strings.Contains(line, "died during boot") {
			t.Errorf("status %d, ready line %q; want a failure naming kiwi-sharefs", code, line)
		}
		t.Logf("ended after %s: %s", time.Since(start).Round(time.Millisecond), strings.TrimSpace(line))
	case <-time.After(30 * time.Second):
		t.Fatal("the boot went on without its file server")
	}
}

// runMonitor writes mc into dir, gives the monitor create's go-ahead and
// runs it. It returns the channel of its exit status and the read end of
// its ready pipe (closed when the test ends).
func runMonitor(t *testing.T, dir string, mc MonitorConfig) (<-chan int, *os.File) {
	t.Helper()
	b, _ := json.Marshal(mc)
	if err := os.WriteFile(filepath.Join(dir, MonitorConfigFile), b, 0o600); err != nil {
		t.Fatal(err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	goR, goW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	goW.WriteString("go\n")
	goW.Close()
	done := make(chan int, 1)
	go func() {
		code, _ := Run(dir, w, goR, slog.New(slog.NewTextHandler(io.Discard, nil)))
		w.Close()
		done <- code
	}()
	return done, r
}

// TestKilledFromOutside: a QEMU that a signal from outside ended ends
// the box (a restore does not fall back to a cold boot); one that
// crashed by itself does not count as killed from outside.
func TestKilledFromOutside(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&qemuKilledError{sig: unix.SIGKILL}, true},
		{&qemuKilledError{sig: unix.SIGTERM}, true},
		{fmt.Errorf("QMP: %w", &qemuKilledError{sig: unix.SIGHUP}), true},
		{&qemuKilledError{sig: unix.SIGSEGV}, false},
		{&qemuKilledError{sig: unix.SIGABRT}, false},
		{&badTemplateError{errors.New("load of migration failed")}, false},
		{errors.New("control port: timeout"), false},
		{nil, false},
	} {
		if got := killedFromOutside(tc.err); got != tc.want {
			t.Errorf("killedFromOutside(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
	for sig, want := range map[unix.Signal]string{
		unix.SIGKILL: "QEMU was killed by SIGKILL during the boot (from outside",
		unix.SIGSEGV: "QEMU crashed (SIGSEGV) during the boot",
	} {
		if msg := (&qemuKilledError{sig: sig}).Error(); !strings.HasPrefix(msg, want) {
			t.Errorf("%s: message %q, want it to start with %q", unix.SignalName(sig), msg, want)
		}
	}
}

// TestGuestCrashErrorFound: the crash error is found through wrapping,
// and names the console only when it is kept.
func TestGuestCrashErrorFound(t *testing.T) {
	err := fmt.Errorf("make template: %w", &guestCrashError{line: "Oops: int3: 0000 [#1] PREEMPT SMP NOPTI"})
	var crash *guestCrashError
	if !errors.As(err, &crash) || crash.line != "Oops: int3: 0000 [#1] PREEMPT SMP NOPTI" {
		t.Fatalf("errors.As(%v) = %v", err, crash)
	}
	if got, want := err.Error(), "make template: the VM's kernel crashed during boot: Oops: int3: 0000 [#1] PREEMPT SMP NOPTI"; got != want {
		t.Errorf("message %q, want %q", got, want)
	}
	kept := &guestCrashError{line: "Kernel panic - not syncing: x", console: "/run/c/console.log"}
	if got := kept.Error(); !strings.HasSuffix(got, "(guest console: /run/c/console.log)") {
		t.Errorf("message %q names no console", got)
	}
}
