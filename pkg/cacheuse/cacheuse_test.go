package cacheuse

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

func TestHit(t *testing.T) {
	now := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		name     string
		age      time.Duration // of the file's mark; <0: no file
		dir      bool
		wantHit  bool
		wantMark time.Time
	}{
		{name: "missing", age: -1},
		{name: "directory", dir: true},
		{name: "fresh mark stays", age: 10 * time.Minute, wantHit: true, wantMark: now.Add(-10 * time.Minute)},
		{name: "old mark renewed", age: 48 * time.Hour, wantHit: true, wantMark: now},
		{name: "mark just at the interval renewed", age: UpdateInterval, wantHit: true, wantMark: now},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "f.cpio")
			switch {
			case tt.dir:
				if err := os.Mkdir(p, 0o755); err != nil {
					t.Fatal(err)
				}
			case tt.age >= 0:
				if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
					t.Fatal(err)
				}
				mark := now.Add(-tt.age)
				if err := os.Chtimes(p, mark, mark); err != nil {
					t.Fatal(err)
				}
			}
			if got := Hit(p, now); got != tt.wantHit {
				t.Fatalf("Hit = %v, want %v", got, tt.wantHit)
			}
			if !tt.wantHit {
				return
			}
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if !fi.ModTime().Equal(tt.wantMark) {
				t.Errorf("mark %v, want %v", fi.ModTime(), tt.wantMark)
			}
		})
	}
}

func TestUnused(t *testing.T) {
	now := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	dir := t.TempDir()
	files := map[string]time.Duration{
		"old.cpio":          9 * 24 * time.Hour,
		"edge.elf":          7 * 24 * time.Hour,
		"young.cpio":        2 * 24 * time.Hour,
		".old.cpio12345678": 30 * 24 * time.Hour, // a writer's temp file left by a crash
	}
	for name, age := range files {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		mark := now.Add(-age)
		if err := os.Chtimes(p, mark, mark); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	old := now.Add(-365 * 24 * time.Hour)
	os.Chtimes(filepath.Join(dir, "sub"), old, old)
	got, err := Unused(dir, 7*24*time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range got {
		names = append(names, filepath.Base(p))
	}
	slices.Sort(names)
	if want := []string{".old.cpio12345678", "edge.elf", "old.cpio"}; !slices.Equal(names, want) {
		t.Errorf("Unused = %v, want %v", names, want)
	}
	if got, err := Unused(filepath.Join(dir, "missing"), time.Hour, now); err != nil || got != nil {
		t.Errorf("missing dir: %v, %v", got, err)
	}
}
