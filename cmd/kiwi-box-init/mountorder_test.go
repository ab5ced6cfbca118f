package main

import (
	"reflect"
	"strings"
	"testing"

	"github.com/moby/sys/mountinfo"
)

func TestMountsAfter(t *testing.T) {
	// id, parent, mount point: a container's table as setup leaves it.
	table := func(rows ...any) []*mountinfo.Info {
		var out []*mountinfo.Info
		for i := 0; i < len(rows); i += 3 {
			mp, opt, _ := strings.Cut(rows[i+2].(string), " ")
			out = append(out, &mountinfo.Info{ID: rows[i].(int), Parent: rows[i+1].(int), Mountpoint: mp, Optional: opt})
		}
		return out
	}
	tests := []struct {
		name   string
		mounts []*mountinfo.Info
		want   []string
		unbind []string
	}{
		{
			name: "proc first, then /dev with its own, /sys, files, masks on /proc",
			mounts: table(
				1, 0, "/",
				2, 1, "/proc",
				3, 1, "/dev",
				4, 3, "/dev/pts",
				5, 3, "/dev/shm",
				6, 1, "/sys",
				7, 6, "/sys/fs/cgroup",
				8, 1, "/etc/hosts",
				9, 2, "/proc/bus",
				10, 2, "/proc/kcore",
			),
			want: []string{"/dev", "/sys", "/etc/hosts"},
		},
		{
			name: "proc after /dev: what was mounted on /dev later moves on its own",
			mounts: table(
				1, 0, "/",
				3, 1, "/dev",
				2, 1, "/proc",
				4, 3, "/dev/pts",
				6, 1, "/sys",
			),
			want: []string{"/dev/pts", "/sys"},
		},
		{
			name: "an over-mount of /proc's place counts as inside it",
			mounts: table(
				1, 0, "/",
				2, 1, "/proc",
				3, 1, "/data",
				11, 1, "/proc/sys",
			),
			want: []string{"/data"},
		},
		{
			name: "two mounts on one place both move",
			mounts: table(
				1, 0, "/",
				2, 1, "/proc",
				3, 1, "/data",
				4, 1, "/data",
			),
			want: []string{"/data", "/data"},
		},
		{
			name: "unbindable mounts, moved or inside a moved one, are named",
			mounts: table(
				1, 0, "/ shared:1",
				2, 1, "/proc",
				3, 1, "/mnt/a unbindable",
				4, 1, "/mnt/b shared:7",
				5, 4, "/mnt/b/c unbindable",
				6, 2, "/proc/x unbindable",
			),
			want:   []string{"/mnt/a", "/mnt/b"},
			unbind: []string{"/mnt/a", "/mnt/b/c"},
		},
		{name: "proc last", mounts: table(1, 0, "/", 3, 1, "/dev", 2, 1, "/proc"), want: nil},
		{name: "no proc", mounts: table(1, 0, "/", 3, 1, "/dev"), want: nil},
		{name: "empty", want: nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := mountsAfter(tt.mounts, "/proc")
			if !reflect.DeepEqual(got.Paths, tt.want) || !reflect.DeepEqual(got.Unbindable, tt.unbind) {
				t.Fatalf("mountsAfter = %q, want %q, unbindable %q", got, tt.want, tt.unbind)
			}
		})
	}
}

func TestCloneOrder(t *testing.T) {
	tests := []struct {
		paths []string
		want  []int
	}{
		{[]string{"/dev", "/sys", "/etc/hosts", "/run/.containerenv"}, []int{0, 1, 2, 3}},
		{[]string{"/data", "/data"}, []int{1, 0}},      // stacked
		{[]string{"/a/b", "/c", "/a"}, []int{2, 1, 0}}, // a later mount hides an earlier one
		{[]string{"/a", "/a/b"}, []int{0, 1}},          // a later one inside an earlier one is fine
		{nil, []int{}},
	}
	for _, tt := range tests {
		if got := cloneOrder(tt.paths); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("cloneOrder(%q) = %v, want %v", tt.paths, got, tt.want)
		}
	}
}
