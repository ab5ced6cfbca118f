package containermode

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
)

func TestRewrite(t *testing.T) {
	orig := &specs.Spec{
		Version: "1.0.2",
		Root:    &specs.Root{Path: "rootfs"},
		Process: &specs.Process{Args: []string{"sh"}, Cwd: "/", Capabilities: &specs.LinuxCapabilities{
			Bounding: []string{"CAP_CHOWN", "CAP_MKNOD"},
		}},
		Linux: &specs.Linux{
			MaskedPaths: []string{"/proc/kcore", "/sys/dev/block"},
			Devices:     []specs.LinuxDevice{{Path: "/dev/loop3", Type: "b", Major: 7, Minor: 99}},
		},
	}
	devs := []Device{{Path: "/dev/loop3", Type: "b", Major: 7, Minor: 3}, {Path: "/dev/loop4", Type: "b", Major: 7, Minor: 4}}
	out, err := Rewrite(orig, "/abs/rootfs", devs)
	if err != nil {
		t.Fatal(err)
	}
	if out.Root.Path != "/abs/rootfs" || orig.Root.Path != "rootfs" {
		t.Fatalf("root path %q (original %q)", out.Root.Path, orig.Root.Path)
	}
	if len(out.Linux.Devices) != 2 || out.Linux.Devices[0].Minor != 3 || out.Linux.Devices[1].Path != "/dev/loop4" {
		t.Fatalf("devices %+v", out.Linux.Devices)
	}
	if len(orig.Linux.Devices) != 1 {
		t.Fatal("original spec modified")
	}
	rules := out.Linux.Resources.Devices
	if len(rules) != 2 || !rules[0].Allow || *rules[0].Major != 7 || *rules[0].Minor != 3 || rules[0].Access != "rwm" {
		t.Fatalf("cgroup rules %+v", rules)
	}
	for _, c := range oci.KIWICapabilities {
		for _, set := range [][]string{out.Process.Capabilities.Bounding, out.Process.Capabilities.Effective, out.Process.Capabilities.Permitted} {
			if !slices.Contains(set, c) {
				t.Fatalf("%s missing in %v", c, set)
			}
		}
	}
	if n := len(out.Process.Capabilities.Bounding); n != 5 {
		t.Fatalf("bounding set has duplicates: %v", out.Process.Capabilities.Bounding)
	}
	if slices.Contains(out.Linux.MaskedPaths, "/sys/dev/block") || !slices.Contains(out.Linux.MaskedPaths, "/proc/kcore") {
		t.Fatalf("masked paths %v", out.Linux.MaskedPaths)
	}
	// Nothing but what was leased: no host /dev, no loop-control.
	for _, d := range out.Linux.Devices {
		if d.Path == LoopControl.Path {
			t.Fatal("loop-control handed out unasked")
		}
	}
}

// A pod sandbox's spec is copied with its root made absolute and nothing
// else: no capabilities, masks kept.
func TestWithRoot(t *testing.T) {
	orig := &specs.Spec{
		Root:    &specs.Root{Path: "rootfs"},
		Process: &specs.Process{Args: []string{"/pause"}, Capabilities: &specs.LinuxCapabilities{Bounding: []string{"CAP_CHOWN"}}},
		Linux:   &specs.Linux{MaskedPaths: []string{"/sys/dev/block"}},
	}
	out, err := WithRoot(orig, "/abs/rootfs")
	if err != nil {
		t.Fatal(err)
	}
	if out.Root.Path != "/abs/rootfs" || orig.Root.Path != "rootfs" {
		t.Fatalf("root path %q (original %q)", out.Root.Path, orig.Root.Path)
	}
	if !slices.Equal(out.Process.Capabilities.Bounding, []string{"CAP_CHOWN"}) || !slices.Equal(out.Linux.MaskedPaths, []string{"/sys/dev/block"}) {
		t.Fatalf("sandbox spec changed: caps %v masks %v", out.Process.Capabilities.Bounding, out.Linux.MaskedPaths)
	}
	if out, err := WithRoot(&specs.Spec{}, "/r"); err != nil || out.Root.Path != "/r" {
		t.Fatalf("spec without root: %v %+v", err, out)
	}
}

func TestLastLogError(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct{ body, want string }{
		{`{"level":"info","msg":"x"}` + "\n" + `{"level":"error","msg":"runc run failed: unable to start container process: exec: \"x\": executable file not found in $PATH"}` + "\n" + `{"level":"info","msg":"y"}` + "\n",
			`runc run failed: unable to start container process: exec: "x": executable file not found in $PATH`},
		{`time="t" level=error msg="bad thing"` + "\n", "bad thing"},
		{"", ""},
		{"not a log\n", ""},
	} {
		p := filepath.Join(dir, "log")
		os.WriteFile(p, []byte(tc.body), 0o644)
		if got := lastLogError(p, 0); got != tc.want {
			t.Errorf("lastLogError(%q) = %q, want %q", tc.body, got, tc.want)
		}
	}
	if lastLogError("", 0) != "" || lastLogError(filepath.Join(dir, "none"), 0) != "" {
		t.Error("no log file should give no message")
	}
	// Only what was logged after the offset counts.
	p := filepath.Join(dir, "log")
	old := `{"level":"error","msg":"an earlier container's"}` + "\n"
	os.WriteFile(p, []byte(old), 0o644)
	if got := lastLogError(p, int64(len(old))); got != "" {
		t.Errorf("stale error reported: %q", got)
	}
}
