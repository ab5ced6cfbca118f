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
		o.Share = "9p"
	case ctx.Bool("virtiofs-sharing"):
		o.Share = "virtiofs"
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

// boxArchive resolves --box.
func boxArchive(cacheDir, box string) (string, error) {
	p := box
	if !strings.ContainsRune(box, '/') {
		p = filepath.Join(cacheDir, "boxes", "kiwi-box-"+box+".oci.tar")
	}
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("box %s: %w (the default box is built by `make box`, i.e. contrib/box/build)", box, err)
	}
	return p, nil
}

func runBoxbuild(ctx *cli.Context, e *env) (int, error) {
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
	archivePath, err := boxArchive(e.cfg.CacheDir, ctx.String("box"))
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
	img, err := a.Unpack(context.Background(), rootfs)
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
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM, unix.SIGHUP)
	defer signal.Stop(sigs)
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start box: %w", err)
	}
	go func() {
		for s := range sigs {
			cmd.Process.Signal(s)
		}
	}()
	err = cmd.Wait()
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
		return 0, fmt.Errorf("box: %w", err)
	}
}
