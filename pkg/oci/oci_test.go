package oci

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestValidateID(t *testing.T) {
	for _, tc := range []struct {
		id string
		ok bool
	}{
		{"abc", true}, {"a.b_c-d+e", true}, {strings.Repeat("f", 64), true},
		{"", false}, {".", false}, {"..", false}, {"../x", false}, {"a/b", false},
		{"-rf", false}, {"a b", false}, {"a\x00b", false}, {strings.Repeat("x", 1025), false},
	} {
		if err := ValidateID(tc.id); (err == nil) != tc.ok {
			t.Errorf("ValidateID(%q) = %v, want ok=%v", tc.id, err, tc.ok)
		}
	}
}

const goodSpec = `{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["sh"],"cwd":"/"},"linux":{}}`

func TestLoadSpec(t *testing.T) {
	for _, tc := range []struct {
		name, config string
		rootfs       bool
		wantErr      string
	}{
		{"good", goodSpec, true, ""},
		{"missing config", "", true, "has no config.json"},
		{"invalid json", `{"ociVersion":`, true, "invalid JSON"},
		{"trailing data", goodSpec + `{}`, true, "trailing data"},
		{"unsupported version", strings.Replace(goodSpec, "1.0.2", "2.0.0", 1), true, `ociVersion "2.0.0" is not supported`},
		{"no version", strings.Replace(goodSpec, `"ociVersion":"1.0.2",`, "", 1), true, "ociVersion is missing"},
		{"missing rootfs", goodSpec, false, "is not a directory"},
		{"no process", `{"ociVersion":"1.0.2","root":{"path":"rootfs"},"linux":{}}`, true, "process is missing"},
		{"no args", strings.Replace(goodSpec, `["sh"]`, `[]`, 1), true, "process.args is empty"},
		{"relative cwd", strings.Replace(goodSpec, `"cwd":"/"`, `"cwd":"tmp"`, 1), true, "process.cwd"},
		{"not linux", strings.Replace(goodSpec, `,"linux":{}`, ``, 1), true, "linux section is missing"},
		{"bad annotation", strings.Replace(goodSpec, `"linux":{}`, `"linux":{},"annotations":{"io.kiwi-shim.mode":"vmm"}`, 1), true, "io.kiwi-shim.mode"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.config != "" {
				os.WriteFile(filepath.Join(dir, "config.json"), []byte(tc.config), 0o600)
			}
			if tc.rootfs {
				os.Mkdir(filepath.Join(dir, "rootfs"), 0o755)
			}
			s, err := LoadSpec(dir)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				if RootPath(dir, s) != filepath.Join(dir, "rootfs") {
					t.Fatalf("RootPath = %s", RootPath(dir, s))
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("error is not one line: %q", err)
			}
		})
	}
}

func TestParseAnnotations(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      map[string]string
		wantErr string
		check   func(Settings) bool
	}{
		{"none", nil, "", func(s Settings) bool { return s == Settings{} }},
		{"others ignored", map[string]string{"io.podman.x": "y"}, "", func(s Settings) bool { return s == Settings{} }},
		{"container", map[string]string{AnnotationMode: "container", AnnotationLoopCount: "3", AnnotationLoopTimeout: "2m", AnnotationLoopControl: "true"}, "",
			func(s Settings) bool {
				return s.Mode == "container" && s.LoopCount == 3 && s.LoopTimeout.Minutes() == 2 && s.LoopControl
			}},
		{"vm", map[string]string{AnnotationVMMemory: "4G", AnnotationVMCPUs: "2", AnnotationVMArch: "aarch64", AnnotationShare: "9p", AnnotationShareCache: "auto", AnnotationVMScratch: "20G"}, "",
			func(s Settings) bool {
				return s.VMMemory == "4G" && s.VMCPUs == 2 && s.VMArch == "aarch64" && s.Share == "9p" && s.ShareCache == "auto" &&
					s.ScratchSize == 20<<30 && s.ScratchPath == DefaultScratchPath
			}},
		{"scratch path", map[string]string{AnnotationVMScratch: "512M:/build/"}, "",
			func(s Settings) bool { return s.ScratchSize == 512<<20 && s.ScratchPath == "/build" }},
		{"scratch relative", map[string]string{AnnotationVMScratch: "1G:build"}, "vm.scratch", nil},
		{"scratch root", map[string]string{AnnotationVMScratch: "1G:/"}, "vm.scratch", nil},
		{"scratch tiny", map[string]string{AnnotationVMScratch: "1M"}, "vm.scratch", nil},
		{"bad mode", map[string]string{AnnotationMode: "VM"}, "io.kiwi-shim.mode", nil},
		{"bad count", map[string]string{AnnotationLoopCount: "0"}, "loop.count", nil},
		{"bad timeout", map[string]string{AnnotationLoopTimeout: "soon"}, "loop.timeout", nil},
		{"bad control", map[string]string{AnnotationLoopControl: "maybe"}, "loop.control", nil},
		{"bad memory", map[string]string{AnnotationVMMemory: "lots"}, "vm.memory", nil},
		{"bad cpus", map[string]string{AnnotationVMCPUs: "-1"}, "vm.cpus", nil},
		{"bad arch", map[string]string{AnnotationVMArch: "riscv"}, "vm.arch", nil},
		{"bad share", map[string]string{AnnotationShare: "nfs"}, "io.kiwi-shim.share", nil},
		{"bad share cache", map[string]string{AnnotationShareCache: "sometimes"}, "io.kiwi-shim.share.cache", nil},
		{"share mapped", map[string]string{AnnotationShareMapped: "false"}, "", func(s Settings) bool { return s.ShareMapped != nil && !*s.ShareMapped }},
		{"bad share mapped", map[string]string{AnnotationShareMapped: "xattr"}, "io.kiwi-shim.share.mapped", nil},
		{"unknown key", map[string]string{"io.kiwi-shim.modus": "vm"}, "unknown annotation io.kiwi-shim.modus", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := ParseAnnotations(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || !tc.check(s) {
				t.Fatalf("settings %+v, err %v", s, err)
			}
		})
	}
}

func FuzzParseSpec(f *testing.F) {
	f.Add([]byte(goodSpec))
	f.Add([]byte(`{"ociVersion":"1.2.0","root":{"path":"/r"},"process":{"args":["a"],"cwd":"/"},"linux":{"devices":[{"path":"/dev/x","type":"b","major":7,"minor":1}]},"annotations":{"io.kiwi-shim.loop.count":"2"}}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := ParseSpec(b)
		if err == nil && (s.Process == nil || s.Root == nil || s.Linux == nil) {
			t.Fatal("accepted a spec without process, root or linux")
		}
	})
}

func FuzzParseAnnotations(f *testing.F) {
	f.Add(AnnotationLoopCount, "2")
	f.Add(AnnotationVMMemory, "4G")
	f.Add(AnnotationLoopTimeout, "1h")
	f.Fuzz(func(t *testing.T, k, v string) {
		_, _ = ParseAnnotations(map[string]string{k: v})
	})
}

func TestIsPodSandbox(t *testing.T) {
	for _, tc := range []struct {
		a    map[string]string
		want bool
	}{
		{nil, false},
		{map[string]string{AnnotationCRIContainerType: "sandbox"}, true},
		{map[string]string{AnnotationCRIContainerType: "container"}, false},
		{map[string]string{AnnotationCRIOContainerType: "sandbox"}, true},
		{map[string]string{AnnotationMode: "vm"}, false},
	} {
		if got := IsPodSandbox(tc.a); got != tc.want {
			t.Errorf("IsPodSandbox(%v) = %v, want %v", tc.a, got, tc.want)
		}
	}
}
