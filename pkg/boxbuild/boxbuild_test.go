package boxbuild

import (
	"slices"
	"strings"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
)

func TestParseKiwiArgs(t *testing.T) {
	for _, tc := range []struct {
		name    string
		args    []string
		want    KiwiArgs
		wantErr string
	}{
		{
			name: "plain",
			args: []string{"--description", "desc", "--target-dir=/out"},
			want: KiwiArgs{Description: "/work/desc", TargetDir: "/out"},
		},
		{
			name: "global options move before the command",
			args: []string{"--type", "oem", "--description=d", "--profile=a", "--debug", "--target-dir", "t", "--allow-existing-root", "--add-package", "vim", "--temp-dir", "/x"},
			want: KiwiArgs{
				Global:      []string{"--type=oem", "--profile=a", "--debug", "--temp-dir=/x"},
				Build:       []string{"--allow-existing-root", "--add-package=vim"},
				Description: "/work/d", TargetDir: "/work/t", TempDir: "/x",
			},
		},
		{name: "missing target", args: []string{"--description", "d"}, wantErr: "--target-dir"},
		{name: "missing value", args: []string{"--description", "d", "--target-dir"}, wantErr: "needs a value"},
		{name: "root target", args: []string{"--description", "d", "--target-dir", "/"}, wantErr: "root directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseKiwiArgs(tc.args, "/work")
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got.Global, tc.want.Global) || !slices.Equal(got.Build, tc.want.Build) ||
				got.Description != tc.want.Description || got.TargetDir != tc.want.TargetDir || got.TempDir != tc.want.TempDir {
				t.Fatalf("got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestSpec(t *testing.T) {
	desc, target := t.TempDir(), t.TempDir()
	k := KiwiArgs{Description: desc, TargetDir: target, Global: []string{"--type=oem"}, Build: []string{"--clear-cache"}}
	img := ocispec.ImageConfig{Env: []string{"PATH=/usr/local/sbin:/usr/bin"}}

	s, err := Spec("/rootfs", img, k, Options{Mode: "vm", Memory: "8G", CPUs: 2, Scratch: 20 << 30, Share: "9p"})
	if err != nil {
		t.Fatal(err)
	}
	set, err := oci.ParseAnnotations(s.Annotations)
	if err != nil || set.Mode != "vm" || set.ScratchSize != 20<<30 || set.ScratchPath != ScratchMount || set.VMCPUs != 2 {
		t.Fatalf("annotations %v: %+v, %v", s.Annotations, set, err)
	}
	args := strings.Join(s.Process.Args[3:], " ")
	want := "kiwi-box " + target + " " + ScratchMount + "/target " + ScratchMount + "/tmp --type=oem --temp-dir=" + ScratchMount + "/tmp system build --description=" + desc + " --clear-cache"
	if args != want {
		t.Fatalf("args %q\nwant %q", args, want)
	}
	if !slices.Contains(s.Process.Env, "PATH=/usr/local/sbin:/usr/bin") {
		t.Fatalf("env %v: want the image's PATH", s.Process.Env)
	}
	var binds []string
	for _, m := range s.Mounts {
		if m.Type == "bind" {
			binds = append(binds, m.Destination+":"+strings.Join(m.Options, ","))
		}
	}
	if !slices.Equal(binds, []string{desc + ":rbind,ro", target + ":rbind"}) {
		t.Fatalf("binds %v", binds)
	}

	// Container mode: no VM settings, KIWI writes to the target directly.
	s, err = Spec("/rootfs", img, k, Options{Mode: "container", Scratch: 0})
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Annotations) != 1 || s.Process.Args[4] != target || s.Process.Args[5] != target || s.Process.Args[6] != "" {
		t.Fatalf("container mode: annotations %v args %q", s.Annotations, s.Process.Args[3:7])
	}

	if _, err := Spec("/rootfs", img, k, Options{Mode: "vm", SharedPaths: []string{"/no/such/dir"}}); err == nil {
		t.Fatal("a missing shared path was accepted")
	}
}
