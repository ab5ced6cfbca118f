package integration

//lint:file-ignore SA1019 prestart hooks are deprecated, but engines still use them

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
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
			if mode == "vm" {
				// As runc's prestart and createRuntime hooks: the
				// container is still being created.
				wantStatus["prestart"] = []specs.ContainerState{specs.StateCreating}
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

// TestHooksRuntime drives kiwi-shim's CLI with hooks in config.json, as
// containerd and runtime-tools do: prestart, createRuntime, poststart and
// poststop run in that order with the caller's bundle; a failing
// createRuntime hook fails create with its stderr, runs poststop and
// leaves nothing; VM mode refuses createContainer hooks.
func TestHooksRuntime(t *testing.T) {
	guestRelease(t)
	for _, mode := range []string{"vm", "container"} {
		t.Run(mode, func(t *testing.T) {
			dir := t.TempDir()
			leaveClean(t, dir)
			root := filepath.Join(dir, "root")
			env := loopEnv(t, 2)
			bundle := busyboxBundle(t, dir, `"true"`, fmt.Sprintf(`{"io.kiwi-shim.mode": %q}`, mode), false)
			logFile := filepath.Join(dir, "hooks.log")
			hook := filepath.Join(dir, "hook.sh")
			// "state ID" as the hook's extra arguments: it also asks
			// kiwi-shim for the container's state while it runs.
			stateLog := filepath.Join(dir, "state.log")
			body := fmt.Sprintf("#!/bin/sh\nstate=$(cat)\necho \"$1 $state\" >>%q\n[ \"$2\" = fail ] && { echo hook-said-no >&2; exit 5; }\n"+
				"[ \"$2\" = state ] && echo \"$1 $(%q --root %q state \"$3\" 2>&1 | tr -d '\\n')\" >>%q\nexit 0\n", logFile, shim(), root, stateLog)
			if err := os.WriteFile(hook, []byte(body), 0o755); err != nil {
				t.Fatal(err)
			}
			h := func(stage string, extra ...string) []specs.Hook {
				return []specs.Hook{{Path: hook, Args: append([]string{"hook.sh", stage}, extra...)}}
			}
			setHooks := func(hs *specs.Hooks) {
				t.Helper()
				editSpec(t, bundle, func(s *specs.Spec) { s.Hooks = hs })
				os.Remove(logFile)
			}
			k := func(args ...string) result {
				return run(t, env, shim(), append([]string{"--root", root}, args...)...)
			}
			create := func(id string) (string, error) {
				out, _ := os.Create(filepath.Join(dir, id+".out"))
				defer out.Close()
				cmd := exec.Command(shim(), "--root", root, "create", "--bundle", bundle, id)
				cmd.Env = append(os.Environ(), env...)
				cmd.Stdout, cmd.Stderr = out, out
				err := cmd.Run()
				b, _ := os.ReadFile(out.Name())
				return string(b), err
			}
			stagesRun := func() []string {
				t.Helper()
				b, _ := os.ReadFile(logFile)
				t.Logf("hook log:\n%s", b)
				var got []string
				for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
					stage, js, ok := strings.Cut(l, " ")
					if !ok {
						continue
					}
					var st specs.State
					if err := json.Unmarshal([]byte(js), &st); err != nil {
						t.Fatalf("%s: state %q: %v", stage, js, err)
					}
					if st.Bundle != bundle {
						t.Errorf("%s: bundle %q, want %q", stage, st.Bundle, bundle)
					}
					got = append(got, stage)
				}
				return got
			}

			setHooks(&specs.Hooks{Prestart: h("prestart"), CreateRuntime: h("createRuntime"), Poststart: h("poststart"), Poststop: h("poststop")})
			if out, err := create("h1"); err != nil {
				t.Fatalf("create: %v\n%s", err, out)
			}
			t.Cleanup(func() { k("delete", "--force", "h1") })
			if r := k("start", "h1"); r.code != 0 {
				t.Fatalf("start: %s", r.stderr)
			}
			eventually(t, 60*time.Second, "stopped", func() bool { return strings.Contains(k("state", "h1").stdout, `"status": "stopped"`) })
			if r := k("delete", "h1"); r.code != 0 {
				t.Fatalf("delete: %s", r.stderr)
			}
			if got, want := strings.Join(stagesRun(), " "), "prestart createRuntime poststart poststop"; got != want {
				t.Errorf("stages %q, want %q", got, want)
			}

			setHooks(&specs.Hooks{CreateRuntime: h("createRuntime", "fail"), Poststop: h("poststop")})
			out, err := create("h2")
			if err == nil {
				k("delete", "--force", "h2")
				t.Fatal("create succeeded with a failing createRuntime hook")
			}
			if !strings.Contains(out, "hook-said-no") {
				t.Errorf("create's error lacks the hook's stderr:\n%s", out)
			}
			if got, want := strings.Join(stagesRun(), " "), "createRuntime poststop"; got != want {
				t.Errorf("after a failing createRuntime: stages %q, want %q", got, want)
			}
			if r := k("state", "h2"); r.code == 0 {
				t.Errorf("state after failed create: %s", r.stdout)
			}

			if mode == "vm" {
				// kiwi-shim state while create runs the hooks: creating.
				// (Container mode is runc's answer, not asked here.)
				setHooks(&specs.Hooks{Prestart: h("prestart", "state", "h4"), CreateRuntime: h("createRuntime", "state", "h4")})
				if out, err := create("h4"); err != nil {
					t.Fatalf("create: %v\n%s", err, out)
				}
				k("delete", "--force", "h4")
				b, _ := os.ReadFile(stateLog)
				for _, stage := range []string{"prestart", "createRuntime"} {
					if !regexp.MustCompile(`(?m)^` + stage + ` .*"status": "creating"`).Match(b) {
						t.Errorf("%s: kiwi-shim state during the hook was not creating:\n%s", stage, b)
					}
				}

				setHooks(&specs.Hooks{CreateContainer: h("createContainer")})
				out, err := create("h3")
				if err == nil || !strings.Contains(out, "createContainer hooks") || !strings.Contains(out, "not supported in VM mode") {
					k("delete", "--force", "h3")
					t.Errorf("createContainer in VM mode: %v\n%s", err, out)
				}
			}
		})
	}
}

// TestVMKillDuringBoot: `kill` of a VM container that is still booting
// (create has not returned) ends it with the signal, and create says so
// instead of the guest console's last line; nothing is left. Both ways a
// box boots: cold (the kill lands while the guest's kernel boots) and
// restored from a template (the kill lands while the restore waits for
// its QEMU, which a wrapper holds for two seconds: a restore takes a
// fraction of one, too short to aim at otherwise).
func TestVMKillDuringBoot(t *testing.T) {
	guestRelease(t)
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatal(err)
	}
	for _, restored := range []bool{false, true} {
		name := "cold"
		if restored {
			name = "restored"
		}
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			leaveClean(t, dir)
			root := filepath.Join(dir, "root")
			args := []string{"--root", root}
			env := []string{config.EnvTemplate + "=off"}
			if restored {
				wrapper := filepath.Join(dir, "qemu-system-x86_64")
				script := fmt.Sprintf("#!/bin/sh\ncase \" $* \" in *\" -incoming \"*) sleep 2 ;; esac\nexec %q \"$@\"\n", qemu)
				conf := filepath.Join(dir, "kiwi-shim.toml")
				toml := fmt.Sprintf("[vm]\ntemplate = \"auto\"\ntemplate_dir = %q\nqemu = { x86_64 = %q }\n", filepath.Join(dir, "templates"), wrapper)
				if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(conf, []byte(toml), 0o644); err != nil {
					t.Fatal(err)
				}
				args = append(args, "--config", conf)
				env = []string{config.EnvTemplate + "=auto"}
				if r := run(t, env, shim(), append(args, "setup", "--template")...); r.code != 0 {
					t.Fatalf("setup --template: exit %d\n%s%s", r.code, r.stdout, r.stderr)
				}
			}
			bundle := busyboxBundle(t, dir, `"true"`, `{"io.kiwi-shim.mode": "vm"}`, false)
			k := func(a ...string) result {
				return run(t, env, shim(), append(append([]string{}, args...), a...)...)
			}
			out, _ := os.Create(filepath.Join(dir, "create.out"))
			defer out.Close()
			create := exec.Command(shim(), append(append([]string{}, args...), "create", "--bundle", bundle, "kb")...)
			create.Env = append(os.Environ(), env...)
			create.Stdout, create.Stderr = out, out
			if err := create.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { k("delete", "--force", "kb") })
			eventually(t, 60*time.Second, "creating", func() bool { return strings.Contains(k("state", "kb").stdout, `"status": "creating"`) })
			// QEMU is up (cold: the firmware or the kernel is running;
			// restored: the wrapper holds it before the load).
			eventually(t, 60*time.Second, "QEMU started", func() bool {
				_, err := os.Stat(filepath.Join(root, "containers", "kb", "qemu.pid"))
				return err == nil
			})
			time.Sleep(time.Second)
			if r := k("kill", "kb", "KILL"); r.code != 0 {
				t.Fatalf("kill during boot: %s", r.stderr)
			}
			err := create.Wait()
			b, _ := os.ReadFile(out.Name())
			if err == nil || !strings.Contains(string(b), "stopped by SIGKILL during its boot") || strings.Contains(string(b), "console") {
				t.Fatalf("create: %v\n%s", err, b)
			}
			t.Logf("create: %v: %s", err, b)
			if r := k("state", "kb"); r.code == 0 {
				t.Errorf("state after the failed create: %s", r.stdout)
			}
			if restored {
				if files, _ := filepath.Glob(filepath.Join(dir, "templates", "*.tmpl")); len(files) != 1 {
					t.Errorf("templates after the kill: %v (want the one, kept)", files)
				}
			}
		})
	}
}
