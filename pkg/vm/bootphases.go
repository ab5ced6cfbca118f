package vm

import (
	"encoding/json"
	"os"
	"path/filepath"
	"time"

	"github.com/kiwi-shim/kiwi-shim/pkg/vmproto"
)

// bootFile in a box's state directory holds its BootPhases once the
// guest is ready (read by make bench; gone with the box).
const bootFile = "boot.json"

// BootPhases is where a box's start went, from the host's clock at QEMU's
// start, the guest's Hello and its Ready, and the guest's own readings
// (vmproto.BootTimes). The guest's clock starts with its kernel's
// timekeeping, so QEMU is what the host saw before it: QEMU's own start,
// the firmware and loading the kernel and initramfs.
type BootPhases struct {
	QEMU    time.Duration `json:"qemu"`    // QEMU start to the guest kernel's clock start
	Kernel  time.Duration `json:"kernel"`  // the kernel's boot, to kiwi-box-init
	Modules time.Duration `json:"modules"` // loading the box's modules
	Port    time.Duration `json:"port"`    // opening the control port, to Hello
	Config  time.Duration `json:"config"`  // Hello to the configuration's arrival (the host's turn)
	Mounts  time.Duration `json:"mounts"`  // the container's root and mounts
	Setup   time.Duration `json:"setup"`   // network, DNS, rlimits, the program's check
	Total   time.Duration `json:"total"`   // QEMU start to Ready, by the host's clock
	// Restore, for a box restored from a template, is QEMU's start to
	// the restored guest's continuation (load and device attachment);
	// the guest's own phases up to Hello are then the template's and
	// zero here.
	Restore time.Duration `json:"restore,omitempty"`
	// RestoreLoad is the part of Restore up to the guest's load from
	// the template (QEMU's start, its connections and the load); the
	// rest is the device attachment.
	RestoreLoad time.Duration `json:"restoreLoad,omitempty"`
	// RestoreRAM is the copy of the template's RAM into the box's own
	// memory, before QEMU's start (so not part of Total).
	RestoreRAM time.Duration `json:"restoreRAM,omitempty"`
	// Start is `start` to the guest's report that the process runs
	// (filled in later; zero until then).
	Start time.Duration `json:"start,omitempty"`
}

// bootPhases combines the host's readings (QEMU started, Hello and Ready
// received) with the guest's. A step the guest did not measure, or that
// the two clocks disagree on, comes out as zero rather than negative.
func bootPhases(qemuStart, helloAt, readyAt time.Time, hello, ready vmproto.BootTimes) BootPhases {
	span := func(from, to int64) time.Duration {
		if from <= 0 || to < from {
			return 0
		}
		return time.Duration(to - from)
	}
	pos := func(d time.Duration) time.Duration { return max(d, 0) }
	p := BootPhases{
		Kernel:  pos(time.Duration(hello.Init)),
		Modules: span(hello.Init, hello.Modules),
		Port:    span(hello.Modules, hello.Hello),
		Config:  span(hello.Hello, ready.Config),
		Mounts:  span(ready.Config, ready.Mounts),
		Setup:   span(ready.Mounts, ready.Ready),
		Total:   pos(readyAt.Sub(qemuStart)),
	}
	if hello.Hello > 0 {
		p.QEMU = pos(helloAt.Sub(qemuStart) - time.Duration(hello.Hello))
	}
	return p
}

// saveBootPhases writes p to the state directory for whoever measures.
func saveBootPhases(dir string, p BootPhases) error {
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, bootFile), b, 0o600)
}

// ReadBootPhases reads the phases of the box whose state directory is dir
// (after its guest is ready).
func ReadBootPhases(dir string) (BootPhases, error) {
	var p BootPhases
	b, err := os.ReadFile(filepath.Join(dir, bootFile))
	if err != nil {
		return p, err
	}
	return p, json.Unmarshal(b, &p)
}

// recordBoot keeps the boot's phases, logs them (at debug level) and
// saves them in the state directory.
func (m *monitor) recordBoot(p BootPhases) {
	m.mu.Lock()
	m.phases = p
	m.mu.Unlock()
	m.log.Debug("boot phases", append([]any{"id", m.cfg.ID}, p.logAttrs()...)...)
	if err := saveBootPhases(m.dir, p); err != nil {
		m.log.Debug("save boot phases", "id", m.cfg.ID, "err", err)
	}
}

// recordStart adds the time start took to the boot's phases.
func (m *monitor) recordStart(d time.Duration) {
	m.mu.Lock()
	m.phases.Start = d
	p := m.phases
	m.mu.Unlock()
	m.log.Debug("process started", "id", m.cfg.ID, "start_ms", d.Milliseconds())
	if err := saveBootPhases(m.dir, p); err != nil {
		m.log.Debug("save boot phases", "id", m.cfg.ID, "err", err)
	}
}

// logAttrs lists p for a log line, in milliseconds.
func (p BootPhases) logAttrs() []any {
	ms := func(d time.Duration) int64 { return d.Milliseconds() }
	a := []any{"qemu_ms", ms(p.QEMU), "kernel_ms", ms(p.Kernel), "modules_ms", ms(p.Modules), "port_ms", ms(p.Port),
		"config_ms", ms(p.Config), "mounts_ms", ms(p.Mounts), "setup_ms", ms(p.Setup), "total_ms", ms(p.Total)}
	if p.Start > 0 {
		a = append(a, "start_ms", ms(p.Start))
	}
	if p.Restore > 0 {
		a = append(a, "restore_ms", ms(p.Restore), "restore_load_ms", ms(p.RestoreLoad), "restore_ram_ms", ms(p.RestoreRAM))
	}
	return a
}
