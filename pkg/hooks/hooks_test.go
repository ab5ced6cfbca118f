package hooks

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func script(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestRun(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "out")
	// The hook records its argv, one env variable and its stdin.
	record := script(t, dir, "record", `printf '%s|' "$0" "$@" >>"$OUT"; printf 'E=%s|' "$E" >>"$OUT"; cat >>"$OUT"; echo >>"$OUT"`)
	fail := script(t, dir, "fail", "echo broken >&2; exit 3\n")
	slow := script(t, dir, "slow", "sleep 30\n")
	st := specs.State{Version: specs.Version, ID: "c1", Status: specs.StateCreated, Pid: 42, Bundle: "/user/bundle", Annotations: map[string]string{"a": "b"}}
	one := 1
	zero := 0
	env := []string{"OUT=" + out, "E=x"}
	tests := []struct {
		name    string
		hooks   []specs.Hook
		wantErr string // substring; "" for success
		wantOut []string
		maxTime time.Duration
	}{
		{name: "none"},
		// A script's $0 is its path whatever argv[0] was.
		{name: "args and env", hooks: []specs.Hook{{Path: record, Args: []string{"argv0", "a1"}, Env: env}},
			wantOut: []string{record + "|a1|E=x|"}},
		{name: "argv0", hooks: []specs.Hook{{Path: "/bin/sh", Args: []string{"custom0", "-c", `tr '\0' '|' </proc/$$/cmdline | cut -d'|' -f1 | tr -d '\n' >>"$OUT"; printf '|' >>"$OUT"; cat >>"$OUT"`}, Env: env}},
			wantOut: []string{"custom0|"}},
		{name: "no args means argv0 is the path", hooks: []specs.Hook{{Path: record, Env: env}},
			wantOut: []string{record + "|E=x|"}},
		{name: "in order", hooks: []specs.Hook{{Path: record, Args: []string{"x", "1"}, Env: env}, {Path: record, Args: []string{"x", "2"}, Env: env}},
			wantOut: []string{record + "|1|E=x|", record + "|2|E=x|"}},
		{name: "failure stops the stage", hooks: []specs.Hook{{Path: fail}, {Path: record, Env: env}},
			wantErr: "prestart hook #0 (" + fail + "): exit status 3, stderr: broken"},
		{name: "timeout", hooks: []specs.Hook{{Path: slow, Timeout: &one}},
			wantErr: "killed after its timeout of 1s", maxTime: 10 * time.Second},
		{name: "bad timeout", hooks: []specs.Hook{{Path: record, Timeout: &zero}}, wantErr: "must be positive"},
		{name: "missing program", hooks: []specs.Hook{{Path: filepath.Join(dir, "nope")}}, wantErr: "no such file"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			os.Remove(out)
			start := time.Now()
			err := Run(context.Background(), Prestart, tc.hooks, st)
			if tc.maxTime > 0 && time.Since(start) > tc.maxTime {
				t.Errorf("took %v", time.Since(start))
			}
			if tc.wantErr == "" && err != nil {
				t.Fatalf("err = %v", err)
			}
			if tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
			b, _ := os.ReadFile(out)
			lines := strings.Split(strings.TrimSpace(string(b)), "\n")
			if len(tc.wantOut) == 0 {
				if len(b) != 0 {
					t.Fatalf("output %q, want none", b)
				}
				return
			}
			if len(lines) != len(tc.wantOut) {
				t.Fatalf("output %q, want %d lines", b, len(tc.wantOut))
			}
			for i, l := range lines {
				prefix, js, _ := strings.Cut(l, "{")
				if prefix != tc.wantOut[i] {
					t.Errorf("line %d: %q, want %q", i, prefix, tc.wantOut[i])
				}
				var got specs.State
				if err := json.Unmarshal([]byte("{"+js), &got); err != nil {
					t.Fatalf("state %q: %v", js, err)
				}
				if got.ID != "c1" || got.Pid != 42 || got.Bundle != "/user/bundle" || got.Status != specs.StateCreated || got.Version != specs.Version || got.Annotations["a"] != "b" {
					t.Errorf("state %+v", got)
				}
			}
		})
	}
}

func TestOf(t *testing.T) {
	h := &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/a"}}, Poststop: []specs.Hook{{Path: "/b"}}}
	if got := Of(h, CreateRuntime); len(got) != 1 || got[0].Path != "/a" {
		t.Errorf("createRuntime: %v", got)
	}
	if got := Of(h, Poststop); len(got) != 1 {
		t.Errorf("poststop: %v", got)
	}
	if Of(nil, Prestart) != nil || Of(h, "nope") != nil {
		t.Error("want nil")
	}
}
