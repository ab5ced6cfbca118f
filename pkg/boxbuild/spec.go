package boxbuild

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
)

// ScratchMount is where the scratch disk appears in the box.
const ScratchMount = "/var/tmp/kiwi-scratch"

// Options are boxbuild's choices.
type Options struct {
	// Mode is the box's mode.
	Mode config.Mode
	// Share is how host directories reach the guest (VM mode); "": the
	// configured kind.
	Share config.ShareKind
	// Memory (e.g. "8G"), CPUs and Arch size and choose the VM.
	Memory string
	CPUs   int
	Arch   string
	// Scratch is the scratch disk's size in bytes; 0 builds directly in
	// the target directory.
	Scratch int64
	// SharedPaths are host directories the box sees at the same path.
	SharedPaths []string
	// ResolvConf is bound over the box's /etc/resolv.conf.
	ResolvConf string
}

// script runs KIWI in the box. With a scratch disk, KIWI's target and
// temporary directories are on it and only the results (the image, the
// package lists, kiwi.result, the build log) are copied to the shared
// target directory, keeping their holes; KIWI's status is the script's.
//
// $1 is the real target directory, $2 the working one (the same without
// scratch), $3 a temporary directory to create (or ""), the rest KIWI's
// arguments.
const script = `target=$1 work=$2 tmp=$3; shift 3
mkdir -p "$target" "$work" ${tmp:+"$tmp"} || exit 1
kiwi-ng "$@" --target-dir "$work"
rc=$?
if [ "$work" != "$target" ]; then
	echo "kiwi-shim boxbuild: copying results to $target" >&2
	mkdir -p "$target/build"
	cd "$work" &&
	find . -mindepth 1 -maxdepth 1 ! -name build -exec cp -a --sparse=always -t "$target/" {} + &&
	{ [ ! -e build/image-root.log ] || cp -a build/image-root.log "$target/build/"; } || { [ $rc -ne 0 ] || rc=1; }
fi
exit $rc`

// Spec returns the box container's spec. rootfs is the unpacked box and
// img its image configuration.
func Spec(rootfs string, img ocispec.ImageConfig, k KiwiArgs, o Options) (*specs.Spec, error) {
	work, tmp := k.TargetDir, ""
	global := slices.Clone(k.Global)
	if o.Scratch > 0 {
		work = ScratchMount + "/target"
		if k.TempDir == "" {
			tmp = ScratchMount + "/tmp"
			global = append(global, "--temp-dir="+tmp)
		}
	}
	args := []string{"/bin/sh", "-c", script, "kiwi-box", k.TargetDir, work, tmp}
	args = append(args, global...)
	args = append(args, "system", "build", "--description="+k.Description)
	args = append(args, k.Build...)

	env := slices.Clone(img.Env)
	if !slices.ContainsFunc(env, func(e string) bool { return strings.HasPrefix(e, "PATH=") }) {
		env = append(env, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	}
	env = append(env, "TERM=xterm", "HOME=/root", "LANG=C.UTF-8")

	ann := map[string]string{oci.AnnotationMode: string(o.Mode)}
	if o.Mode == config.ModeVM {
		if o.Memory != "" {
			ann[oci.AnnotationVMMemory] = o.Memory
		}
		if o.CPUs > 0 {
			ann[oci.AnnotationVMCPUs] = strconv.Itoa(o.CPUs)
		}
		if o.Arch != "" {
			ann[oci.AnnotationVMArch] = o.Arch
		}
		if o.Share != "" {
			ann[oci.AnnotationShare] = string(o.Share)
		}
		if o.Scratch > 0 {
			ann[oci.AnnotationVMScratch] = strconv.FormatInt(o.Scratch, 10) + ":" + ScratchMount
		}
	}
	if _, err := oci.ParseAnnotations(ann); err != nil {
		return nil, err
	}

	mounts := []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc"},
		{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
		{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
		{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
		{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "nodev", "mode=1777"}},
	}
	if o.ResolvConf != "" {
		mounts = append(mounts, specs.Mount{Destination: "/etc/resolv.conf", Type: "bind", Source: o.ResolvConf, Options: []string{"rbind", "ro"}})
	}
	binds := []struct {
		path string
		ro   bool
	}{{k.Description, true}, {k.TargetDir, false}}
	for _, p := range o.SharedPaths {
		binds = append(binds, struct {
			path string
			ro   bool
		}{p, false})
	}
	for _, b := range binds {
		if !filepath.IsAbs(b.path) {
			return nil, fmt.Errorf("%s: not an absolute path", b.path)
		}
		if fi, err := os.Stat(b.path); err != nil || !fi.IsDir() {
			return nil, fmt.Errorf("%s: not a directory (%v)", b.path, err)
		}
		opts := []string{"rbind"}
		if b.ro {
			opts = append(opts, "ro")
		}
		mounts = append(mounts, specs.Mount{Destination: b.path, Type: "bind", Source: b.path, Options: opts})
	}

	caps := []string{
		"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
		"CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_SETFCAP",
	}
	ns := []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace}, {Type: specs.UTSNamespace}, {Type: specs.MountNamespace}}
	return &specs.Spec{
		Version:  specs.Version,
		Hostname: "kiwi-box",
		Root:     &specs.Root{Path: rootfs},
		Process: &specs.Process{
			Args: args, Env: env, Cwd: "/",
			Capabilities: &specs.LinuxCapabilities{Bounding: caps, Effective: caps, Permitted: caps},
		},
		Mounts:      mounts,
		Annotations: ann,
		// No network namespace: container mode uses the host's network, VM
		// mode QEMU's user-mode network (see vm.PlanNetwork).
		Linux: &specs.Linux{Namespaces: ns},
	}, nil
}
