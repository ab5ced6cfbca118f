package vm

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

func TestMachineArgs(t *testing.T) {
	m := Machine{Arch: "x86_64", Accel: "tcg", MemoryMiB: 2048, CPUs: 2, Kernel: "/k", Initrd: "/i",
		ControlSocket: "/s/guest.sock", QMPSocket: "/s/qmp.sock", ConsoleLog: "/s/console.log", Network: NetUser,
		Shares: []Share{{Tag: "rootfs", Path: "/r", ReadOnly: true}, {Tag: "kiwi1", Path: "/d"}}}
	args, err := m.Args()
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(args, " ")
	for _, want := range []string{
		"-accel tcg", "-cpu max", "-m 2048M", "-smp 2", "-kernel /k", "-initrd /i", "-no-reboot",
		"path=/r,security_model=passthrough,multidevs=remap,readonly=on", "mount_tag=rootfs", "mount_tag=kiwi1",
		"socket,id=ctl,path=/s/guest.sock", "name=org.kiwi-shim.ctl",
		"socket,id=qmp,path=/s/qmp.sock -mon chardev=qmp,mode=control", "user,id=net0", "mac=" + userMAC,
	} {
		if !strings.Contains(joined, want) {
			t.Errorf("args lack %q:\n%s", want, joined)
		}
	}
	if strings.Contains(joined, "path=/d,security_model=passthrough,multidevs=remap,readonly=on") {
		t.Error("read-write share made read-only")
	}
	for _, bad := range []Machine{
		{Arch: "riscv64", MemoryMiB: 512, CPUs: 1},
		{Arch: "x86_64", MemoryMiB: 16, CPUs: 1},
		{Arch: "x86_64", MemoryMiB: 512, CPUs: 0},
		{Arch: "x86_64", MemoryMiB: 512, CPUs: 1, Shares: []Share{{Tag: "t", Path: "/a,b"}}},
	} {
		if _, err := bad.Args(); err == nil {
			t.Errorf("accepted %+v", bad)
		}
	}
}

func TestGuestConfig(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "resolv.conf")
	os.WriteFile(file, []byte("nameserver 192.0.2.1\n"), 0o644)
	spec := &specs.Spec{
		Root:     &specs.Root{Path: "/rootfs"},
		Hostname: "box",
		Process:  &specs.Process{Args: []string{"kiwi-ng"}, Cwd: "/", User: specs.User{UID: 1000, GID: 100}, Terminal: true, ConsoleSize: &specs.Box{Height: 40, Width: 120}},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"mode=755"}},
			{Destination: "/description", Type: "bind", Source: dir, Options: []string{"rbind", "ro"}},
			{Destination: "/etc/resolv.conf", Type: "bind", Source: file, Options: []string{"bind"}},
		},
		Linux: &specs.Linux{},
	}
	cfg, shares, err := GuestConfig(spec, "/rootfs", "9p", "/scratch", NetworkPlan{Mode: NetNone})
	if err != nil {
		t.Fatal(err)
	}
	if len(shares) != 2 || shares[0].Tag != RootTag || shares[1].Path != dir || !shares[1].ReadOnly {
		t.Fatalf("shares %+v", shares)
	}
	if cfg.Mounts[1].Type != "devtmpfs" {
		t.Fatalf("/dev is %q, want the guest's devtmpfs", cfg.Mounts[1].Type)
	}
	if m := cfg.Mounts[2]; m.Type != "share" || m.Tag != shares[1].Tag || !slices.Contains(m.Options, "ro") {
		t.Fatalf("directory bind %+v", m)
	}
	if m := cfg.Mounts[3]; m.Type != "file" || string(m.Content) != "nameserver 192.0.2.1\n" {
		t.Fatalf("file bind %+v", m)
	}
	if p := cfg.Process; p.UID != 1000 || p.GID != 100 || !p.Terminal || p.Rows != 40 || p.Cols != 120 || cfg.Hostname != "box" {
		t.Fatalf("process %+v", p)
	}
	if cfg.Network != nil {
		t.Fatal("network configured for a loopback-only container")
	}
	if m := cfg.Mounts[len(cfg.Mounts)-1]; m.Type != "disk" || m.Destination != "/scratch" || m.Source != ScratchSerial {
		t.Fatalf("scratch mount %+v, want the scratch disk last", m)
	}
	if cfg.UserNS != nil || cfg.Devices != nil || cfg.PidNS {
		t.Fatalf("user namespace %+v, devices %+v, pid namespace %v for a spec without them", cfg.UserNS, cfg.Devices, cfg.PidNS)
	}

	// linux.devices, the user namespace, sysctl, masked and read-only paths.
	mode := os.FileMode(0o640)
	spec.Linux = &specs.Linux{
		Devices:       []specs.LinuxDevice{{Path: "/dev/fuse", Type: "c", Major: 10, Minor: 229, FileMode: &mode}},
		Namespaces:    []specs.LinuxNamespace{{Type: specs.UserNamespace}, {Type: specs.PIDNamespace}},
		UIDMappings:   []specs.LinuxIDMapping{{ContainerID: 0, HostID: 100000, Size: 65536}},
		GIDMappings:   []specs.LinuxIDMapping{{ContainerID: 0, HostID: 200000, Size: 65536}},
		Sysctl:        map[string]string{"net.ipv4.ip_forward": "1"},
		MaskedPaths:   []string{"/proc/kcore", "/sys/dev/block"},
		ReadonlyPaths: []string{"/proc/sys"},
	}
	cfg, _, err = GuestConfig(spec, "/rootfs", "virtiofs", "", NetworkPlan{Mode: NetNone})
	if err != nil {
		t.Fatal(err)
	}
	if d := cfg.Devices; len(d) != 1 || d[0].Path != "/dev/fuse" || d[0].Major != 10 || d[0].Minor != 229 || d[0].Mode == nil || *d[0].Mode != 0o640 {
		t.Fatalf("devices %+v", d)
	}
	if ns := cfg.UserNS; ns == nil || ns.UIDMappings[0] != (vmproto.IDMap{HostID: 100000, Size: 65536}) || ns.GIDMappings[0].HostID != 200000 {
		t.Fatalf("user namespace %+v", ns)
	}
	if !cfg.PidNS {
		t.Fatal("no pid namespace for a spec with one")
	}
	// /sys/dev/block stays visible: lsblk and KIWI read it.
	if !slices.Equal(cfg.MaskedPaths, []string{"/proc/kcore"}) || !slices.Equal(cfg.ReadonlyPaths, []string{"/proc/sys"}) || cfg.Sysctl["net.ipv4.ip_forward"] != "1" {
		t.Fatalf("masked %v, read-only %v, sysctl %v", cfg.MaskedPaths, cfg.ReadonlyPaths, cfg.Sysctl)
	}
	spec.Linux.RootfsPropagation = "bogus"
	if _, _, err := GuestConfig(spec, "/rootfs", "virtiofs", "", NetworkPlan{}); err == nil || !strings.Contains(err.Error(), "rootfsPropagation") {
		t.Fatalf("rootfsPropagation bogus: %v", err)
	}
	spec.Linux.RootfsPropagation = "rslave"
	if cfg, _, err := GuestConfig(spec, "/rootfs", "virtiofs", "", NetworkPlan{}); err != nil || cfg.RootPropagation != "rslave" {
		t.Fatalf("rootfsPropagation rslave: %q, %v", cfg.RootPropagation, err)
	}
	spec.Linux.UIDMappings = nil
	if _, _, err := GuestConfig(spec, "/rootfs", "virtiofs", "", NetworkPlan{}); err == nil || !strings.Contains(err.Error(), "uidMappings") {
		t.Fatalf("user namespace without mappings: %v", err)
	}
	spec.Linux = &specs.Linux{}

	spec.Mounts = append(spec.Mounts, specs.Mount{Destination: "/dev/null2", Type: "bind", Source: "/dev/null"})
	if _, _, err := GuestConfig(spec, "/rootfs", "9p", "", NetworkPlan{}); err == nil || !strings.Contains(err.Error(), "container mode") {
		t.Fatalf("device bind: %v", err)
	}
}

func TestPlanNetwork(t *testing.T) {
	host := &specs.Spec{Linux: &specs.Linux{}}
	if p := PlanNetwork(host); p.Mode != NetUser || !strings.Contains(p.Why, "host") {
		t.Fatalf("host network: %+v", p)
	}
	empty := &specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.NetworkNamespace}}}}
	if p := PlanNetwork(empty); p.Mode != NetNone {
		t.Fatalf("new namespace: %+v", p)
	}
	if PlanNetwork(&specs.Spec{Linux: &specs.Linux{}}).guestNetwork() == nil {
		t.Fatal("user network without guest configuration")
	}
	// The host's namespace named by path (a CRI container of a
	// hostNetwork pod gets its sandbox's, which is the host's): the
	// host's interfaces must never move into a guest.
	for _, path := range []string{"/proc/self/ns/net", fmt.Sprintf("/proc/%d/ns/net", os.Getpid())} {
		hostByPath := &specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.NetworkNamespace, Path: path}}}}
		if p := PlanNetwork(hostByPath); p.Mode != NetUser || p.NetNS != "" || !strings.Contains(p.Why, "host's network namespace") {
			t.Fatalf("host namespace by path %s: %+v", path, p)
		}
	}
}

// putKernel makes an unpacked kernel below root: boot/vmlinuz-rel and
// lib/modules/rel.
func putKernel(t *testing.T, root, rel string) string {
	t.Helper()
	mods := filepath.Join(root, "lib", "modules", rel)
	if err := os.MkdirAll(mods, 0o755); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(root, "boot"), 0o755)
	if err := os.WriteFile(filepath.Join(root, "boot", "vmlinuz-"+rel), []byte("k"), 0o644); err != nil {
		t.Fatal(err)
	}
	return mods
}

func TestFindKernel(t *testing.T) {
	v61 := KernelChoice{Version: "6.1", Flavour: FlavourGeneric}
	v612 := KernelChoice{Version: "6.12", Flavour: FlavourGeneric}
	dir := t.TempDir()
	if _, err := FindKernel("", v61, "aarch64", dir); err == nil || !strings.Contains(err.Error(), "kiwi-shim setup") {
		t.Fatalf("no kernel: %v", err)
	}
	// The layout of older releases: one 6.1 kernel in kernels/<arch>.
	mods := putKernel(t, filepath.Join(dir, "kernels", "x86_64"), "6.1.0-9-amd64")
	k, err := FindKernel("", v61, "x86_64", dir)
	if err != nil || k.Release != "6.1.0-9-amd64" || k.ModulesDir != mods {
		t.Fatalf("kernel %+v, %v", k, err)
	}
	// A user's empty cache first, then the system's.
	k, err = FindKernel("", v61, "x86_64", t.TempDir(), dir)
	if err != nil || k.Release != "6.1.0-9-amd64" {
		t.Fatalf("second cache: %+v, %v", k, err)
	}
	if _, err := FindKernel("", v612, "x86_64", dir); err == nil || !strings.Contains(err.Error(), "6.12-generic") {
		t.Fatalf("6.12 found in a cache with only 6.1: %v", err)
	}
	// Unpacking other series and flavours (which sort after 6.1.0-9 as
	// strings) switches nobody: each choice finds its own.
	mods612 := putKernel(t, filepath.Join(dir, "kernels", "x86_64", "6.12-generic"), "6.12.118+deb12-amd64")
	putKernel(t, filepath.Join(dir, "kernels", "x86_64", "6.12-cloud"), "6.12.118+deb12-cloud-amd64")
	putKernel(t, filepath.Join(dir, "kernels", "x86_64"), "6.1.0-9-rt-amd64")
	putKernel(t, filepath.Join(dir, "kernels", "x86_64"), "6.1.0-9-cloud-amd64")
	for _, tc := range []struct {
		c    KernelChoice
		want string
	}{
		{v61, "6.1.0-9-amd64"},
		{KernelChoice{Version: "6.1", Flavour: FlavourCloud}, "6.1.0-9-cloud-amd64"},
		{v612, "6.12.118+deb12-amd64"},
		{KernelChoice{Version: "6.12", Flavour: FlavourCloud}, "6.12.118+deb12-cloud-amd64"},
	} {
		k, err := FindKernel("", tc.c, "x86_64", dir)
		if err != nil || k.Release != tc.want {
			t.Errorf("%s: %+v, %v; want %s", tc.c, k, err, tc.want)
		}
	}
	if k, _ := FindKernel("", v612, "x86_64", dir); k.ModulesDir != mods612 {
		t.Errorf("6.12 modules %q, want %q", k.ModulesDir, mods612)
	}
	// Of one choice, the newest release by number (118 after 99).
	putKernel(t, filepath.Join(dir, "kernels", "x86_64", "6.12-generic"), "6.12.99+deb12-amd64")
	if k, _ := FindKernel("", v612, "x86_64", dir); k.Release != "6.12.118+deb12-amd64" {
		t.Errorf("newest 6.12: %s", k.Release)
	}
	if _, err := FindKernel("/nonexistent/vmlinuz", v61, "x86_64", dir); err == nil {
		t.Fatal("missing configured kernel accepted")
	}
	if _, err := FindKernel("", KernelChoice{Version: "6", Flavour: FlavourGeneric}, "x86_64", dir); err == nil {
		t.Fatal("bad version accepted")
	}
}

func TestKernelChoiceMatches(t *testing.T) {
	generic, cloud := FlavourGeneric, FlavourCloud
	for _, tc := range []struct {
		version, flavour, release, arch string
		want                            bool
	}{
		{"6.1", generic, "6.1.0-57-amd64", "x86_64", true},
		{"6.1", generic, "6.1.0-57-cloud-amd64", "x86_64", false},
		{"6.1", cloud, "6.1.0-57-cloud-amd64", "x86_64", true},
		{"6.1", generic, "6.1.0-57-rt-amd64", "x86_64", false},
		{"6.1", generic, "6.12.118+deb12-amd64", "x86_64", false},
		{"6.12", generic, "6.12.118+deb12-amd64", "x86_64", true},
		{"6.12", generic, "6.12.118+deb12-amd64", "aarch64", false},
		{"6.12", generic, "6.12.118+deb12-arm64", "aarch64", true},
		{"6.12", generic, "6.12.118+deb12-arm64-16k", "aarch64", false},
		{"6.12", cloud, "6.12.118+deb12-cloud-arm64", "aarch64", true},
		{"6.12", cloud, "6.12.118+deb12-amd64", "x86_64", false},
		{"6.12", generic, "6.12-amd64", "x86_64", false},
	} {
		c := KernelChoice{Version: tc.version, Flavour: tc.flavour}
		if got := c.Matches(tc.release, tc.arch); got != tc.want {
			t.Errorf("%s matches %s (%s) = %v, want %v", c, tc.release, tc.arch, got, tc.want)
		}
	}
}

func TestReleasesIn(t *testing.T) {
	search := `linux-image-6.12.99+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs
linux-image-6.12.118+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs
linux-image-6.12.118+deb12-cloud-amd64-unsigned - Linux 6.12 for x86-64 cloud
linux-image-6.12.118+deb12-rt-amd64-unsigned - Linux 6.12 for 64-bit PCs, PREEMPT_RT
linux-image-6.12.107+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs
`
	got := releasesIn(search, KernelChoice{Version: "6.12", Flavour: FlavourGeneric}, "x86_64")
	want := []string{"6.12.118+deb12-amd64", "6.12.107+deb12-amd64", "6.12.99+deb12-amd64"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("releases %v, want %v", got, want)
	}
	if got := releasesIn(search, KernelChoice{Version: "6.12", Flavour: FlavourCloud}, "x86_64"); len(got) != 1 || got[0] != "6.12.118+deb12-cloud-amd64" {
		t.Fatalf("cloud releases %v", got)
	}
}

// TestDefaultKernelChoice: VM mode boots Debian's generic 6.12 unless the
// config names another kernel (the generic flavour keeps 9p).
func TestDefaultKernelChoice(t *testing.T) {
	c := DefaultKernelChoice()
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c != (KernelChoice{Version: "6.12", Flavour: FlavourGeneric}) {
		t.Fatalf("default kernel %s, want 6.12-generic", c)
	}
}
