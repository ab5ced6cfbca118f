package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli"
	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/boxbuild"
	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/ociarchive"
	"github.com/kiwi-shim/kiwi-shim/pkg/rootless"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
)

var boxbuildCommand = cli.Command{
	Name:  "boxbuild",
	Usage: "run `kiwi-ng system build` in a kiwi box, like KIWI's boxbuild plugin",
	ArgsUsage: `[options] -- --description DIR --target-dir DIR [KIWI options]

   The description is shared read-only and the target directory read-write,
   both at their host paths; --shared-path adds others. KIWI's global options
   (--type, --profile, --debug, ...) may be given after -- as well. The exit
   status is KIWI's.`,
	Flags: []cli.Flag{
		cli.StringFlag{Name: "box", Value: "bookworm", Usage: "box NAME (<cache_dir>/boxes/kiwi-box-NAME.oci.tar) or the path of an OCI image archive"},
		cli.BoolFlag{Name: "container", Usage: "container mode (runc and the host's loop devices) instead of a VM"},
		cli.BoolFlag{Name: "9p-sharing", Usage: "share directories with QEMU's 9p (VM mode)"},
		cli.BoolFlag{Name: "virtiofs-sharing", Usage: "share directories with virtio-fs (VM mode)"},
		cli.StringFlag{Name: "box-memory", Value: "8G", Usage: "guest memory"},
		cli.IntFlag{Name: "box-smp-cpus", Usage: "guest CPUs (default: the host's, at most 4)"},
		cli.BoolFlag{Name: "x86_64", Usage: "an x86_64 box"},
		cli.BoolFlag{Name: "aarch64", Usage: "an aarch64 box"},
		cli.StringSliceFlag{Name: "shared-path", Usage: "also share this host directory at the same path (repeatable)"},
		cli.StringFlag{Name: "scratch", Value: "20G", Usage: "size of the guest-local scratch disk KIWI builds on (VM mode; 0: build on the shared target directory)"},
		cli.BoolFlag{Name: "box-debug", Usage: "keep the box's container and files after the build, and log kiwi-shim's decisions"},
	},
	Action: withEnv(func(ctx *cli.Context, e *env) error {
		code, err := runBoxbuild(ctx, e)
		if err != nil {
			return err
		}
		return exitError{code: code}
	}),
}

// boxOptions turns boxbuild's flags into options.
func boxOptions(ctx *cli.Context) (boxbuild.Options, error) {
	o := boxbuild.Options{Mode: config.ModeVM, Memory: ctx.String("box-memory"), CPUs: ctx.Int("box-smp-cpus")}
	if ctx.Bool("container") {
		o.Mode = config.ModeContainer
	}
	switch {
	case ctx.Bool("9p-sharing") && ctx.Bool("virtiofs-sharing"):
		return o, errors.New("--9p-sharing and --virtiofs-sharing exclude each other")
	case ctx.Bool("9p-sharing"):
		o.Share = config.Share9P
	case ctx.Bool("virtiofs-sharing"):
		o.Share = config.ShareVirtioFS
	}
	switch {
	case ctx.Bool("x86_64") && ctx.Bool("aarch64"):
		return o, errors.New("--x86_64 and --aarch64 exclude each other")
	case ctx.Bool("x86_64"):
		o.Arch = "x86_64"
	case ctx.Bool("aarch64"):
		o.Arch = "aarch64"
	}
	if o.CPUs == 0 {
		o.CPUs = min(runtime.NumCPU(), 4)
	}
	if s := ctx.String("scratch"); s != "0" && s != "" && o.Mode == config.ModeVM {
		n, err := config.ParseSize(s)
		if err != nil {
			return o, fmt.Errorf("--scratch: %w", err)
		}
		o.Scratch = n
	}
	for _, p := range ctx.StringSlice("shared-path") {
		abs, err := filepath.Abs(p)
		if err != nil {
			return o, err
		}
		o.SharedPaths = append(o.SharedPaths, abs)
	}
	return o, nil
}

// boxArchive resolves --box: a path, or a NAME in the first of the cache
// directories that has it. A box for another architecture than the
// host's (arch, a kernel name; "" for the host's) is NAME-DEBARCH, as
// `contrib/box/build --arch DEBARCH` names it.
func boxArchive(box, arch string, cacheDirs ...string) (string, error) {
	if strings.ContainsRune(box, '/') {
		if _, err := os.Stat(box); err != nil {
			return "", fmt.Errorf("box %s: %w", box, err)
		}
		return box, nil
	}
	name := box
	if arch != "" && arch != vm.HostArch() {
		name += "-" + vm.DebArch(arch)
	}
	var err error
	for _, dir := range cacheDirs {
		p := filepath.Join(dir, "boxes", "kiwi-box-"+name+".oci.tar")
		if _, err = os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("box %s: %w (the default box is built by `make box`, i.e. contrib/box/build [--arch DEBARCH])", name, err)
}

// inUserNamespace re-runs this boxbuild as root of a new user namespace
// that maps only the calling user, and returns its exit status. An
// ordinary user's boxbuild needs it to unpack the box (the box's files
// become the user's; device nodes are skipped) and to run the box in VM
// mode; no newuidmap or subordinate ids are needed.
func inUserNamespace() (int, error) {
	cmd := exec.Command("/proc/self/exe", os.Args[1:]...)
	cmd.Args[0] = os.Args[0]
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  unix.CLONE_NEWUSER,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getuid(), Size: 1}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getgid(), Size: 1}},
		// Needed to write a gid map without CAP_SETGID in the parent.
		GidMappingsEnableSetgroups: false,
		// Signals reach it once, through runForwardingSignals.
		Setpgid: true,
	}
	code, err := runForwardingSignals(cmd)
	if err != nil {
		return 0, fmt.Errorf("%w (an ordinary user's boxbuild runs in a user namespace of its own: are unprivileged user namespaces disabled, e.g. sysctl kernel.unprivileged_userns_clone=0?)", err)
	}
	return code, nil
}

// runForwardingSignals runs cmd, passing on the signals a terminal or a
// service manager sends, and returns its shell-style exit status.
func runForwardingSignals(cmd *exec.Cmd) (int, error) {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM, unix.SIGHUP)
	defer signal.Stop(sigs)
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start %s: %w", cmd.Args[0], err)
	}
	go func() {
		for s := range sigs {
			cmd.Process.Signal(s)
		}
	}()
	err := cmd.Wait()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, nil
	case errors.As(err, &ee):
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal()), nil
		}
		return ee.ExitCode(), nil
	default:
		return 0, fmt.Errorf("%s: %w", cmd.Args[0], err)
	}
}

func runBoxbuild(ctx *cli.Context, e *env) (int, error) {
	if os.Geteuid() != 0 {
		if ctx.Bool("container") {
			return 0, errors.New("--container needs real root (it hands the host's loop devices to runc); without root boxbuild runs the box as a VM")
		}
		return inUserNamespace()
	}
	cwd, err := os.Getwd()
	if err != nil {
		return 0, err
	}
	kiwi, err := boxbuild.ParseKiwiArgs(ctx.Args(), cwd)
	if err != nil {
		return 0, err
	}
	opts, err := boxOptions(ctx)
	if err != nil {
		return 0, err
	}
	archivePath, err := boxArchive(ctx.String("box"), opts.Arch, e.cacheDirs()...)
	if err != nil {
		return 0, err
	}
	if err := os.MkdirAll(kiwi.TargetDir, 0o755); err != nil {
		return 0, fmt.Errorf("target directory: %w", err)
	}

	var rnd [4]byte
	rand.Read(rnd[:])
	id := "boxbuild-" + hex.EncodeToString(rnd[:])
	if err := os.MkdirAll(e.cfg.WorkDir, 0o700); err != nil {
		return 0, fmt.Errorf("work_dir: %w", err)
	}
	bundle, err := os.MkdirTemp(e.cfg.WorkDir, id+"-")
	if err != nil {
		return 0, fmt.Errorf("work_dir: %w", err)
	}
	keep := ctx.Bool("box-debug")
	defer func() {
		if keep {
			fmt.Fprintf(os.Stderr, "kiwi-shim boxbuild: kept the box's bundle %s and container %s (kiwi-shim delete %s)\n", bundle, id, id)
			return
		}
		if err := os.RemoveAll(bundle); err != nil {
			e.log.Error("remove box bundle", "dir", bundle, "err", err)
		}
	}()

	start := time.Now()
	a, err := ociarchive.Open(archivePath)
	if err != nil {
		return 0, err
	}
	rootfs := filepath.Join(bundle, "rootfs")
	img, err := a.Unpack(context.Background(), rootfs, ociarchive.UnpackOptions{NoSameOwner: !rootless.CanChown()})
	a.Close()
	if err != nil {
		return 0, fmt.Errorf("unpack box %s: %w", archivePath, err)
	}
	fmt.Fprintf(os.Stderr, "kiwi-shim boxbuild: box %s unpacked in %.1fs, building in %s mode\n", filepath.Base(archivePath), time.Since(start).Seconds(), opts.Mode)

	if opts.Mode == config.ModeVM {
		// QEMU's user-mode network answers DNS at 10.0.2.3 and forwards
		// it to the host's resolver, whatever that is.
		opts.ResolvConf = filepath.Join(bundle, "resolv.conf")
		if err := os.WriteFile(opts.ResolvConf, []byte("nameserver 10.0.2.3\n"), 0o644); err != nil {
			return 0, err
		}
	} else if _, err := os.Stat("/etc/resolv.conf"); err == nil {
		opts.ResolvConf = "/etc/resolv.conf"
	}
	spec, err := boxbuild.Spec(rootfs, img.Config, kiwi, opts)
	if err != nil {
		return 0, err
	}
	b, err := json.MarshalIndent(spec, "", "  ")
	if err != nil {
		return 0, err
	}
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), b, 0o600); err != nil {
		return 0, err
	}

	self, err := os.Executable()
	if err != nil {
		return 0, err
	}
	args := globalArgs(ctx)
	if keep && !ctx.GlobalBool("debug") {
		args = append(args, "--debug")
	}
	args = append(args, "run", "--bundle", bundle)
	if keep {
		args = append(args, "--keep")
	}
	cmd := exec.Command(self, append(args, id)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	// Its own process group: a Ctrl-C reaches the build once, through us.
	// No PDEATHSIG: if boxbuild dies, run still deletes the container.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return runForwardingSignals(cmd)
}
