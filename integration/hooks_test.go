package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// TestHooks: hooks from podman's hooks.d (prestart, poststart, poststop)
// run once each, in order, with podman's bundle (not kiwi-shim's
// rewritten one) and a sensible status, in VM mode and in container mode.
func TestHooks(t *testing.T) {
	guestRelease(t)
	for _, mode := range []string{"vm", "container"} {
		t.Run(mode, func(t *testing.T) {
			p := newPodman(t, 2, "")
			rootfs := busyboxRootfs(t)
			dir := t.TempDir()
			hooksDir := filepath.Join(dir, "hooks.d")
			logFile := filepath.Join(dir, "hooks.log")
			hook := filepath.Join(dir, "hook.sh")
			// The stage, then the state on one line.
			body := fmt.Sprintf("#!/bin/sh\nstate=$(cat)\necho \"$1 $state\" >>%q\n", logFile)
			if err := os.WriteFile(hook, []byte(body), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.MkdirAll(hooksDir, 0o755); err != nil {
				t.Fatal(err)
			}
			stages := []string{"prestart", "poststart", "poststop"}
			for _, stage := range stages {
				js := fmt.Sprintf(`{"version":"1.0.0","hook":{"path":%q,"args":["hook.sh",%q]},"when":{"always":true},"stages":[%q]}`, hook, stage, stage)
				if err := os.WriteFile(filepath.Join(hooksDir, stage+".json"), []byte(js), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			id := p.must("--hooks-dir", hooksDir, "create", "--annotation", "io.kiwi-shim.mode="+mode, "--rootfs", rootfs, "sh", "-c", "echo in-box")
			p.must("--hooks-dir", hooksDir, "start", "--attach", id)
			p.must("--hooks-dir", hooksDir, "rm", id)

			b, err := os.ReadFile(logFile)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("hook log:\n%s", b)
			lines := strings.Split(strings.TrimSpace(string(b)), "\n")
			if len(lines) != len(stages) {
				t.Fatalf("%d hook runs, want %d (one per stage)", len(lines), len(stages))
			}
			wantStatus := map[string][]specs.ContainerState{
				"prestart":  {specs.StateCreating, specs.StateCreated},
				"poststart": {specs.StateRunning, specs.StateStopped}, // the box may be done already
				// podman runs hooks.d's poststop itself, after the
				// runtime's delete (libpod's extension stage).
				"poststop": {specs.StateStopped},
			}
			if mode == "container" {
				// runc 1.1 runs poststart before it records the
				// container as running: its own behaviour, kept.
				wantStatus["poststart"] = append(wantStatus["poststart"], specs.StateCreated)
			}
			for i, l := range lines {
				stage, js, _ := strings.Cut(l, " ")
				if stage != stages[i] {
					t.Errorf("run %d: stage %s, want %s", i, stage, stages[i])
				}
				var st specs.State
				if err := json.Unmarshal([]byte(js), &st); err != nil {
					t.Fatalf("%s: state %q: %v", stage, js, err)
				}
				if !strings.HasPrefix(id, st.ID) {
					t.Errorf("%s: id %q, want %s", stage, st.ID, id)
				}
				if want := "/overlay-containers/" + id + "/userdata"; !strings.HasSuffix(st.Bundle, want) {
					t.Errorf("%s: bundle %q, want podman's (…%s)", stage, st.Bundle, want)
				}
				ok := false
				for _, s := range wantStatus[stage] {
					ok = ok || st.Status == s
				}
				if !ok {
					t.Errorf("%s: status %q, want one of %v", stage, st.Status, wantStatus[stage])
				}
				if stage == "prestart" && st.Pid <= 0 {
					t.Errorf("prestart: pid %d", st.Pid)
				}
			}
		})
	}
}
