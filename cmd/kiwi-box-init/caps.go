package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/moby/sys/capability"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// execHelperName is argv[0] of kiwi-box-init re-executed to become a
// container process whose capabilities are limited: it drops the bounding
// set, changes its credentials, sets the other sets and no_new_privs, and
// executes the process, as runc's init does. Go's fork cannot do this
// between fork and exec.
const execHelperName = "kiwi-box-exec"

// execConfigFD is the helper's fd carrying its helperConfig.
const execConfigFD = 3

// execDoneFD is the helper's write end of a pipe that closes when it
// executes the process (close-on-exec) or ends: PID 1 waits for that.
const execDoneFD = 4

// execDoneTimeout bounds how long PID 1 waits for the helper to execute
// the process: below the monitor's 30 s wait for the start.
const execDoneTimeout = 20 * time.Second

// helperConfig is what the helper needs to become the process.
type helperConfig struct {
	Path            string                `json:"path"`
	Args            []string              `json:"args"`
	UID             uint32                `json:"uid"`
	GID             uint32                `json:"gid"`
	Groups          []uint32              `json:"groups,omitempty"`
	Capabilities    *vmproto.Capabilities `json:"capabilities,omitempty"`
	NoNewPrivileges bool                  `json:"noNewPrivileges,omitempty"`
	// Proc, for the first process of a PID namespace, asks for that
	// namespace's own /proc (the helper runs as its PID 1, in a mount
	// namespace of its own), with these paths masked and read-only.
	Proc *procPaths `json:"proc,omitempty"`
}

// procPaths are what a new /proc needs.
type procPaths struct {
	// mounted: the container mounts proc at /proc (else nothing to do).
	mounted  bool
	Masked   []string `json:"masked,omitempty"`
	Readonly []string `json:"readonly,omitempty"`
}

// procPathsOf picks the container's /proc mount and its masked and
// read-only paths from the configuration.
func procPathsOf(cfg *vmproto.Config) procPaths {
	var pp procPaths
	for _, m := range cfg.Mounts {
		pp.mounted = pp.mounted || m.Destination == "/proc" && m.Type == "proc"
	}
	under := func(p string) bool { return strings.HasPrefix(filepath.Clean(p), "/proc/") }
	for _, p := range cfg.MaskedPaths {
		if under(p) {
			pp.Masked = append(pp.Masked, p)
		}
	}
	for _, p := range cfg.ReadonlyPaths {
		if under(p) {
			pp.Readonly = append(pp.Readonly, p)
		}
	}
	return pp
}

// mountProc replaces /proc with a proc of this process's PID namespace,
// with the flags of the one there, and masks and protects pp's paths on
// it as setup did on the guest's (read-only ones first, as runc); the
// mounts listed after the old one are moved behind the new one. /proc
// is made private first: the mount namespace is a copy of the guest's,
// and nothing done here may propagate back to it.
func mountProc(pp *procPaths) error {
	var st unix.Statfs_t
	if err := unix.Statfs("/proc", &st); err != nil {
		return fmt.Errorf("/proc: %w", err)
	}
	// ST_RDONLY, ST_NOSUID, ST_NODEV and ST_NOEXEC are MS_'s values.
	flags := uintptr(st.Flags) & (unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC)
	mounts, err := mountinfo.GetMounts(nil)
	if err != nil {
		return err
	}
	if err := unix.Mount("", "/proc", "", unix.MS_PRIVATE|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("make /proc private: %w", err)
	}
	// The guest's /proc goes (with its masks), as runc's container has
	// only its own; if it cannot, the new one hides it.
	unix.Unmount("/proc", unix.MNT_DETACH)
	if err := unix.Mount("proc", "/proc", "proc", flags, ""); err != nil {
		return fmt.Errorf("mount the PID namespace's /proc: %w", err)
	}
	// In the spec's place in the mount table, as runc's (mountorder.go).
	// Only the order is at stake when every mount was put back.
	if err := reattach(mountsAfter(mounts, "/proc")); errors.Is(err, errOrderKept) {
		kernelLog("the container's /proc stays last in its mount table: %v", err)
	} else if err != nil {
		return fmt.Errorf("mount table order: %w", err)
	}
	for _, p := range pp.Readonly {
		if err := readonlyPath(p); err != nil {
			return fmt.Errorf("readonly path %s: %w", p, err)
		}
	}
	for _, p := range pp.Masked {
		if err := maskPath(p); err != nil {
			return fmt.Errorf("masked path %s: %w", p, err)
		}
	}
	return nil
}

func init() {
	if isExecHelper() {
		// capset changes the calling thread only: it and the exec must
		// run on the same thread.
		runtime.LockOSThread()
	}
}

func isExecHelper() bool { return len(os.Args) > 0 && os.Args[0] == execHelperName }

// execHelper runs the helper: it only returns (a status) if it fails.
func execHelper() int {
	// Not to be inherited by the process: its closing tells PID 1 that
	// the process runs.
	unix.CloseOnExec(execDoneFD)
	f := os.NewFile(execConfigFD, "exec-config")
	var hc helperConfig
	err := json.NewDecoder(io.LimitReader(f, vmproto.MaxPayload)).Decode(&hc)
	f.Close()
	if err == nil && hc.Proc != nil {
		// The working directory may lie on a mount that mountProc moves:
		// enter it again afterwards, on the mount as it is then.
		cwd, cwdErr := os.Getwd()
		err = mountProc(hc.Proc)
		if err == nil && cwdErr == nil {
			if cerr := os.Chdir(cwd); cerr != nil {
				err = fmt.Errorf("working directory %s: %w", cwd, cerr)
			}
		}
	}
	if err == nil {
		err = becomeProcess(&hc)
	}
	if err == nil {
		err = unix.Exec(hc.Path, hc.Args, os.Environ())
		err = fmt.Errorf("exec %s: %w", hc.Path, err)
	}
	fmt.Fprintf(os.Stderr, "kiwi-box-init: %v\n", err)
	if errors.Is(err, os.ErrPermission) {
		return 126
	}
	return 127
}

// becomeProcess applies hc's credentials and capabilities to this thread,
// in runc's order: bounding set (needs CAP_SETPCAP, so while still
// root), user and groups (keeping the permitted set), then the effective,
// permitted and inheritable sets, the ambient set and no_new_privs.
func becomeProcess(hc *helperConfig) error {
	var caps capability.Capabilities
	if hc.Capabilities != nil {
		var err error
		if caps, err = capability.NewPid2(0); err != nil {
			return fmt.Errorf("capabilities: %w", err)
		}
		if err := caps.Load(); err != nil {
			return fmt.Errorf("capabilities: %w", err)
		}
		c := hc.Capabilities
		caps.Clear(capability.BOUNDING)
		caps.Set(capability.BOUNDING, capList(c.Bounding)...)
		if err := caps.Apply(capability.BOUNDING); err != nil {
			return fmt.Errorf("bounding capabilities: %w", err)
		}
		if err := unix.Prctl(unix.PR_SET_KEEPCAPS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("keep capabilities: %w", err)
		}
	}
	if err := unix.Setgroups(groupsOf(hc.Groups)); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := unix.Setgid(int(hc.GID)); err != nil {
		return fmt.Errorf("setgid %d: %w", hc.GID, err)
	}
	if err := unix.Setuid(int(hc.UID)); err != nil {
		return fmt.Errorf("setuid %d: %w", hc.UID, err)
	}
	if caps != nil {
		c := hc.Capabilities
		caps.Clear(capability.CAPS | capability.AMBIENT)
		caps.Set(capability.EFFECTIVE, capList(c.Effective)...)
		caps.Set(capability.PERMITTED, capList(c.Permitted)...)
		caps.Set(capability.INHERITABLE, capList(c.Inheritable)...)
		caps.Set(capability.AMBIENT, capList(raisableAmbient(c))...)
		if err := caps.Apply(capability.CAPS); err != nil {
			return fmt.Errorf("capabilities: %w", err)
		}
		if err := caps.Apply(capability.AMBIENT); err != nil {
			return fmt.Errorf("ambient capabilities: %w", err)
		}
	}
	if hc.NoNewPrivileges {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("no_new_privs: %w", err)
		}
	}
	return nil
}

// raisableAmbient is the part of c's ambient set that the kernel lets a
// process raise: capabilities also in its permitted and inheritable sets.
// runc leaves the rest out without an error, and so does the box: the
// configuration that `runc spec` writes lists ambient capabilities and no
// inheritable ones, and runs under runc with an empty ambient set.
func raisableAmbient(c *vmproto.Capabilities) []string {
	var out []string
	for _, n := range c.Ambient {
		if slices.Contains(c.Permitted, n) && slices.Contains(c.Inheritable, n) {
			out = append(out, n)
		}
	}
	return out
}

func groupsOf(g []uint32) []int {
	out := make([]int, len(g))
	for i, v := range g {
		out[i] = int(v)
	}
	return out
}

// capList maps OCI capability names to the capabilities this kernel
// supports. Other names are left out, as runc does.
func capList(names []string) []capability.Cap {
	supported, err := capability.ListSupported()
	if err != nil {
		supported = capability.ListKnown()
	}
	var out []capability.Cap
	for _, n := range names {
		for _, c := range supported {
			if "CAP_"+strings.ToUpper(c.String()) == n {
				out = append(out, c)
			}
		}
	}
	return out
}
