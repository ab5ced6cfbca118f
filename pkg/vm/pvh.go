package vm

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"debug/elf"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/google/renameio/v2"
	"github.com/klauspost/compress/zstd"

	"github.com/kiwi-shim/kiwi-shim/pkg/cacheuse"
)

// An x86 kernel image (bzImage) carries the kernel compressed and
// decompresses itself at boot: under TCG that is emulated code, seconds
// for Debian's XZ-compressed 6.1. The kernel inside is an ELF file with a
// PVH entry point (CONFIG_PVH, set in Debian's kernels), which QEMU boots
// directly when -kernel names it. So the VM boots that ELF file, unpacked
// on the host once per kernel and kept in the cache.

// PVHCacheSubdir is the directory under the cache directory that holds
// the unpacked kernels. They are derived: kiwi-shim gc removes the ones no
// container has used for a while (see package cacheuse).
const PVHCacheSubdir = "kernels-pvh"

// maxKernelELF bounds an unpacked kernel (Debian's are about 60 MiB).
const maxKernelELF = 512 << 20

// bzImage header fields (Documentation/arch/x86/boot.rst).
const (
	bzSetupSects    = 0x1f1 // setup sectors after the boot sector (0: 4)
	bzMagic         = 0x202 // "HdrS"
	bzVersion       = 0x206 // boot protocol version
	bzPayloadOffset = 0x248 // the compressed kernel, after the setup code
	bzPayloadLength = 0x24c
)

// xenElfnotePhys32Entry is the ELF note (owner "Xen") that names a
// kernel's 32-bit PVH entry point.
const xenElfnotePhys32Entry = 18

// BootImage returns the file QEMU boots for kernel image on arch: for
// x86_64, the kernel's own ELF file when image is a bzImage whose kernel
// has a PVH entry point, unpacked into cacheDir once (UnpackPVH); image
// itself otherwise, and whenever unpacking fails (the reason is returned
// beside it, for the log).
func BootImage(image, arch, cacheDir string) (string, error) {
	if arch != "x86_64" {
		return image, nil
	}
	p, err := UnpackPVH(image, cacheDir)
	if err != nil {
		return image, err
	}
	return p, nil
}

// UnpackPVH unpacks the kernel ELF file from the bzImage at image into
// cacheDir (named by the image's path, size and modification time, so a
// replaced image is unpacked again) and returns its path; a file already
// there is used as it is. It fails for an image that is no bzImage, a
// payload compressed in a way it does not read (XZ, zstd and gzip are
// read: Debian uses XZ for 6.1 and zstd for 6.12), or a kernel without a
// PVH entry point.
func UnpackPVH(image, cacheDir string) (string, error) {
	fi, err := os.Stat(image)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(fmt.Appendf(nil, "%s\x00%d\x00%d", image, fi.Size(), fi.ModTime().UnixNano()))
	dir := filepath.Join(cacheDir, PVHCacheSubdir)
	out := filepath.Join(dir, hex.EncodeToString(sum[:16])+".elf")
	if cacheuse.Hit(out, time.Now()) {
		return out, nil
	}
	raw, err := os.ReadFile(image)
	if err != nil {
		return "", err
	}
	kernel, err := unpackBzImage(raw)
	if err != nil {
		return "", fmt.Errorf("%s: %w", image, err)
	}
	if err := checkPVH(kernel); err != nil {
		return "", fmt.Errorf("%s: %w", image, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("kernel cache: %w", err)
	}
	// Concurrent unpackers write the same bytes; the rename is atomic.
	if err := renameio.WriteFile(out, kernel, 0o644, renameio.IgnoreUmask()); err != nil {
		return "", fmt.Errorf("kernel cache: %w", err)
	}
	return out, nil
}

// unpackBzImage returns the kernel ELF file inside a bzImage.
func unpackBzImage(b []byte) ([]byte, error) {
	if len(b) < bzPayloadLength+4 || string(b[bzMagic:bzMagic+4]) != "HdrS" {
		return nil, errors.New("not a bzImage")
	}
	le := binary.LittleEndian
	if le.Uint16(b[bzVersion:]) < 0x208 {
		return nil, errors.New("bzImage boot protocol before 2.08 (no payload fields)")
	}
	setup := int(b[bzSetupSects])
	if setup == 0 {
		setup = 4
	}
	start := uint64(setup+1)*512 + uint64(le.Uint32(b[bzPayloadOffset:]))
	end := start + uint64(le.Uint32(b[bzPayloadLength:]))
	if end > uint64(len(b)) || start >= end {
		return nil, errors.New("bzImage payload outside the file")
	}
	payload := b[start:end]
	if len(payload) < 8 {
		return nil, errors.New("bzImage payload too short")
	}
	// The build appends the unpacked size to the compressed kernel: an
	// unpacked kernel of another size is cut short or wrong.
	size := int(le.Uint32(payload[len(payload)-4:]))
	var r io.Reader
	switch {
	case bytes.HasPrefix(payload, []byte("\xfd7zXZ\x00")):
		// The kernel's XZ stream uses the x86 BCJ filter, which the Go
		// XZ readers lack: xz (xz-utils, in every Debian) reads it.
		return unxz(payload, size)
	case bytes.HasPrefix(payload, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		zr, err := zstd.NewReader(bytes.NewReader(payload[:len(payload)-4]), zstd.WithDecoderMaxWindow(1<<31), zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, fmt.Errorf("zstd payload: %w", err)
		}
		defer zr.Close()
		r = zr
	case bytes.HasPrefix(payload, []byte{0x1f, 0x8b}):
		gr, err := gzip.NewReader(bytes.NewReader(payload))
		if err != nil {
			return nil, fmt.Errorf("gzip payload: %w", err)
		}
		gr.Multistream(false)
		r = gr
	default:
		return nil, fmt.Errorf("bzImage payload compressed in a way not read here (% x)", payload[:min(len(payload), 6)])
	}
	return readKernel(r, size)
}

// readKernel reads an unpacked kernel of size bytes from r, at most
// maxKernelELF: a payload that unpacks to another size is cut short or
// is not the image's kernel.
func readKernel(r io.Reader, size int) ([]byte, error) {
	var out bytes.Buffer
	n, err := io.Copy(&out, io.LimitReader(r, maxKernelELF+1))
	if n > maxKernelELF {
		return nil, fmt.Errorf("unpacked kernel larger than %d bytes", maxKernelELF)
	}
	if err != nil {
		return nil, fmt.Errorf("unpack bzImage payload: %w", err)
	}
	if out.Len() != size {
		return nil, fmt.Errorf("unpacked kernel has %d bytes, the image says %d", out.Len(), size)
	}
	return out.Bytes(), nil
}

// unxz decompresses an XZ stream of an unpacked size of size bytes with
// xz(1).
func unxz(payload []byte, size int) ([]byte, error) {
	cmd := exec.Command("xz", "--decompress", "--stdout", "--quiet", "--single-stream")
	cmd.Stdin = bytes.NewReader(payload)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("xz payload: %w", err)
	}
	out, rerr := readKernel(stdout, size)
	if rerr != nil {
		cmd.Process.Kill()
	}
	if err := cmd.Wait(); err != nil && rerr == nil {
		return nil, fmt.Errorf("xz payload: %w: %s", err, bytes.TrimSpace(stderr.Bytes()))
	}
	if rerr != nil {
		return nil, fmt.Errorf("xz payload: %w", rerr)
	}
	return out, nil
}

// checkPVH checks that kernel is an x86-64 ELF file with a PVH entry
// point note.
func checkPVH(kernel []byte) error {
	f, err := elf.NewFile(bytes.NewReader(kernel))
	if err != nil {
		return fmt.Errorf("unpacked kernel: %w", err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("unpacked kernel is for %s", f.Machine)
	}
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		notes, err := io.ReadAll(io.LimitReader(p.Open(), 1<<20))
		if err != nil {
			continue
		}
		if hasNote(notes, "Xen", xenElfnotePhys32Entry, f.ByteOrder) {
			return nil
		}
	}
	return errors.New("kernel has no PVH entry point (CONFIG_PVH)")
}

// hasNote reports whether an ELF note segment holds a note of owner name
// and type typ.
func hasNote(b []byte, name string, typ uint32, bo binary.ByteOrder) bool {
	align := func(n uint32) uint64 { return (uint64(n) + 3) &^ 3 }
	for len(b) >= 12 {
		nsz, dsz, t := bo.Uint32(b[0:]), bo.Uint32(b[4:]), bo.Uint32(b[8:])
		rest := uint64(len(b) - 12)
		if align(nsz) > rest || align(nsz)+align(dsz) > rest {
			return false
		}
		n := b[12 : 12+uint64(nsz)]
		if t == typ && string(bytes.TrimRight(n, "\x00")) == name {
			return true
		}
		b = b[12+align(nsz)+align(dsz):]
	}
	return false
}
