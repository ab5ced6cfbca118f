package main

import (
	"errors"
	"fmt"
	"os"
	"os/signal"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/urfave/cli"
	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/sharefs"
)

var mountCommand = cli.Command{
	Name:  "mount",
	Usage: "mount an export on the host through /dev/fuse, in the foreground until unmounted or signalled",
	Flags: append([]cli.Flag{
		cli.StringFlag{Name: "mountpoint", Usage: "where to mount"},
	}, exportFlags...),
	Action: func(ctx *cli.Context) error {
		src, o, err := exportOptions(ctx)
		if err != nil {
			return err
		}
		mnt := ctx.String("mountpoint")
		if mnt == "" {
			return errors.New("--mountpoint DIR is required")
		}
		log, closeLog, err := logger(ctx)
		if err != nil {
			return err
		}
		defer closeLog()
		raiseFileLimit()
		o.Passthrough = true
		root, err := sharefs.Root(src, o)
		if err != nil {
			return err
		}
		opts, err := sharefs.FSOptions(o)
		if err != nil {
			return err
		}
		opts.FsName = "kiwi-sharefs:" + src
		opts.Debug = ctx.GlobalBool("trace")
		// The kernel checks permissions against the modes and owners we
		// report, as for any local file system.
		// No device node or set-user-ID bit of the tree takes effect on
		// the host (go-fuse's default too, said here on purpose): with
		// --mapped the tree shows the nodes a guest made.
		opts.Options = append(opts.Options, "default_permissions", "nodev", "nosuid")
		if os.Geteuid() == 0 {
			opts.AllowOther = true
			opts.DirectMount = true
		}
		// fs.Mount, with the set-id bits cleared on unprivileged writes.
		server, err := fuse.NewServer(sharefs.KillPrivOnWrite(fs.NewNodeFS(root, opts)), mnt, &opts.MountOptions)
		if err != nil {
			return fmt.Errorf("mount %s on %s: %w", src, mnt, err)
		}
		go server.Serve()
		if err := server.WaitMount(); err != nil {
			return fmt.Errorf("mount %s on %s: %w", src, mnt, err)
		}
		log.Info("mounted", "source", src, "mountpoint", mnt, "read-only", o.ReadOnly, "cache", o.Cache)
		sigs := make(chan os.Signal, 2)
		signal.Notify(sigs, unix.SIGINT, unix.SIGTERM, unix.SIGHUP)
		go func() {
			for s := range sigs {
				log.Info("unmounting", "signal", s)
				if err := server.Unmount(); err != nil {
					// Busy: detach it, as umount -l would; the kernel
					// ends the connection when the last user leaves.
					log.Warn("unmount", "err", err)
					unix.Unmount(mnt, unix.MNT_DETACH)
				}
			}
		}()
		server.Wait()
		log.Info("unmounted", "mountpoint", mnt)
		return nil
	},
}
