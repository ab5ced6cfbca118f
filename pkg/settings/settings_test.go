package settings

import (
	"io"
	"log/slog"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
	"github.com/kiwi-shim/kiwi-shim/pkg/sharefs"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
)

var discard = slog.New(slog.NewTextHandler(io.Discard, nil))

// TestResolve: annotations win over the configuration, a pod sandbox
// runs in container mode, and the VM settings are resolved in VM mode
// only.
func TestResolve(t *testing.T) {
	cfg := config.Default() // vm mode, 2 loop devices, virtiofs
	for _, tc := range []struct {
		name    string
		ann     map[string]string
		check   func(Container) bool
		wantErr bool
	}{
		{name: "defaults", check: func(c Container) bool {
			return c.Mode == config.ModeVM && c.LoopCount == 2 && !c.Sandbox && c.Scratch == Scratch{} &&
				c.VM.Share == config.ShareVirtioFS && c.VM.ShareCache == sharefs.CacheMetadata && c.VM.ShareMapped &&
				c.VM.MemoryMiB == 2048 && c.VM.CPUs == 2 && c.VM.Arch == vm.HostArch() && !c.VM.DirectDNS
		}},
		{name: "annotations", ann: map[string]string{
			oci.AnnotationShare: "9p", oci.AnnotationShareCache: "never", oci.AnnotationShareMapped: "false",
			oci.AnnotationVMMemory: "1G", oci.AnnotationVMCPUs: "3", oci.AnnotationVMArch: "arm64",
			oci.AnnotationVMScratch: "20G:/build", oci.AnnotationVMDNS: "direct", oci.AnnotationLoopCount: "5",
		}, check: func(c Container) bool {
			return c.Mode == config.ModeVM && c.LoopCount == 5 && c.Scratch == Scratch{Size: 20 << 30, Path: "/build"} &&
				c.VM.Share == config.Share9P && c.VM.ShareCache == "never" && !c.VM.ShareMapped &&
				c.VM.MemoryMiB == 1024 && c.VM.CPUs == 3 && c.VM.Arch == "aarch64" && c.VM.DirectDNS
		}},
		{name: "container mode: no VM settings", ann: map[string]string{oci.AnnotationMode: "container", oci.AnnotationVMScratch: "1G"},
			check: func(c Container) bool {
				return c.Mode == config.ModeContainer && c.VM == VM{} && c.Scratch.Size == 1<<30 && c.Scratch.Path == oci.DefaultScratchPath
			}},
		{name: "pod sandbox", ann: map[string]string{oci.AnnotationMode: "vm", oci.AnnotationCRIContainerType: "sandbox"},
			check: func(c Container) bool { return c.Mode == config.ModeContainer && c.Sandbox && c.VM == VM{} }},
		{name: "bad annotation", ann: map[string]string{oci.AnnotationShare: "nfs"}, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			spec := &specs.Spec{Annotations: tc.ann, Root: &specs.Root{Path: "rootfs"}, Linux: &specs.Linux{}}
			c, err := Resolve(cfg, t.TempDir(), spec, discard)
			if (err != nil) != tc.wantErr {
				t.Fatalf("Resolve: %v, want error %v", err, tc.wantErr)
			}
			if err == nil && !tc.check(c) {
				t.Errorf("Resolve = %+v", c)
			}
		})
	}
}

func TestSize(t *testing.T) {
	i64 := func(v int64) *int64 { return &v }
	u64 := func(v uint64) *uint64 { return &v }
	c := config.Default().VM // 2G, 2 CPUs
	for _, tc := range []struct {
		name    string
		res     *specs.LinuxResources
		s       oci.Settings
		mem     int64
		cpus    int
		wantErr bool
	}{
		{name: "defaults", mem: 2048, cpus: 2},
		{name: "spec limits", res: &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: i64(512 << 20)}, CPU: &specs.LinuxCPU{Quota: i64(150000), Period: u64(100000)}}, mem: 512, cpus: 2},
		{name: "annotations win", res: &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: i64(512 << 20)}}, s: oci.Settings{VMMemory: "1G", VMCPUs: 4}, mem: 1024, cpus: 4},
		{name: "quota below one cpu", res: &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: i64(10000), Period: u64(100000)}}, mem: 2048, cpus: 1},
		{name: "bad size", s: oci.Settings{VMMemory: "lots"}, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mem, cpus, err := size(c, &specs.Spec{Linux: &specs.Linux{Resources: tc.res}}, tc.s)
			if (err != nil) != tc.wantErr || (!tc.wantErr && (mem != tc.mem || cpus != tc.cpus)) {
				t.Errorf("size = %d MiB, %d cpus, %v; want %d, %d", mem, cpus, err, tc.mem, tc.cpus)
			}
		})
	}
}
