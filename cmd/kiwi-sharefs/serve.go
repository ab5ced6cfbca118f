package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sync"

	"github.com/urfave/cli"
	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmshare"
)

var serveCommand = cli.Command{
	Name:  "serve",
	Usage: "serve exports to QEMU as vhost-user-fs devices until QEMU disconnects",
	Description: `One export: --source DIR --socket PATH [--tag T] and the export flags.
   Several (one daemon per VM): --exports FILE, a JSON list of
   {"tag", "source", "socket", "options": {"ReadOnly", "Xattr", "Squash",
   "UIDMap", "GIDMap", "Cache", "Mapped"}}.

   The sockets exist when the daemon prints "ready" on stdout (or, with
   --ready-fd N, writes it to descriptor N); start QEMU after that. The
   daemon exits 0 once every QEMU connection closed (guest powered off),
   and on SIGTERM or SIGINT.`,
	Flags: append([]cli.Flag{
		cli.StringFlag{Name: "socket", Usage: "the vhost-user socket QEMU connects to"},
		cli.StringFlag{Name: "tag", Usage: "the virtio-fs tag (for the log; QEMU's -device sets it)"},
		cli.StringFlag{Name: "exports", Usage: "serve the exports listed in this JSON file"},
		cli.IntFlag{Name: "ready-fd", Value: -1, Usage: "write \"ready\" to this descriptor instead of stdout"},
	}, exportFlags...),
	Action: func(ctx *cli.Context) error {
		exports, err := serveExports(ctx)
		if err != nil {
			return err
		}
		log, closeLog, err := logger(ctx)
		if err != nil {
			return err
		}
		defer closeLog()
		raiseFileLimit()
		var listeners []*net.UnixListener
		for _, e := range exports {
			l, err := vmshare.Listen(e)
			if err != nil {
				for _, l := range listeners {
					l.Close()
				}
				return err
			}
			listeners = append(listeners, l)
		}
		readyOut := os.Stdout
		if fd := ctx.Int("ready-fd"); fd >= 0 {
			readyOut = os.NewFile(uintptr(fd), "ready")
		}
		fmt.Fprintln(readyOut, "ready")
		if readyOut != os.Stdout {
			readyOut.Close()
		}

		c, cancel := signal.NotifyContext(context.Background(), unix.SIGTERM, unix.SIGINT, unix.SIGHUP)
		defer cancel()
		var wg sync.WaitGroup
		errs := make([]error, len(exports))
		for i, e := range exports {
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer os.Remove(e.Socket)
				errs[i] = vmshare.Serve(c, listeners[i], e, log.With("tag", e.Tag), ctx.GlobalBool("trace"))
			}()
		}
		wg.Wait()
		err = errors.Join(errs...)
		if errors.Is(err, context.Canceled) {
			log.Info("stopped by signal")
			return nil
		}
		return err
	},
}

func serveExports(ctx *cli.Context) ([]vmshare.Export, error) {
	if p := ctx.String("exports"); p != "" {
		if ctx.String("source") != "" || ctx.String("socket") != "" {
			return nil, errors.New("--exports excludes --source and --socket")
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		var exports []vmshare.Export
		if err := json.Unmarshal(b, &exports); err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		if len(exports) == 0 {
			return nil, fmt.Errorf("%s: no exports", p)
		}
		for _, e := range exports {
			if e.Source == "" || e.Socket == "" {
				return nil, fmt.Errorf("%s: export %q needs a source and a socket", p, e.Tag)
			}
		}
		return exports, nil
	}
	src, o, err := exportOptions(ctx)
	if err != nil {
		return nil, err
	}
	sock := ctx.String("socket")
	if sock == "" {
		return nil, errors.New("--socket PATH is required")
	}
	return []vmshare.Export{{Tag: ctx.String("tag"), Source: src, Socket: sock, Options: o}}, nil
}

// raiseFileLimit lifts the soft descriptor limit to the hard one: every
// directory a guest holds is an open descriptor.
func raiseFileLimit() {
	var rl unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &rl) == nil && rl.Cur < rl.Max {
		rl.Cur = rl.Max
		unix.Setrlimit(unix.RLIMIT_NOFILE, &rl)
	}
}
