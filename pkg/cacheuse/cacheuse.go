// Package cacheuse keeps track of when derived cache files were last used,
// so that files no configuration asks for any more (the initramfs of an
// old init binary, the unpacked ELF file of a replaced kernel) can be
// removed after a while instead of piling up.
//
// A file's modification time is its last use: Hit moves it forward,
// at most once per UpdateInterval so that a busy host does not write an
// inode on every container start, and Unused lists the files whose last
// use is older than a given age. Go's build cache trims itself the same
// way. The files are derived (remade in about a second from what the
// cache keeps otherwise), so a file removed just as a create picked it
// costs that create one error and the next one a rebuild.
package cacheuse

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// UpdateInterval is how stale a file's mark may get before Hit renews it.
const UpdateInterval = time.Hour

// Hit reports whether the cache file at path exists, and marks it used
// now if its mark is older than UpdateInterval. A mark that cannot be
// renewed (a read-only cache) does not make the file unusable.
func Hit(path string, now time.Time) bool {
	fi, err := os.Stat(path)
	if err != nil || !fi.Mode().IsRegular() {
		return false
	}
	if now.Sub(fi.ModTime()) >= UpdateInterval {
		_ = os.Chtimes(path, now, now)
	}
	return true
}

// Unused lists the regular files directly in dir whose last use is at
// least maxAge before now, in directory order. A missing dir has none.
func Unused(dir string, maxAge time.Duration, now time.Time) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("cache %s: %w", dir, err)
	}
	var out []string
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			continue // removed meanwhile
		}
		if now.Sub(fi.ModTime()) >= maxAge {
			out = append(out, filepath.Join(dir, e.Name()))
		}
	}
	return out, nil
}
