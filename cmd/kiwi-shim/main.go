// Command kiwi-shim is an OCI runtime that runs "kiwi box" containers in
// QEMU micro-VMs or, in container mode, through runc with leased loop
// devices. Its command line is runc's, so podman, conmon and containerd's
// runc shim can drive it; it adds tools for people (loop, check).
package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/hooks"
	"github.com/kiwi-shim/kiwi-shim/pkg/rootless"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// specVersion is the OCI runtime-spec version kiwi-shim implements.
const specVersion = "1.2.0"

func main() {
	// containerd runs the shim as containerd-shim-kiwi-v2; the shim then
	// starts its long-lived self through os.Executable (kiwi-shim) with
	// "-namespace NS -id ID -address ..." (containerd's runc shim
	// manager), which no kiwi-shim command line starts with.
	if filepath.Base(os.Args[0]) == ShimName || (len(os.Args) > 1 && os.Args[1] == "-namespace") {
		runShimV2()
		return
	}
	if len(os.Args) > 1 && os.Args[1] == hooks.RelayCommand {
		// A hook runc runs for a container-mode container (see
		// hooks.RelayHooks): Relay returns only on failure.
		fmt.Fprintln(os.Stderr, hooks.Relay(os.Args[2:], os.Stdin))
		os.Exit(1)
	}
	app := cli.NewApp()
	app.Name = "kiwi-shim"
	app.Usage = "OCI runtime that runs KIWI image builds in QEMU micro-VMs or as containers"
	app.Version = fmt.Sprintf("%s\nspec: %s", version, specVersion)
	app.Flags = []cli.Flag{
		cli.StringFlag{Name: "root", Value: defaultRoot, Usage: "directory for container state"},
		cli.StringFlag{Name: "log", Usage: "append log messages to this file instead of stderr"},
		cli.StringFlag{Name: "log-format", Value: "text", Usage: "log format: text or json"},
		cli.BoolFlag{Name: "debug", Usage: "log debug messages"},
		cli.StringFlag{Name: "config", Usage: "host configuration file (default $" + config.EnvConfig + " or " + config.DefaultPath + ")"},
		cli.BoolFlag{Name: "systemd-cgroup", Usage: "use systemd to manage cgroups (passed to the container runtime)"},
		cli.StringFlag{Name: "cgroup-manager", Usage: "cgroup manager: cgroupfs or systemd (accepted for compatibility)"},
		cli.StringFlag{Name: "criu", Hidden: true, Usage: "accepted for runc compatibility; checkpointing is not supported"},
		cli.BoolFlag{Name: "rootless", Hidden: true, Usage: "accepted for runc compatibility"},
	}
	app.Commands = []cli.Command{
		createCommand,
		startCommand,
		runCommand,
		stateCommand,
		killCommand,
		deleteCommand,
		execCommand,
		psCommand,
		listCommand,
		pauseCommand,
		resumeCommand,
		updateCommand,
		featuresCommand,
		specCommand,
		loopCommand,
		devicePluginCommand,
		checkCommand,
		setupCommand,
		boxbuildCommand,
		gcCommand,
		keeperCommand,
		vmMonitorCommand,
		vmExecCommand,
	}
	app.Before = func(ctx *cli.Context) error {
		switch f := ctx.GlobalString("log-format"); f {
		case "text", "json":
		default:
			return fmt.Errorf("--log-format %q: want text or json", f)
		}
		return nil
	}
	app.OnUsageError = usageError
	setUsageError(app.Commands)
	// Errors are reported once, in fatal, in the format the caller asked for.
	app.ExitErrHandler = func(*cli.Context, error) {}
	if err := app.Run(os.Args); err != nil {
		fatal(err)
	}
}

// usageError reports a bad flag in one line instead of the whole help.
func usageError(ctx *cli.Context, err error, _ bool) error {
	if name := ctx.Command.FullName(); name != "" {
		return fmt.Errorf("%s: %w (see --help)", name, err)
	}
	return fmt.Errorf("%w (see --help)", err)
}

func setUsageError(cmds []cli.Command) {
	for i := range cmds {
		cmds[i].OnUsageError = usageError
		setUsageError(cmds[i].Subcommands)
	}
}

// exitError makes the process exit with a given status without printing.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

// codedError is an error that wants a particular exit status.
type codedError struct {
	code int
	err  error
}

func (e codedError) Error() string { return e.err.Error() }
func (e codedError) Unwrap() error { return e.err }

// fatal reports err on stderr and, when --log was given, in the log in the
// format runc uses (callers like containerd's runc shim read the last error
// line of the log), then exits.
func fatal(err error) {
	var ee exitError
	if errors.As(err, &ee) {
		os.Exit(ee.code)
	}
	code := 1
	var ce codedError
	if errors.As(err, &ce) {
		code = ce.code
	}
	msg := strings.ReplaceAll(err.Error(), "\n", " ")
	fmt.Fprintln(os.Stderr, "kiwi-shim: "+msg)
	if logPath, format := globalLogTarget(); logPath != "" {
		if f, ferr := os.OpenFile(logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644); ferr == nil {
			newLogger(f, format, false).Error(msg)
			f.Close()
		}
	}
	os.Exit(code)
}

// globalLogTarget finds --log and --log-format among the global flags
// without the CLI context, for errors that happen before or during parsing.
func globalLogTarget() (path, format string) {
	format = "text"
	args := os.Args[1:]
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") {
			break // first command name: globals end here
		}
		name, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !hasVal && valuedGlobals[name] && i+1 < len(args) {
			i++
			val = args[i]
		}
		switch name {
		case "log":
			path = val
		case "log-format":
			format = val
		}
	}
	return path, format
}

// valuedGlobals are the global flags that take a value.
var valuedGlobals = map[string]bool{"root": true, "log": true, "log-format": true, "config": true, "cgroup-manager": true, "criu": true}

// newLogger writes runc-style records: json lines with level, msg and time,
// or logfmt text.
func newLogger(w io.Writer, format string, debug bool) *slog.Logger {
	level := slog.LevelInfo
	if debug {
		level = slog.LevelDebug
	}
	opts := &slog.HandlerOptions{
		Level: level,
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) > 0 {
				return a
			}
			switch a.Key {
			case slog.LevelKey:
				a.Value = slog.StringValue(strings.ToLower(a.Value.String()))
			case slog.TimeKey:
				a.Value = slog.StringValue(a.Value.Time().Format(time.RFC3339Nano))
			}
			return a
		},
	}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// env is what every command needs: configuration, logger and state root.
type env struct {
	cfg  config.Config
	log  *slog.Logger
	root string
	// rootless is set without real root (see package rootless);
	// rootlessErr says what such a user's environment lacks.
	rootless    bool
	rootlessErr error
	// closeLog closes the --log file.
	closeLog func()
}

func newEnv(ctx *cli.Context) (*env, error) {
	path, explicit := config.Path(ctx.GlobalString("config"))
	base, rootDir := config.Default(), ctx.GlobalString("root")
	rl := rootless.Detect()
	var rlErr error
	if rl {
		// An unprivileged user's state and caches are the user's own;
		// the host's configuration file is for root.
		dirs, err := rootless.UserDirs(os.LookupEnv, rootless.HomeDir())
		if err != nil {
			rlErr = err
		} else {
			base = config.DefaultRootless(dirs.Cache)
			if !ctx.GlobalIsSet("root") {
				rootDir = dirs.Runtime
			}
			if !explicit {
				path = dirs.Config
			}
		}
	}
	cfg, err := config.Load(path, explicit, base)
	if err != nil {
		return nil, err
	}
	// Absolute: the VM monitor works in its state directory.
	root, err := filepath.Abs(rootDir)
	if err != nil {
		return nil, fmt.Errorf("--root: %w", err)
	}
	e := &env{cfg: cfg, root: root, rootless: rl, rootlessErr: rlErr, closeLog: func() {}}
	var w io.Writer = os.Stderr
	if p := ctx.GlobalString("log"); p != "" {
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			return nil, fmt.Errorf("open log: %w", err)
		}
		w = f
		e.closeLog = func() { f.Close() }
	}
	e.log = newLogger(w, ctx.GlobalString("log-format"), ctx.GlobalBool("debug"))
	return e, nil
}

// withEnv adapts a command action that needs an env.
func withEnv(fn func(*cli.Context, *env) error) func(*cli.Context) error {
	return func(ctx *cli.Context) error {
		e, err := newEnv(ctx)
		if err != nil {
			return err
		}
		defer e.closeLog()
		return fn(ctx, e)
	}
}
