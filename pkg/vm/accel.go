package vm

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

// Accel is the accelerator decision and why it was made.
type Accel struct {
	// Name is "kvm" or "tcg".
	Name string
	// Reason says why, for logs and `kiwi-shim check`.
	Reason string
}

// ChooseAccel resolves "auto", "kvm" or "tcg" for a guest of arch. KVM is
// used only when the guest has the host's architecture and a bounded
// probe proves it works: /dev/kvm existing is not enough (on hosts that
// are themselves VMs it may open but fail or hang on real guests).
func ChooseAccel(want, arch, qemu string) (Accel, error) {
	switch want {
	case "tcg":
		return Accel{"tcg", "configured"}, nil
	case "kvm", "auto":
	default:
		return Accel{}, fmt.Errorf("accel %q: want auto, kvm or tcg", want)
	}
	ok, why := probeKVM(arch, qemu)
	if ok {
		return Accel{"kvm", why}, nil
	}
	if want == "kvm" {
		return Accel{}, fmt.Errorf("accel = kvm, but KVM is not usable: %s (set vm.accel = \"auto\" or \"tcg\")", why)
	}
	return Accel{"tcg", "KVM not usable: " + why}, nil
}

func probeKVM(arch, qemu string) (bool, string) {
	if arch != HostArch() {
		return false, "the guest architecture differs from the host's"
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false, "cannot open /dev/kvm: " + err.Error()
	}
	f.Close()
	if arch == "x86_64" {
		b, _ := os.ReadFile("/proc/cpuinfo")
		if !bytes.Contains(b, []byte(" vmx")) && !bytes.Contains(b, []byte(" svm")) {
			return false, "the CPU has no vmx/svm flag (a paravirtual /dev/kvm cannot run ordinary guests)"
		}
	}
	// A bounded real start: QEMU with KVM and no guest must come up and
	// quit on its own.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, qemu, "-accel", "kvm", "-cpu", "host", "-machine", "none", "-nodefaults", "-nographic", "-S", "-monitor", "none", "-no-user-config", "-device", "help")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return false, "qemu -accel kvm failed: " + strings.TrimSpace(lastLine(string(out)))
	}
	return true, "probe passed"
}

func lastLine(s string) string {
	lines := splitLines(strings.TrimSpace(s))
	return lines[len(lines)-1]
}
