package vm

import (
	"bufio"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
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
			b, _ := json.Marshal(mc)
			if err := os.WriteFile(filepath.Join(dir, MonitorConfigFile), b, 0o600); err != nil {
				t.Fatal(err)
			}
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			done := make(chan int, 1)
			go func() {
				code, _ := Run(dir, w, slog.New(slog.NewTextHandler(io.Discard, nil)))
				w.Close()
				done <- code
			}()
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
