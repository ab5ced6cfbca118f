// Package rootless tells whether kiwi-shim runs without real root (as an
// ordinary user, or as root of a user namespace such as rootless podman's)
// and where such a user's state and caches live.
package rootless

import (
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
)

// identityMap is /proc/self/uid_map in the initial user namespace.
const identityMap = "0 0 4294967295"

// Detect reports whether this process lacks real root: its effective uid
// is not 0, or it is uid 0 of a user namespace that does not map the whole
// uid range (rootless podman runs its OCI runtime that way).
func Detect() bool {
	if os.Geteuid() != 0 {
		return true
	}
	b, err := os.ReadFile("/proc/self/uid_map")
	if err != nil {
		return false
	}
	return !IsIdentityMap(string(b))
}

// IsIdentityMap reports whether a uid_map's text maps every id to itself.
func IsIdentityMap(uidMap string) bool {
	lines := strings.Split(strings.TrimSpace(uidMap), "\n")
	return len(lines) == 1 && strings.Join(strings.Fields(lines[0]), " ") == identityMap
}

// Dirs are an unprivileged user's places.
type Dirs struct {
	// Runtime is $XDG_RUNTIME_DIR/kiwi-shim: container state.
	Runtime string
	// Cache is $XDG_CACHE_HOME/kiwi-shim (default ~/.cache/kiwi-shim):
	// kernels, initramfs images, boxes, scratch disks, boxbuild's work.
	Cache string
	// Config is the user's configuration file,
	// $XDG_CONFIG_HOME/kiwi-shim/config.toml (default ~/.config/...).
	Config string
}

// HomeDir returns the home directory of the user this process acts for:
// $HOME, else the passwd entry of its uid on the host (rootless podman
// runs `start` and `delete` with an empty environment but
// XDG_RUNTIME_DIR, as root of its user namespace).
func HomeDir() string {
	if h := os.Getenv("HOME"); filepath.IsAbs(h) && os.Geteuid() != 0 {
		return h
	}
	uid := os.Getuid()
	if uid == 0 {
		b, err := os.ReadFile("/proc/self/uid_map")
		if err != nil {
			return os.Getenv("HOME")
		}
		host, ok := HostID(string(b), 0)
		if !ok {
			return os.Getenv("HOME")
		}
		uid = host
	}
	if u, err := user.LookupId(strconv.Itoa(uid)); err == nil && filepath.IsAbs(u.HomeDir) {
		return u.HomeDir
	}
	return os.Getenv("HOME")
}

// HostID returns the id outside the namespace that a uid_map maps the
// namespace's id to.
func HostID(uidMap string, id uint64) (int, bool) {
	for _, l := range strings.Split(uidMap, "\n") {
		f := strings.Fields(l)
		if len(f) != 3 {
			continue
		}
		in, err1 := strconv.ParseUint(f[0], 10, 32)
		out, err2 := strconv.ParseUint(f[1], 10, 32)
		n, err3 := strconv.ParseUint(f[2], 10, 32)
		if err1 == nil && err2 == nil && err3 == nil && id >= in && id < in+n {
			return int(out + id - in), true
		}
	}
	return 0, false
}

// UserDirs returns the user's directories from the environment given as
// a lookup function (os.LookupEnv) and the user's home directory.
func UserDirs(getenv func(string) (string, bool), home string) (Dirs, error) {
	run, ok := getenv("XDG_RUNTIME_DIR")
	if !ok || !filepath.IsAbs(run) {
		return Dirs{}, fmt.Errorf("XDG_RUNTIME_DIR is not set to an absolute path: rootless use keeps its state there (a login session sets it; or export XDG_RUNTIME_DIR=/run/user/$(id -u))")
	}
	xdg := func(name, fallback string) (string, error) {
		if v, ok := getenv(name); ok && filepath.IsAbs(v) {
			return v, nil
		}
		if !filepath.IsAbs(home) {
			return "", fmt.Errorf("neither %s nor a home directory is known: rootless use needs one", name)
		}
		return filepath.Join(home, fallback), nil
	}
	cache, err := xdg("XDG_CACHE_HOME", ".cache")
	if err != nil {
		return Dirs{}, err
	}
	conf, err := xdg("XDG_CONFIG_HOME", ".config")
	if err != nil {
		return Dirs{}, err
	}
	return Dirs{
		Runtime: filepath.Join(run, "kiwi-shim"),
		Cache:   filepath.Join(cache, "kiwi-shim"),
		Config:  filepath.Join(conf, "kiwi-shim", "config.toml"),
	}, nil
}

// CanChown reports whether this process may give files any owner in the
// ordinary id range: real root, or root of a user namespace that maps at
// least 65536 ids (rootless podman's, from /etc/subuid). Otherwise (an
// ordinary user, or a namespace mapping only that user) files it creates
// stay its own.
func CanChown() bool {
	if os.Geteuid() != 0 {
		return false
	}
	b, err := os.ReadFile("/proc/self/uid_map")
	if err != nil {
		return false
	}
	return MappedIDs(string(b)) >= 65536
}

// MappedIDs counts the ids a uid_map's text maps.
func MappedIDs(uidMap string) uint64 {
	var n uint64
	for _, l := range strings.Split(uidMap, "\n") {
		f := strings.Fields(l)
		if len(f) != 3 {
			continue
		}
		if c, err := strconv.ParseUint(f[2], 10, 32); err == nil {
			n += c
		}
	}
	return n
}
