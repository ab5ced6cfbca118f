package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      string
		wantErr string
		check   func(Config) bool
	}{
		{name: "empty keeps defaults", in: "", check: func(c Config) bool { return c.DefaultMode == ModeVM && c.Loop.DefaultCount == 2 }},
		{name: "loop capacity", in: "[loop]\ncapacity = 4\n", check: func(c Config) bool { return c.Loop.Capacity == 4 }},
		{name: "container mode", in: "default_mode = \"container\"\n[container]\nruntime = \"/usr/sbin/runc\"\n",
			check: func(c Config) bool { return c.DefaultMode == ModeContainer && c.Container.Runtime == "/usr/sbin/runc" }},
		{name: "vm tables", in: "[vm]\naccel = \"tcg\"\n[vm.kernel]\nx86_64 = \"/k\"\n",
			check: func(c Config) bool { return c.VM.Accel == "tcg" && c.VM.Kernel["x86_64"] == "/k" }},
		{name: "kernel defaults to generic 6.12", in: "", check: func(c Config) bool { return c.VM.KernelVersion == "6.12" && c.VM.KernelFlavour == "generic" }},
		{name: "kernel 6.1 cloud", in: "[vm]\nkernel_version = \"6.1\"\nkernel_flavour = \"cloud\"\n",
			check: func(c Config) bool { return c.VM.KernelVersion == "6.1" && c.VM.KernelFlavour == "cloud" }},
		{name: "bad kernel version", in: "[vm]\nkernel_version = \"6.12.118\"\n", wantErr: "vm.kernel_version"},
		{name: "bad kernel flavour", in: "[vm]\nkernel_flavour = \"rt\"\n", wantErr: "vm.kernel_flavour"},
		{name: "unknown key", in: "[loop]\ncapacty = 4\n", wantErr: "unknown key(s) loop.capacty"},
		{name: "bad mode", in: "default_mode = \"vmm\"\n", wantErr: "default_mode"},
		{name: "bad accel", in: "[vm]\naccel = \"hvf\"\n", wantErr: "vm.accel"},
		{name: "negative capacity", in: "[loop]\ncapacity = -1\n", wantErr: "loop.capacity"},
		{name: "relative loop dir", in: "[loop]\ndir = \"run/x\"\n", wantErr: "loop.dir"},
		{name: "bad memory", in: "[vm]\nmemory = \"lots\"\n", wantErr: "vm.memory"},
		{name: "type mismatch", in: "[loop]\ncapacity = \"four\"\n", wantErr: "capacity"},
		{name: "syntax", in: "[loop\n", wantErr: "toml"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "config.toml")
			if err := os.WriteFile(p, []byte(tc.in), 0o600); err != nil {
				t.Fatal(err)
			}
			c, err := Load(p, true, Default())
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want it to mention %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !tc.check(c) {
				t.Fatalf("unexpected config %+v", c)
			}
		})
	}
}

func TestLoadMissingFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "none.toml")
	if _, err := Load(p, false, Default()); err != nil {
		t.Fatalf("implicit missing file: %v", err)
	}
	if _, err := Load(p, true, Default()); err == nil {
		t.Fatal("explicit missing file accepted")
	}
}

func TestEnvOverrides(t *testing.T) {
	t.Setenv(EnvLoopCapacity, "3")
	t.Setenv(EnvLoopDir, "/tmp/x")
	c, err := Load(filepath.Join(t.TempDir(), "none"), false, Default())
	if err != nil {
		t.Fatal(err)
	}
	if c.Loop.Capacity != 3 || c.Loop.Dir != "/tmp/x" {
		t.Fatalf("env not applied: %+v", c.Loop)
	}
	t.Setenv(EnvCacheDir, "/var/tmp/private-cache")
	t.Setenv(EnvKernelVersion, "6.1")
	t.Setenv(EnvKernelFlavour, "cloud")
	c, err = Load(filepath.Join(t.TempDir(), "none"), false, Default())
	if err != nil {
		t.Fatal(err)
	}
	if c.CacheDir != "/var/tmp/private-cache" || c.VM.KernelVersion != "6.1" || c.VM.KernelFlavour != "cloud" {
		t.Fatalf("env not applied: cache %q, kernel %q %q", c.CacheDir, c.VM.KernelVersion, c.VM.KernelFlavour)
	}
	for _, bad := range [][2]string{{EnvLoopCapacity, "many"}, {EnvCacheDir, "relative/cache"}, {EnvKernelVersion, "six"}, {EnvKernelFlavour, "rt"}} {
		t.Run(bad[0], func(t *testing.T) {
			t.Setenv(bad[0], bad[1])
			if _, err := Load(filepath.Join(t.TempDir(), "none"), false, Default()); err == nil {
				t.Fatalf("%s=%s accepted", bad[0], bad[1])
			}
		})
	}
}

func TestPath(t *testing.T) {
	t.Setenv(EnvConfig, "")
	if p, explicit := Path(""); p != DefaultPath || explicit {
		t.Fatalf("default: %s %v", p, explicit)
	}
	t.Setenv(EnvConfig, "/e.toml")
	if p, explicit := Path(""); p != "/e.toml" || !explicit {
		t.Fatalf("env: %s %v", p, explicit)
	}
	if p, explicit := Path("/f.toml"); p != "/f.toml" || !explicit {
		t.Fatalf("flag: %s %v", p, explicit)
	}
}

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
	}{
		{"512M", 512 << 20}, {"2G", 2 << 30}, {"2g", 2 << 30}, {"4GiB", 4 << 30},
		{"1024", 1024}, {"1K", 1024}, {"", -1}, {"0", -1}, {"-1G", -1}, {"G", -1},
		{"99999999T", -1}, {"1.5G", -1},
	} {
		got, err := ParseSize(tc.in)
		if tc.want < 0 {
			if err == nil {
				t.Errorf("ParseSize(%q) = %d, want error", tc.in, got)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("ParseSize(%q) = %d, %v, want %d", tc.in, got, err, tc.want)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add("default_mode = \"vm\"\n[loop]\ncapacity = 4\n")
	f.Add("[vm]\nmemory = \"2G\"\n[vm.kernel]\nx86_64 = \"/k\"\n")
	f.Fuzz(func(t *testing.T, in string) {
		c := Default()
		if err := Parse([]byte(in), &c); err == nil {
			_ = c.Validate()
		}
	})
}

func TestDefaultRootless(t *testing.T) {
	c := DefaultRootless("/home/u/.cache/kiwi-shim")
	if c.CacheDir != "/home/u/.cache/kiwi-shim" || c.WorkDir != "/home/u/.cache/kiwi-shim/boxbuild" || c.VM.ScratchDir != "/home/u/.cache/kiwi-shim/scratch" {
		t.Fatalf("rootless defaults %+v", c)
	}
	if c.DefaultMode != ModeVM || c.Validate() != nil {
		t.Fatalf("rootless defaults invalid: %+v", c)
	}
}
