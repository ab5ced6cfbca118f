// Package sysbin finds the system binaries kiwi-shim drives (runc, crun,
// qemu-system-*): in PATH first, then in the usual system directories,
// because the PATH that podman's cleanup process and conmon hand down
// often lacks the sbin directories.
package sysbin

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

var dirs = []string{"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"}

// Find returns the path of the executable name.
func Find(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range dirs {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found in PATH or %v", name, dirs)
}
