package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/cgroups/v3"
	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/containermode"
	"github.com/kiwi-shim/kiwi-shim/pkg/initramfs"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmmode"
)

// checkResult is one line of `kiwi-shim check`.
type checkResult struct {
	Name   string `json:"name"`
	Status string `json:"status"` // ok, warn, fail
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
}

var checkCommand = cli.Command{
	Name:  "check",
	Usage: "report what this host can do for kiwi-shim, and how to fix what is missing",
	Flags: []cli.Flag{cli.StringFlag{Name: "format, f", Value: "text", Usage: "text or json"}},
	Action: withEnv(func(ctx *cli.Context, e *env) error {
		format := ctx.String("format")
		if format != "text" && format != "json" {
			return fmt.Errorf("--format %q: want text or json", format)
		}
		results := e.checks()
		if format == "json" {
			enc := json.NewEncoder(os.Stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(results)
		}
		failed := 0
		for _, r := range results {
			line := fmt.Sprintf("%-4s %-22s %s", r.Status, r.Name, r.Detail)
			if r.Fix != "" {
				line += " (fix: " + r.Fix + ")"
			}
			fmt.Println(line)
			if r.Status == "fail" {
				failed++
			}
		}
		if failed > 0 {
			return exitError{code: 1}
		}
		return nil
	}),
}

func (e *env) checks() []checkResult {
	var rs []checkResult
	add := func(name, status, detail, fix string) {
		rs = append(rs, checkResult{Name: name, Status: status, Detail: detail, Fix: fix})
	}
	host := vm.HostArch()
	for _, arch := range []string{"x86_64", "aarch64"} {
		qemu, err := vmmode.FindQEMU(e.cfg.VM, arch)
		if err != nil {
			status := "warn"
			if arch == host {
				status = "fail"
			}
			add("qemu "+arch, status, "not found", strings.TrimPrefix(err.Error(), "qemu-system-"+arch+" not found: "))
			continue
		}
		add("qemu "+arch, "ok", qemu, "")
		if arch == host {
			a, err := vm.ChooseAccel(e.cfg.VM.Accel, arch, qemu)
			if err != nil {
				add("accelerator", "fail", err.Error(), `set vm.accel = "auto"`)
			} else {
				add("accelerator", "ok", a.Name+": "+a.Reason, "")
			}
		}
		k, err := vmmode.FindKernel(e.cfg.VM, arch, e.cacheDirs()...)
		switch {
		case err != nil && arch == host:
			add("kernel "+arch, "fail", "no guest kernel", "kiwi-shim setup")
		case err != nil:
			add("kernel "+arch, "warn", "no guest kernel", "kiwi-shim setup --arch "+arch)
		case k.ModulesDir == "":
			add("kernel "+arch, "warn", k.Image+" without modules (everything must be built in)", "")
		default:
			add("kernel "+arch, "ok", k.Release+" "+k.Image, "")
		}
	}
	if _, err := initBinary(host); err != nil {
		add("guest init", "fail", err.Error(), "make build")
	} else {
		n, _ := filepath.Glob(filepath.Join(e.cfg.CacheDir, initramfs.CacheSubdir, "*.cpio"))
		add("guest init", "ok", fmt.Sprintf("kiwi-box-init found; %d initramfs image(s) cached", len(n)), "")
	}
	if f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0); err != nil {
		add("fuse", "warn", err.Error(), "modprobe fuse")
	} else {
		f.Close()
		add("fuse", "ok", "/dev/fuse usable", "")
	}
	if e.rootless {
		rs = append(rs, e.rootlessChecks()...)
		add("container mode", "warn", "needs real root (host loop devices); VM mode only", "")
		return rs
	}
	if a, err := e.allocator(); err != nil {
		add("loop devices", "fail", err.Error(), "modprobe loop")
	} else if st, err := a.Status(); err != nil {
		add("loop devices", "fail", err.Error(), "run as root")
	} else {
		add("loop devices", "ok", fmt.Sprintf("capacity %d, %d leased, %d waiting", st.Capacity, len(st.Held), st.Waiting), "")
	}
	p, rerr := containermode.FindRuntime(e.cfg.Container.Runtime)
	rs = append(rs, cgroupCheck(p))
	if rerr != nil {
		add("container mode", "warn", rerr.Error(), "apt-get install runc")
	} else {
		add("container mode", "ok", "low-level runtime "+p, "")
	}
	rs = append(rs, registered("podman", []string{"/etc/containers/containers.conf", "/etc/containers/containers.conf.d/*.conf"}, "kiwi-shim"))
	return rs
}

// registered looks for the runtime in a tool's configuration files.
func registered(tool string, globs []string, needle string) checkResult {
	for _, g := range globs {
		files, _ := filepath.Glob(g)
		for _, f := range files {
			if b, err := os.ReadFile(f); err == nil && strings.Contains(string(b), needle) {
				return checkResult{Name: tool, Status: "ok", Detail: "kiwi-shim registered in " + f}
			}
		}
	}
	return checkResult{Name: tool, Status: "warn", Detail: "kiwi-shim not registered (use --runtime /path/to/kiwi-shim)", Fix: "make install"}
}

// rootlessChecks are what an unprivileged user needs for VM mode under
// rootless podman: the XDG directories, subordinate id ranges and
// newuidmap, and (optionally) /dev/kvm.
func (e *env) rootlessChecks() []checkResult {
	var rs []checkResult
	add := func(name, status, detail, fix string) {
		rs = append(rs, checkResult{Name: name, Status: status, Detail: detail, Fix: fix})
	}
	name := strconv.Itoa(os.Getuid())
	if u, err := user.Current(); err == nil {
		name = u.Username
	}
	if e.rootlessErr != nil {
		add("rootless", "fail", e.rootlessErr.Error(), "export XDG_RUNTIME_DIR=/run/user/$(id -u) (and create it, mode 0700)")
	} else {
		add("rootless", "ok", fmt.Sprintf("uid %d: state in %s, caches in %s", os.Getuid(), e.root, e.cfg.CacheDir), "")
	}
	for _, f := range []string{"/etc/subuid", "/etc/subgid"} {
		if hasSubIDs(f, name, os.Getuid()) {
			add(filepath.Base(f), "ok", "range for "+name, "")
		} else {
			add(filepath.Base(f), "fail", "no range for "+name+" (rootless podman needs one)",
				"usermod --add-subuids 100000-165535 --add-subgids 100000-165535 "+name)
		}
	}
	if p, err := exec.LookPath("newuidmap"); err != nil {
		add("newuidmap", "fail", "not found", "apt-get install uidmap")
	} else {
		add("newuidmap", "ok", p, "")
	}
	// Rootless podman's network (slirp4netns, pasta) makes its tap through
	// /dev/net/tun. A distribution's udev makes the node 0666; machines
	// without udev (minimal VMs, some CI images) leave it 0600.
	if f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0); err != nil {
		add("tun", "fail", fmt.Sprintf("%v: rootless podman's slirp4netns cannot make the container network", err),
			"chmod 0666 /dev/net/tun as root (what udev does on a distribution; make deps does it), or run with --network none")
	} else {
		f.Close()
		add("tun", "ok", "/dev/net/tun usable", "")
	}
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err != nil {
		add("kvm", "warn", fmt.Sprintf("%v: guests run under TCG (slow)", err), "usermod -aG kvm "+name+" (then log in again)")
	} else {
		f.Close()
		add("kvm", "ok", "/dev/kvm usable", "")
	}
	return rs
}

// hasSubIDs reports whether a subuid/subgid file has a range for the
// user, by name or id.
func hasSubIDs(file, name string, id int) bool {
	b, err := os.ReadFile(file)
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Split(strings.TrimSpace(l), ":")
		if len(f) == 3 && (f[0] == name || f[0] == strconv.Itoa(id)) {
			if n, err := strconv.Atoi(f[2]); err == nil && n > 0 {
				return true
			}
		}
	}
	return false
}

// cgroupCheck reports the host's cgroup layout and manager, and what
// container mode can do with them: it shows a leased device's partitions
// to the container by allowing them in the container's device cgroup,
// through the cgroup v1 devices controller or, on cgroup v2, by replacing
// runc's eBPF device filter (pkg/devcgroup), which needs runc's state and
// so runc rather than crun. runtime is the configured low-level runtime's
// path, "" if none was found.
func cgroupCheck(runtime string) checkResult {
	manager := "cgroupfs"
	systemd := false
	if _, err := os.Stat("/run/systemd/system"); err == nil {
		manager = "systemd running (podman's default cgroup_manager is systemd; runc's --systemd-cgroup)"
		systemd = true
	}
	switch cgroups.Mode() {
	case cgroups.Unified:
		if filepath.Base(runtime) == "crun" {
			return checkResult{Name: "cgroups", Status: "warn",
				Detail: "v2 (unified), manager " + manager + ": with crun the partitions of leased loop devices stay invisible in the container (the keeper rebuilds the runtime's device filter from runc's state, which crun does not keep), so a KIWI build that partitions a disk fails in container mode",
				Fix:    "install runc and set container.runtime = \"runc\", or use VM mode for partitioned images"}
		}
		how := "the loop keeper replaces runc's eBPF device filter (in place, BPF_F_REPLACE) with one that also allows exactly the partition numbers"
		if systemd {
			how += ", and with --systemd-cgroup adds them to the container scope's DeviceAllow too"
		}
		return checkResult{Name: "cgroups", Status: "ok", Detail: "v2 (unified), manager " + manager + ": container mode shows leased loop devices and their partitions (" + how + ")"}
	case cgroups.Hybrid:
		return checkResult{Name: "cgroups", Status: "ok", Detail: "v1 with the unified hierarchy beside it (hybrid), manager " + manager + ": container mode shows leased loop devices and their partitions (v1 devices controller)"}
	case cgroups.Legacy:
		return checkResult{Name: "cgroups", Status: "ok", Detail: "v1, manager " + manager + ": container mode shows leased loop devices and their partitions (v1 devices controller)"}
	default:
		return checkResult{Name: "cgroups", Status: "warn", Detail: "no cgroup hierarchy found: container mode cannot confine devices"}
	}
}
