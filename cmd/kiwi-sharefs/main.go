// Command kiwi-sharefs serves host directories to kiwi boxes: as
// virtio-fs devices for QEMU (vhost-user-fs, `serve`) and as host FUSE
// mounts (`mount`), both with the same confined tree (package sharefs).
package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"

	"github.com/urfave/cli"
	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/sharefs"
)

var version = "dev"

func main() {
	// Modes the client asks for are the modes files get.
	unix.Umask(0)
	app := cli.NewApp()
	app.Name = "kiwi-sharefs"
	app.Usage = "serve host directories to kiwi boxes (virtio-fs) and mount them on the host (FUSE)"
	app.Version = version
	app.Flags = []cli.Flag{
		cli.StringFlag{Name: "log", Usage: "log to FILE instead of stderr"},
		cli.BoolFlag{Name: "debug", Usage: "log every decision"},
		cli.BoolFlag{Name: "trace", Usage: "log every FUSE request and vhost-user message"},
	}
	app.Commands = []cli.Command{mountCommand, serveCommand}
	if err := app.Run(os.Args); err != nil {
		var ee exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		fmt.Fprintf(os.Stderr, "kiwi-sharefs: %v\n", err)
		os.Exit(1)
	}
}

// exitError exits with a status without printing.
type exitError struct{ code int }

func (e exitError) Error() string { return "exit status " + strconv.Itoa(e.code) }

// exportFlags are the flags every command takes to describe an export.
var exportFlags = []cli.Flag{
	cli.StringFlag{Name: "source", Usage: "the host directory to export"},
	cli.BoolFlag{Name: "read-only", Usage: "refuse every change (EROFS)"},
	cli.StringFlag{Name: "cache", Value: sharefs.CacheAuto, Usage: "client caching: auto, always, metadata (no file data) or never"},
	cli.BoolFlag{Name: "xattr", Usage: "serve extended attributes"},
	cli.BoolFlag{Name: "mapped", Usage: "keep the client's device nodes, FIFOs, sockets and set-id bits in an extended attribute of a plain file (like 9p's mapped-xattr) instead of refusing devices"},
	cli.StringSliceFlag{Name: "uid-map", Usage: "CLIENT:HOST:COUNT uid mapping (repeatable; default identity, or the daemon's user when not root)"},
	cli.StringSliceFlag{Name: "gid-map", Usage: "CLIENT:HOST:COUNT gid mapping (repeatable)"},
}

func exportOptions(ctx *cli.Context) (string, sharefs.Options, error) {
	o := sharefs.Options{
		ReadOnly: ctx.Bool("read-only"), Xattr: ctx.Bool("xattr"), Cache: ctx.String("cache"), Mapped: ctx.Bool("mapped"),
		// Not root: files can only belong to the daemon's user.
		Squash: os.Geteuid() != 0,
	}
	src := ctx.String("source")
	if src == "" {
		return "", o, errors.New("--source DIR is required")
	}
	var err error
	if o.UIDMap, err = parseIDMaps(ctx.StringSlice("uid-map")); err != nil {
		return "", o, fmt.Errorf("--uid-map: %w", err)
	}
	if o.GIDMap, err = parseIDMaps(ctx.StringSlice("gid-map")); err != nil {
		return "", o, fmt.Errorf("--gid-map: %w", err)
	}
	return src, o, nil
}

func parseIDMaps(ss []string) ([]sharefs.IDMap, error) {
	var out []sharefs.IDMap
	for _, s := range ss {
		f := strings.Split(s, ":")
		if len(f) != 3 {
			return nil, fmt.Errorf("%q: want CLIENT:HOST:COUNT", s)
		}
		var v [3]uint32
		for i, x := range f {
			n, err := strconv.ParseUint(x, 10, 32)
			if err != nil {
				return nil, fmt.Errorf("%q: %w", s, err)
			}
			v[i] = uint32(n)
		}
		if v[2] == 0 || uint64(v[0])+uint64(v[2]) > 1<<32 || uint64(v[1])+uint64(v[2]) > 1<<32 {
			return nil, fmt.Errorf("%q: empty or overflowing range", s)
		}
		out = append(out, sharefs.IDMap{Client: v[0], Host: v[1], Size: v[2]})
	}
	return out, nil
}

func logger(ctx *cli.Context) (*slog.Logger, func(), error) {
	var w io.Writer = os.Stderr
	closer := func() {}
	if p := ctx.GlobalString("log"); p != "" {
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			return nil, nil, err
		}
		w, closer = f, func() { f.Close() }
	}
	level := slog.LevelInfo
	if ctx.GlobalBool("debug") || ctx.GlobalBool("trace") {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level})), closer, nil
}
