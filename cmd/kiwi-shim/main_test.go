package main

import (
	"os"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

func TestParseSignal(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want unix.Signal
		ok   bool
	}{
		{"TERM", unix.SIGTERM, true}, {"SIGKILL", unix.SIGKILL, true}, {"kill", unix.SIGKILL, true},
		{"9", unix.SIGKILL, true}, {"15", unix.SIGTERM, true}, {"SIGRTMIN+1", 0, false},
		{"0", 0, false}, {"65", 0, false}, {"NOPE", 0, false}, {"", 0, false},
	} {
		got, err := parseSignal(tc.in)
		if (err == nil) != tc.ok || (tc.ok && got != tc.want) {
			t.Errorf("parseSignal(%q) = %v, %v", tc.in, got, err)
		}
	}
}

func withArgs(t *testing.T, args ...string) {
	t.Helper()
	old := os.Args
	os.Args = append([]string{"kiwi-shim"}, args...)
	t.Cleanup(func() { os.Args = old })
}

func TestRawArgs(t *testing.T) {
	withArgs(t, "--root", "/r", "--log=/l", "--debug", "exec", "--pid-file", "p", "-t", "id", "sh", "-c", "x")
	if got := rawArgs("exec"); !slices.Equal(got, []string{"--pid-file", "p", "-t", "id", "sh", "-c", "x"}) {
		t.Fatalf("rawArgs = %q", got)
	}
	if got := rawArgs("ps"); got != nil {
		t.Fatalf("rawArgs for another command = %q", got)
	}
}

func TestGlobalLogTarget(t *testing.T) {
	withArgs(t, "--root", "/r", "--log", "/tmp/log.json", "--log-format", "json", "create", "--log", "not-global", "id")
	if p, f := globalLogTarget(); p != "/tmp/log.json" || f != "json" {
		t.Fatalf("globalLogTarget = %q %q", p, f)
	}
	withArgs(t, "state", "id")
	if p, f := globalLogTarget(); p != "" || f != "text" {
		t.Fatalf("no globals: %q %q", p, f)
	}
}
