// Package guestarch decides the architecture of a VM-mode container's
// guest: the io.kiwi-shim.vm.arch annotation when set, else the machine
// of the container's entrypoint binary (its ELF header, following one
// "#!" interpreter), else the host's. So `podman run --arch arm64 IMAGE`
// or an arm64 root file system needs no annotation.
//
// Architecture names are the kernel's (uname -m): x86_64, aarch64, s390x,
// ppc64le, riscv64.
package guestarch

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"

	"golang.org/x/sys/unix"
)

// Normalize maps the names users write (GOARCH and Debian's, or the
// kernel's) to the kernel's. It returns "" for an unknown name.
func Normalize(name string) string {
	switch strings.ToLower(name) {
	case "x86_64", "amd64":
		return "x86_64"
	case "aarch64", "arm64":
		return "aarch64"
	case "s390x":
		return "s390x"
	case "ppc64le", "ppc64el":
		return "ppc64le"
	case "riscv64":
		return "riscv64"
	}
	return ""
}

// ELF machine numbers (elf.h).
const (
	emS390    = 22
	emPPC64   = 21
	emX86_64  = 62
	emAArch64 = 183
	emRISCV   = 243
)

// headerSize is all of the ELF header this package reads: e_ident (16),
// e_type (2), e_machine (2).
const headerSize = 20

// ErrNotELF is returned for a file that is neither an ELF binary nor a
// script.
var ErrNotELF = errors.New("not an ELF binary")

// FromELFHeader returns the architecture of an ELF file from its first
// bytes. It never reads more than the header.
func FromELFHeader(h []byte) (string, error) {
	if len(h) < headerSize || !bytes.HasPrefix(h, []byte("\x7fELF")) {
		return "", ErrNotELF
	}
	var order binary.ByteOrder
	switch h[5] { // EI_DATA
	case 1:
		order = binary.LittleEndian
	case 2:
		order = binary.BigEndian
	default:
		return "", fmt.Errorf("ELF data encoding %d: %w", h[5], ErrNotELF)
	}
	class64 := h[4] == 2 // EI_CLASS
	switch m := order.Uint16(h[18:20]); {
	case m == emX86_64 && class64:
		return "x86_64", nil
	case m == emAArch64 && class64:
		return "aarch64", nil
	case m == emS390 && class64:
		return "s390x", nil
	case m == emPPC64 && class64 && order == binary.LittleEndian:
		return "ppc64le", nil
	case m == emRISCV && class64:
		return "riscv64", nil
	default:
		return "", fmt.Errorf("ELF machine %d (64-bit %v) is not a supported guest architecture", m, class64)
	}
}

// maxScriptLine bounds the "#!" line read from a script.
const maxScriptLine = 256

// FromRootfs returns the architecture of the program argv0 in the root
// file system rootfs, looked up like execve would with the PATH in env
// (a name without "/") or relative to cwd. Lookups stay inside rootfs:
// symbolic links resolve against it (openat2 RESOLVE_IN_ROOT). A script's
// interpreter is followed once.
func FromRootfs(rootfs, argv0, cwd string, env []string) (string, error) {
	root, err := unix.Open(rootfs, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("open rootfs %s: %w", rootfs, err)
	}
	defer unix.Close(root)
	prog := argv0
	for hop := 0; hop < 2; hop++ {
		h, err := readHead(root, prog, cwd, env)
		if err != nil {
			return "", err
		}
		if interp, ok := interpreter(h); ok && hop == 0 {
			prog = interp
			continue
		}
		return FromELFHeader(h)
	}
	return "", fmt.Errorf("%s: script interpreter is a script too", argv0)
}

// readHead reads the first bytes of prog, found in the container's PATH.
func readHead(root int, prog, cwd string, env []string) ([]byte, error) {
	var cands []string
	switch {
	case prog == "":
		return nil, errors.New("no program to inspect")
	case strings.Contains(prog, "/"):
		if !path.IsAbs(prog) {
			prog = path.Join("/", cwd, prog)
		}
		cands = []string{prog}
	default:
		for _, dir := range strings.Split(pathEnv(env), ":") {
			if dir != "" {
				cands = append(cands, path.Join("/", dir, prog))
			}
		}
	}
	var lastErr error = fmt.Errorf("%s: not found in the container's PATH", prog)
	for _, c := range cands {
		// O_PATH first: the root file system is untrusted, and opening
		// a device node (or a FIFO) for reading has side effects.
		pfd, err := unix.Openat2(root, strings.TrimPrefix(c, "/"), &unix.OpenHow{
			Flags:   unix.O_PATH | unix.O_CLOEXEC,
			Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
		})
		if err != nil {
			if !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENOTDIR) {
				lastErr = fmt.Errorf("open %s in the root file system: %w", c, err)
			}
			continue
		}
		var st unix.Stat_t
		if err := unix.Fstat(pfd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
			unix.Close(pfd)
			continue
		}
		fd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", pfd), unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOCTTY|unix.O_NONBLOCK, 0)
		unix.Close(pfd)
		if err != nil {
			lastErr = fmt.Errorf("open %s in the root file system: %w", c, err)
			continue
		}
		f := os.NewFile(uintptr(fd), c)
		buf := make([]byte, maxScriptLine)
		n, err := io.ReadFull(f, buf)
		f.Close()
		if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("read %s: %w", c, err)
		}
		return buf[:n], nil
	}
	return nil, lastErr
}

// interpreter returns the program of a "#!" line.
func interpreter(h []byte) (string, bool) {
	rest, ok := bytes.CutPrefix(h, []byte("#!"))
	if !ok {
		return "", false
	}
	if i := bytes.IndexByte(rest, '\n'); i >= 0 {
		rest = rest[:i]
	}
	fields := strings.Fields(string(rest))
	if len(fields) == 0 || !strings.HasPrefix(fields[0], "/") {
		return "", false
	}
	return fields[0], true
}

// defaultPath is what runc-style runtimes assume when env has no PATH.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

func pathEnv(env []string) string {
	for _, e := range env {
		if v, ok := strings.CutPrefix(e, "PATH="); ok {
			return v
		}
	}
	return defaultPath
}
