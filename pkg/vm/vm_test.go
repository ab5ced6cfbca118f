package vm

import (
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
}

func TestFindKernel(t *testing.T) {
	dir := t.TempDir()
	if _, err := FindKernel("", "aarch64", dir); err == nil || !strings.Contains(err.Error(), "kiwi-shim setup") {
		t.Fatalf("no kernel: %v", err)
	}
	boot := filepath.Join(dir, "kernels", "x86_64", "boot")
	mods := filepath.Join(dir, "kernels", "x86_64", "lib", "modules", "6.1.0-9-amd64")
	os.MkdirAll(boot, 0o755)
	os.MkdirAll(mods, 0o755)
	os.WriteFile(filepath.Join(boot, "vmlinuz-6.1.0-9-amd64"), []byte("k"), 0o644)
	k, err := FindKernel("", "x86_64", dir)
	if err != nil || k.Release != "6.1.0-9-amd64" || k.ModulesDir != mods {
		t.Fatalf("kernel %+v, %v", k, err)
	}
	// A user's empty cache first, then the system's.
	k, err = FindKernel("", "x86_64", t.TempDir(), dir)
	if err != nil || k.Release != "6.1.0-9-amd64" {
		t.Fatalf("second cache: %+v, %v", k, err)
	}
	if _, err := FindKernel("/nonexistent/vmlinuz", "x86_64", dir); err == nil {
		t.Fatal("missing configured kernel accepted")
	}
}
