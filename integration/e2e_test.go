//go:build e2e

package integration

import (
	"bytes"
	"context"
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// bootMarker is what the bootable description's first-boot unit prints.
const bootMarker = "KIWI_BOOT_MARKER_OK"

// TestE2EBootable: the bootable description (grub2 BIOS, dracut, systemd)
// built with `kiwi-shim boxbuild` in VM mode, then booted with plain QEMU
// until its first-boot unit prints the marker and powers off.
func TestE2EBootable(t *testing.T) {
	ensureBox(t)
	guestRelease(t)
	out := filepath.Join(t.TempDir(), "target")
	r := boxbuild(t, "--box-memory", "4G", "--", "--description", renderDescription(t, "bookworm-bootable", nil), "--target-dir", out)
	if r.code != 0 {
		log, _ := os.ReadFile(filepath.Join(out, "build", "image-root.log"))
		t.Fatalf("boxbuild exit %d\n%s\n%s\nKIWI log tail:\n%s", r.code, tailLines(r.stdout, 20), tailLines(r.stderr, 20), tailLines(string(log), 30))
	}
	images, _ := filepath.Glob(filepath.Join(out, "*.raw"))
	if len(images) != 1 {
		t.Fatalf("want one .raw image, got %v", images)
	}
	noVMLeft(t)
	console := filepath.Join(t.TempDir(), "console.log")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-nographic",
		"-nodefaults", "-no-reboot", "-snapshot", "-serial", "file:"+console,
		"-drive", "file="+images[0]+",format=raw,if=virtio")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("qemu: %v\n%s", err, out)
	}
	log, _ := os.ReadFile(console)
	if !bytes.Contains(log, []byte(bootMarker)) {
		t.Fatalf("the image booted without printing %s; console tail:\n%s", bootMarker, tailLines(string(log), 40))
	}
	t.Logf("booted to the marker and powered off in %s", time.Since(start).Round(time.Second))
}

// TestE2EOEMArm64: the oem description built for aarch64 in VM mode on
// this x86_64 host: `kiwi-shim boxbuild --aarch64` boots the arm64 box
// (contrib/box/build --arch arm64) under qemu-system-aarch64 TCG. The
// image's programs are aarch64 ELF. aarch64 takes EFI firmware, so the
// description's BIOS firmware becomes EFI (a GPT with an ESP before the
// root partition) and its overlay gets the /boot/efi KIWI copies into it.
func TestE2EOEMArm64(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("cross-architecture build from an x86_64 host; this host is " + runtime.GOARCH)
	}
	ensureBox(t, "--arch", "arm64")
	out := filepath.Join(t.TempDir(), "target")
	desc := renderDescription(t, "bookworm-oem", func(s string) string {
		return strings.Replace(s, `firmware="bios"`, `firmware="efi"`, 1)
	})
	// KIWI syncs the image's /boot/efi into the ESP; with the custom
	// boot loader no package makes it, so the description's overlay does.
	if err := os.MkdirAll(filepath.Join(desc, "root", "boot", "efi"), 0o755); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	r := boxbuild(t, "--aarch64", "--box-memory", "4G", "--", "--description", desc, "--target-dir", out)
	if r.code != 0 {
		log, _ := os.ReadFile(filepath.Join(out, "build", "image-root.log"))
		t.Fatalf("boxbuild exit %d\n%s\n%s\nKIWI log tail:\n%s", r.code, tailLines(r.stdout, 20), tailLines(r.stderr, 20), tailLines(string(log), 30))
	}
	t.Logf("aarch64 oem build in VM mode (TCG): %s", time.Since(start).Round(time.Second))
	checkImageArch(t, out, elf.EM_AARCH64)
}
