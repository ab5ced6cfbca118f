package hooks

//lint:file-ignore SA1019 prestart hooks are deprecated, but engines still use them

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// TestMain lets the test binary act as kiwi-shim's relay command.
func TestMain(m *testing.M) {
	if os.Getenv("HOOKS_RELAY_CHILD") == "1" && len(os.Args) > 1 && os.Args[1] == RelayCommand {
		err := Relay(os.Args[2:], os.Stdin)
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

func TestRelayHooks(t *testing.T) {
	ten := 10
	h := &specs.Hooks{
		Prestart:        []specs.Hook{{Path: "/p", Args: []string{"p0", "x"}, Env: []string{"A=1"}, Timeout: &ten}},
		CreateRuntime:   []specs.Hook{{Path: "/cr"}},
		CreateContainer: []specs.Hook{{Path: "/cc"}},
		StartContainer:  []specs.Hook{{Path: "/sc"}},
		Poststart:       []specs.Hook{{Path: "/ps"}},
		Poststop:        []specs.Hook{{Path: "/pst"}},
	}
	RelayHooks(h, "/bin/kiwi-shim", "/b")
	want := specs.Hook{Path: "/bin/kiwi-shim", Args: []string{"/bin/kiwi-shim", RelayCommand, "/b", "/p", "--", "p0", "x"}, Env: []string{"A=1"}, Timeout: &ten}
	if got := h.Prestart[0]; fmt.Sprint(got.Args) != fmt.Sprint(want.Args) || got.Path != want.Path || got.Timeout != &ten || got.Env[0] != "A=1" {
		t.Errorf("prestart = %+v", got)
	}
	for _, hk := range [][]specs.Hook{h.CreateRuntime, h.Poststart, h.Poststop} {
		if hk[0].Path != "/bin/kiwi-shim" {
			t.Errorf("not relayed: %+v", hk[0])
		}
	}
	if h.CreateContainer[0].Path != "/cc" || h.StartContainer[0].Path != "/sc" {
		t.Error("createContainer/startContainer must stay runc's")
	}
	RelayHooks(nil, "x", "y")
}

func TestRelay(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "out")
	record := script(t, dir, "record", `printf '%s|' "$@" >>"$OUT"; cat >>"$OUT"`)
	fail := script(t, dir, "fail", "echo broken >&2; exit 4\n")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	env := []string{"HOOKS_RELAY_CHILD=1", "OUT=" + out}
	st := specs.State{Version: specs.Version, ID: "c1", Status: specs.StateCreated, Pid: 7, Bundle: "/runtime/bundle", Annotations: map[string]string{"k": "v"}}

	h := &specs.Hooks{CreateRuntime: []specs.Hook{{Path: record, Args: []string{"r0", "a1"}, Env: env}}}
	RelayHooks(h, self, "/user/bundle")
	if err := Run(context.Background(), CreateRuntime, h.CreateRuntime, st); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	args, js, _ := strings.Cut(string(b), "{")
	if args != "a1|" {
		t.Errorf("args %q", args)
	}
	var got specs.State
	if err := json.Unmarshal([]byte("{"+js), &got); err != nil {
		t.Fatal(err)
	}
	if got.Bundle != "/user/bundle" || got.ID != "c1" || got.Pid != 7 || got.Status != specs.StateCreated || got.Annotations["k"] != "v" {
		t.Errorf("state %+v", got)
	}

	h = &specs.Hooks{Poststop: []specs.Hook{{Path: fail, Env: env}}}
	RelayHooks(h, self, "/user/bundle")
	err = Run(context.Background(), Poststop, h.Poststop, st)
	if err == nil || !strings.Contains(err.Error(), "exit status 4, stderr: broken") {
		t.Errorf("err = %v", err)
	}
}

func TestWithBundle(t *testing.T) {
	out, err := withBundle([]byte(`{"ociVersion":"1.0.2","id":"x","status":"created","pid":3,"bundle":"/r","extra":true}`), "/u")
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	json.Unmarshal(out, &m)
	if m["bundle"] != "/u" || m["extra"] != true || m["id"] != "x" {
		t.Errorf("%s", out)
	}
	if _, err := withBundle([]byte("nope"), "/u"); err == nil {
		t.Error("want an error for bad state")
	}
	if err := Relay([]string{"/u", "/p"}, strings.NewReader("")); err == nil {
		t.Error("want a usage error")
	}
}
