package containermode

import (
	"slices"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
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
	for _, c := range kiwiCapabilities {
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
