package vm

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
)

// Share is a host directory served to the guest.
type Share struct {
	// Tag is the name the guest mounts it by.
	Tag string
	// Path is the host directory.
	Path string
	// ReadOnly refuses writes from the guest.
	ReadOnly bool
}

// Machine describes one VM.
type Machine struct {
	// QEMU is the qemu-system binary.
	QEMU string
	// Arch is the guest architecture (x86_64, aarch64).
	Arch string
	// Accel is "kvm" or "tcg".
	Accel string
	// MemoryMiB and CPUs size the guest.
	MemoryMiB int64
	CPUs      int
	// Kernel and Initrd boot it.
	Kernel, Initrd string
	// Cmdline is appended to the kernel command line.
	Cmdline string
	// ControlSocket is the unix socket the control port connects to.
	ControlSocket string
	// QMPSocket, when set, is the unix socket QEMU's machine protocol
	// (QMP) monitor connects to: the monitor stops and continues the
	// vCPUs through it (pause, resume).
	QMPSocket string
	// ConsoleLog receives the guest's serial console.
	ConsoleLog string
	// Shares are served over QEMU's built-in virtio-9p.
	Shares []Share
	// VirtioFS are vhost-user-fs devices whose back end (kiwi-sharefs)
	// listens on Socket. They need the guest's RAM in a shared memfd.
	VirtioFS []VirtioFS
	// Network is NetNone, NetUser or NetTap.
	Network string
	// TapMACs are the guest NICs of NetTap: QEMU inherits their tap
	// descriptors as fds 3, 4, ... in this order.
	TapMACs []string
	// Disks are raw images attached as virtio-blk devices.
	Disks []Disk
	// Hotplug gives the machine a template's layout (see template.go):
	// its RAM is always a shared memfd and it has HotplugPorts empty
	// PCIe root ports. The container's devices are not on its command
	// line, only their back ends (tap descriptors, drives, 9p file
	// system devices): HotplugCommands attaches them once the guest is
	// restored. A template is made from such a machine without any
	// container device.
	Hotplug bool `json:",omitempty"`
	// IncomingFD, when not 0, makes QEMU wait for the guest's migration
	// stream (a template) at this inherited descriptor: -incoming defer,
	// and the caller starts the load over QMP (restoreCommands), after
	// which the guest stays stopped (-S) until it is told to continue.
	IncomingFD int `json:"-"`
	// RAMPath, when set, is the file the guest's RAM is (shared, as
	// with the memfd): a template's RAM file when it is made, and the
	// copy of it a restored box runs on (/proc/self/fd/N of a memfd).
	// Such RAM is left out of the migration stream (x-ignore-shared).
	RAMPath string `json:"-"`
}

// VirtioFS is one vhost-user-fs device.
type VirtioFS struct {
	Tag, Socket string
}

// Disk is a raw image the guest finds by its serial number.
type Disk struct {
	// Path of the image on the host.
	Path string
	// Serial is what the guest reads in /sys/block/vdX/serial (at most
	// 20 bytes, virtio-blk's limit).
	Serial string
}

// vhostQueueSize is the virtio-fs ring size (vmshare.QueueSize).
const vhostQueueSize = 1024

// SupportedArch reports whether VM mode runs guests of the architecture
// (a kernel name, see package guestarch).
func SupportedArch(arch string) bool { return arch == "x86_64" || arch == "aarch64" }

// Args returns QEMU's argument vector (without the binary).
//
// The machine is q35 with PCI virtio devices: measured under TCG, the
// generic Debian kernel starts as fast there as on microvm, and q35 needs
// no virtio-mmio command line plumbing.
func (m Machine) Args() ([]string, error) {
	if m.MemoryMiB < 64 {
		return nil, fmt.Errorf("guest memory %d MiB: at least 64 MiB", m.MemoryMiB)
	}
	if m.CPUs < 1 {
		return nil, fmt.Errorf("guest cpus %d: at least 1", m.CPUs)
	}
	var machine, cpu, console string
	switch m.Arch {
	case "x86_64":
		machine, console = "q35", "ttyS0"
		cpu = "max"
		if m.Accel == "kvm" {
			cpu = "host"
		}
	case "aarch64":
		machine, console = "virt", "ttyAMA0"
		cpu = "max"
		if m.Accel == "kvm" {
			cpu = "host"
		}
	default:
		return nil, fmt.Errorf("guest architecture %q is not supported (x86_64, aarch64)", m.Arch)
	}
	// oops=panic: a guest kernel that oopses ends the box (panic=-1
	// reboots, which -no-reboot makes QEMU's exit) instead of running on
	// half-broken; a build then fails at once, with the oops reported
	// (guestCrash), rather than hanging.
	cmdline := strings.TrimSpace("console=" + console + " panic=-1 oops=panic quiet loglevel=3 rdinit=/init " + m.Cmdline)
	sharedRAM := len(m.VirtioFS) > 0 || m.Hotplug
	if sharedRAM {
		// The vhost-user back end maps the guest's memory (a template's
		// too: its restored boxes get virtio-fs devices).
		machine += ",memory-backend=mem"
	}
	args := []string{
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-machine", machine,
		"-accel", m.Accel,
		"-cpu", cpu,
		"-m", strconv.FormatInt(m.MemoryMiB, 10) + "M",
		"-smp", strconv.Itoa(m.CPUs),
		"-kernel", m.Kernel,
		"-initrd", m.Initrd,
		"-append", cmdline,
		"-serial", "file:" + m.ConsoleLog,
		"-device", "virtio-rng-pci",
		"-device", "virtio-serial-pci,id=vser0",
		"-chardev", "socket,id=ctl,path=" + m.ControlSocket,
		"-device", "virtserialport,bus=vser0.0,chardev=ctl,name=org.kiwi-shim.ctl",
	}
	if m.QMPSocket != "" {
		if strings.ContainsAny(m.QMPSocket, ",\n") {
			return nil, fmt.Errorf("QMP socket %q cannot be passed to QEMU", m.QMPSocket)
		}
		// QEMU connects as a client, like the control port: the monitor
		// listens before it starts QEMU.
		args = append(args, "-chardev", "socket,id=qmp,path="+m.QMPSocket, "-mon", "chardev=qmp,mode=control")
	}
	if m.Hotplug {
		for i := range HotplugPorts {
			args = append(args, "-device", fmt.Sprintf("pcie-root-port,id=%s%d,chassis=%d", hotplugPortPrefix, i, i+1))
		}
	}
	// device appends a device: on a template's machine it is attached
	// later (HotplugCommands), only its back end is on the command line.
	device := func(dev string) {
		if !m.Hotplug {
			args = append(args, "-device", dev)
		}
	}
	if m.Network == NetUser {
		args = append(args, "-netdev", "user,id=net0")
		device("virtio-net-pci,netdev=net0,mac=" + userMAC)
	}
	for i, mac := range m.TapMACs {
		if _, err := net.ParseMAC(mac); err != nil {
			return nil, fmt.Errorf("tap NIC %d: %w", i, err)
		}
		id := "tap" + strconv.Itoa(i)
		args = append(args, "-netdev", "tap,id="+id+",fd="+strconv.Itoa(3+i))
		device("virtio-net-pci,netdev=" + id + ",mac=" + mac)
	}
	switch {
	case m.RAMPath != "":
		if strings.ContainsAny(m.RAMPath, ",\n") {
			return nil, fmt.Errorf("RAM file %q cannot be passed to QEMU", m.RAMPath)
		}
		if !sharedRAM {
			return nil, errors.New("a RAM file is only for a template's machine (Hotplug)")
		}
		args = append(args, "-object", "memory-backend-file,id=mem,share=on,mem-path="+m.RAMPath+",size="+strconv.FormatInt(m.MemoryMiB, 10)+"M")
	case sharedRAM:
		args = append(args, "-object", "memory-backend-memfd,id=mem,share=on,size="+strconv.FormatInt(m.MemoryMiB, 10)+"M")
	}
	for i, v := range m.VirtioFS {
		if strings.ContainsAny(v.Socket, ",\n") || strings.ContainsAny(v.Tag, ",=\n") || len(v.Tag) > 36 {
			return nil, fmt.Errorf("virtio-fs %q (socket %q): tag or path cannot be passed to QEMU", v.Tag, v.Socket)
		}
		if m.Hotplug {
			// Its socket is connected by chardev-add, once the guest is
			// restored: kiwi-sharefs ends with its first connection, and
			// a failed restore must leave it to the cold boot.
			continue
		}
		id := "vfs" + strconv.Itoa(i)
		args = append(args, "-chardev", "socket,id="+id+",path="+v.Socket,
			"-device", "vhost-user-fs-pci,queue-size="+strconv.Itoa(vhostQueueSize)+",chardev="+id+",tag="+v.Tag)
	}
	for i, d := range m.Disks {
		if strings.ContainsAny(d.Path, ",\n") || strings.ContainsAny(d.Serial, ",=\n") || len(d.Serial) > 20 {
			return nil, fmt.Errorf("disk %q (serial %q): path or serial cannot be passed to QEMU", d.Path, d.Serial)
		}
		id := "disk" + strconv.Itoa(i)
		// cache=unsafe: a scratch disk's content is thrown away with the
		// box, so the guest's flushes need not reach the host's disk.
		args = append(args,
			"-drive", "file="+d.Path+",format=raw,if=none,id="+id+",cache=unsafe,aio=threads,discard=unmap")
		device("virtio-blk-pci,drive=" + id + ",serial=" + d.Serial)
	}
	for i, s := range m.Shares {
		if strings.ContainsAny(s.Path, ",\n") || strings.ContainsAny(s.Tag, ",=\n") {
			return nil, fmt.Errorf("share %q: paths with commas cannot be passed to QEMU", s.Path)
		}
		id := "fs" + strconv.Itoa(i)
		fsdev := "local,id=" + id + ",path=" + s.Path + ",security_model=passthrough,multidevs=remap"
		if s.ReadOnly {
			fsdev += ",readonly=on"
		}
		args = append(args, "-fsdev", fsdev)
		device("virtio-9p-pci,fsdev=" + id + ",mount_tag=" + s.Tag)
	}
	if m.IncomingFD > 0 {
		if !m.Hotplug {
			return nil, errors.New("a guest is restored only into a template's machine (Hotplug)")
		}
		args = append(args, "-S", "-incoming", "defer")
	}
	return args, nil
}
