package boxbuild

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
)

// KIWI's options, from `kiwi-ng --help` and `kiwi-ng system build --help`
// (KIWI 9.24). Global options must precede `system build`; boxbuild
// accepts them after `--` as well and moves them there.
var (
	globalValued = map[string]bool{
		"--config": true, "--logfile": true, "--logsocket": true, "--loglevel": true,
		"--profile": true, "--shared-cache-dir": true, "--temp-dir": true, "--type": true,
		"--kiwi-file": true, "--target-arch": true,
	}
	globalFlags = map[string]bool{"--color-output": true, "--debug": true, "--debug-run-scripts-in-screen": true}
	buildValued = map[string]bool{
		"--add-bootstrap-package": true, "--add-package": true, "--add-repo": true,
		"--add-repo-credentials": true, "--delete-package": true, "--description": true,
		"--set-container-derived-from": true, "--set-container-tag": true, "--add-container-label": true,
		"--set-repo": true, "--set-repo-credentials": true, "--signing-key": true, "--target-dir": true,
	}
)

// KiwiArgs is a parsed KIWI command line.
type KiwiArgs struct {
	// Global are KIWI's global options, in their order.
	Global []string
	// Build are `system build`'s options without --description and
	// --target-dir.
	Build []string
	// Description and TargetDir are absolute host paths.
	Description, TargetDir string
	// TempDir is set when the command line chose --temp-dir.
	TempDir string
}

// ParseKiwiArgs splits the arguments given after `--`. Relative
// --description and --target-dir are made absolute against cwd.
func ParseKiwiArgs(args []string, cwd string) (KiwiArgs, error) {
	var k KiwiArgs
	for i := 0; i < len(args); i++ {
		a := args[i]
		name, value, hasValue := strings.Cut(a, "=")
		valued := globalValued[name] || buildValued[name]
		if valued && !hasValue {
			if i+1 >= len(args) {
				return k, fmt.Errorf("KIWI option %s needs a value", name)
			}
			i++
			value = args[i]
		}
		switch {
		case name == "--description":
			k.Description = value
		case name == "--target-dir":
			k.TargetDir = value
		case globalValued[name]:
			if name == "--temp-dir" {
				k.TempDir = value
			}
			k.Global = append(k.Global, name+"="+value)
		case globalFlags[name] && !hasValue:
			k.Global = append(k.Global, a)
		case buildValued[name]:
			k.Build = append(k.Build, name+"="+value)
		default:
			// Other `system build` options (--allow-existing-root,
			// --clear-cache, ...): KIWI itself rejects unknown ones.
			k.Build = append(k.Build, a)
		}
	}
	if k.Description == "" || k.TargetDir == "" {
		return k, errors.New("KIWI needs --description DIR and --target-dir DIR after --")
	}
	for _, p := range []*string{&k.Description, &k.TargetDir} {
		if !filepath.IsAbs(*p) {
			*p = filepath.Join(cwd, *p)
		}
		*p = filepath.Clean(*p)
	}
	if k.TargetDir == "/" || k.Description == "/" {
		return k, errors.New("--description and --target-dir must not be the root directory")
	}
	return k, nil
}
