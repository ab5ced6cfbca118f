package vm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/kiwi-shim/kiwi-shim/pkg/sysbin"
)

// ScratchSerial is the virtio-blk serial of the scratch disk; the guest
// finds the disk by it.
const ScratchSerial = "kiwi-scratch"

// CreateScratch makes a sparse scratch image of size bytes in dir and
// formats it as ext4, so that the guest only has to mount it. The name
// starts with id for whoever looks at the directory; the caller removes
// the file when the container is deleted.
//
// The file system is made on the host: the guest's initramfs carries only
// kiwi-box-init, and a box image need not contain mkfs. Formatting a
// fresh sparse file writes a few MiB of metadata and reads nothing back.
// The file system has no journal: its content does not outlive the box.
func CreateScratch(ctx context.Context, dir, id string, size int64) (path string, err error) {
	mkfs, err := sysbin.Find("mkfs.ext4")
	if err != nil {
		return "", fmt.Errorf("scratch disk: %w (apt-get install e2fsprogs)", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("scratch disk: %w", err)
	}
	f, err := os.CreateTemp(dir, id+"-*.img")
	if err != nil {
		return "", fmt.Errorf("scratch disk: %w", err)
	}
	path = f.Name()
	defer func() {
		if err != nil {
			os.Remove(path)
		}
	}()
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", fmt.Errorf("scratch disk %s: %w", path, err)
	}
	cmd := exec.CommandContext(ctx, mkfs, "-q", "-F", "-m", "0", "-L", ScratchSerial,
		"-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard", path)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("scratch disk: %s %s: %w: %s", filepath.Base(mkfs), path, err, strings.TrimSpace(string(out)))
	}
	return path, nil
}
