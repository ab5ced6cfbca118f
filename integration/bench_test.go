package integration

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiwi-shim/kiwi-shim/pkg/initramfs"
	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
)

// Benchmarks that compare kiwi-shim with the real alternative, measured
// interleaved in the same run. Run them with `make bench` (-benchtime 1x:
// each does its own rounds and reports medians).

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

// timeToFirstByte runs cmd and returns how long it took until its stdout
// produced want, then waits for it to finish.
func timeToFirstByte(b *testing.B, cmd *exec.Cmd, want string) time.Duration {
	b.Helper()
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	var first time.Duration
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if first == 0 && strings.Contains(sc.Text(), want) {
			first = time.Since(start)
		}
	}
	io.Copy(io.Discard, out)
	if err := cmd.Wait(); err != nil {
		b.Fatalf("%s: %v", strings.Join(cmd.Args, " "), err)
	}
	if first == 0 {
		b.Fatalf("%s never printed %q", strings.Join(cmd.Args, " "), want)
	}
	return first
}

// BenchmarkContainerModeRun: `podman run --rm` of a trivial command through
// kiwi-shim in container mode against runc directly, 20 rounds interleaved.
func BenchmarkContainerModeRun(b *testing.B) {
	const rounds = 20
	p := benchPodman(b)
	rootfs := benchRootfs(b)
	var shimD, runcD []time.Duration
	for range rounds {
		for _, rt := range []string{"runc", "kiwi-shim"} {
			args := []string{"run", "--rm", "--rootfs", rootfs, "true"}
			var cmd *exec.Cmd
			if rt == "runc" {
				cmd = exec.Command("podman", append([]string{"--runtime", "runc"}, args...)...)
				cmd.Env = append(os.Environ(), "CONTAINERS_CONF="+p.conf)
			} else {
				cmd = p.cmd(append([]string{"run", "--annotation", containerMode}, args[1:]...)...)
			}
			start := time.Now()
			if out, err := cmd.CombinedOutput(); err != nil {
				b.Fatalf("%s: %v\n%s", rt, err, out)
			}
			if rt == "runc" {
				runcD = append(runcD, time.Since(start))
			} else {
				shimD = append(shimD, time.Since(start))
			}
		}
	}
	ms, mr := median(shimD), median(runcD)
	b.ReportMetric(float64(ms.Milliseconds()), "kiwi-shim-ms")
	b.ReportMetric(float64(mr.Milliseconds()), "runc-ms")
	b.ReportMetric(float64(ms)/float64(mr), "ratio")
}

// BenchmarkVMStart: time from `podman run` to the first byte of the
// container's output in VM mode, against a raw QEMU boot of the same
// kernel with a minimal init that prints one line (same accelerator,
// memory and cpus, the same unpacked kernel file; the compressed image's
// raw boot is reported too), interleaved: a cold boot (kiwi-shim-ms,
// ratio) and the default start, restored from a template
// (template-ms, template-ratio). It also reports the resident memory of
// the host processes kiwi-shim adds besides QEMU (the monitor).
func BenchmarkVMStart(b *testing.B) {
	rounds := 5
	if n, err := strconv.Atoi(os.Getenv("KIWI_BENCH_ROUNDS")); err == nil && n > 0 {
		rounds = n
	}
	p := benchPodman(b)
	tp := newPodman(b, 2, fmt.Sprintf("[vm]\ntemplate = \"auto\"\ntemplate_dir = %q\n", b.TempDir()))
	if out, err := exec.Command(tp.runtime, "setup", "--template").CombinedOutput(); err != nil {
		b.Fatalf("setup --template: %v\n%s", err, out)
	}
	rootfs := benchRootfs(b)
	kernel := guestKernel(b).Image
	rawInit := filepath.Join(b.TempDir(), "rawinit")
	build := exec.Command("go", "build", "-o", rawInit, "./testdata/rawinit")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("build rawinit: %v\n%s", err, out)
	}
	initBytes, _ := os.ReadFile(rawInit)
	initrd, err := initramfs.Build(initramfs.Spec{Init: initBytes, Modules: []string{}}, b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	// kiwi-shim boots the kernel's own ELF file through its PVH entry
	// (vm.BootImage): the raw boot does the same, and the compressed
	// image is timed beside it.
	elfKernel, err := vm.UnpackPVH(kernel, b.TempDir())
	if err != nil {
		b.Fatalf("unpack %s: %v", kernel, err)
	}
	rawBoot := func(image string) time.Duration {
		raw := exec.Command("qemu-system-x86_64", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
			"-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "2048M", "-smp", "2",
			"-kernel", image, "-initrd", initrd,
			"-append", "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init", "-serial", "stdio")
		return timeToFirstByte(b, raw, "ready")
	}
	var shimD, tmplD, rawD, bzD []time.Duration
	var monitorRSS []int
	var phases []vm.BootPhases
	for range rounds {
		rawD = append(rawD, rawBoot(elfKernel))
		bzD = append(bzD, rawBoot(kernel))

		cmd := p.cmd("run", "--rm", "--rootfs", rootfs, "sh", "-c", "echo ready; sleep 1")
		done := make(chan struct{})
		go func() {
			defer close(done)
			rssSeen, phasesSeen := false, false
			for i := 0; i < 400 && !(rssSeen && phasesSeen); i++ {
				if rss := monitorRSSKiB(); !rssSeen && rss > 0 {
					monitorRSS, rssSeen = append(monitorRSS, rss), true
				}
				// The box sleeps a second after its output: its boot
				// phases are in its state directory meanwhile.
				if files, _ := filepath.Glob(filepath.Join(p.root, "containers", "*", "boot.json")); !phasesSeen && len(files) > 0 {
					if ph, err := vm.ReadBootPhases(filepath.Dir(files[0])); err == nil && ph.Start > 0 {
						phases, phasesSeen = append(phases, ph), true
					}
				}
				time.Sleep(25 * time.Millisecond)
			}
		}()
		shimD = append(shimD, timeToFirstByte(b, cmd, "ready"))
		<-done
		tmplD = append(tmplD, timeToFirstByte(b, tp.cmd("run", "--rm", "--rootfs", rootfs, "sh", "-c", "echo ready"), "ready"))
	}
	b.Logf("kernel %s: raw boots %v (compressed image: %v), podman runs %v, restored %v", filepath.Base(kernel), rawD, bzD, shimD, tmplD)
	b.Logf("boot phases of the podman runs: %+v", phases)
	if len(phases) > 0 {
		for _, ph := range []struct {
			unit string
			of   func(vm.BootPhases) time.Duration
		}{
			{"qemu-ms", func(p vm.BootPhases) time.Duration { return p.QEMU }},
			{"kernel-ms", func(p vm.BootPhases) time.Duration { return p.Kernel }},
			{"modules-ms", func(p vm.BootPhases) time.Duration { return p.Modules }},
			{"port-ms", func(p vm.BootPhases) time.Duration { return p.Port }},
			{"config-ms", func(p vm.BootPhases) time.Duration { return p.Config }},
			{"mounts-ms", func(p vm.BootPhases) time.Duration { return p.Mounts }},
			{"setup-ms", func(p vm.BootPhases) time.Duration { return p.Setup }},
			{"start-ms", func(p vm.BootPhases) time.Duration { return p.Start }},
			{"boot-total-ms", func(p vm.BootPhases) time.Duration { return p.Total }},
		} {
			var ds []time.Duration
			for _, p := range phases {
				ds = append(ds, ph.of(p))
			}
			b.ReportMetric(float64(median(ds).Milliseconds()), ph.unit)
		}
	}
	ms, mr := median(shimD), median(rawD)
	b.ReportMetric(float64(ms.Milliseconds()), "kiwi-shim-ms")
	b.ReportMetric(float64(mr.Milliseconds()), "raw-qemu-ms")
	b.ReportMetric(float64(median(bzD).Milliseconds()), "raw-bzimage-ms")
	b.ReportMetric(float64(ms)/float64(mr), "ratio")
	b.ReportMetric(float64(median(tmplD).Milliseconds()), "template-ms")
	b.ReportMetric(float64(median(tmplD))/float64(mr), "template-ratio")
	if len(monitorRSS) > 0 {
		sort.Ints(monitorRSS)
		b.ReportMetric(float64(monitorRSS[len(monitorRSS)/2]), "monitor-rss-KiB")
	}
}

// monitorRSSKiB returns the resident memory of a running VM monitor.
func monitorRSSKiB() int {
	if ms := processes(cmdlineHas("vm-monitor")); len(ms) > 0 {
		return rssKiB(ms[:1])
	}
	return 0
}

// benchPodman is a podman whose VM boxes boot cold: the start figures
// compare boots (BenchmarkVMStartTemplate has the restored ones).
func benchPodman(b *testing.B) *podman { return newPodman(b, 2, "[vm]\ntemplate = \"off\"\n") }

func benchRootfs(b *testing.B) string { return busyboxRootfs(b) }

// BenchmarkVMStartTemplate: `podman run --rm` of a busybox box to its
// first output and to its end (`true`), cold boot against a box restored
// from a template (vm.template = auto), same kernel and size, interleaved;
// and the template's own making (`kiwi-shim setup --template`: a boot
// plus the save) and size.
func BenchmarkVMStartTemplate(b *testing.B) {
	rounds := 5
	if n, err := strconv.Atoi(os.Getenv("KIWI_BENCH_ROUNDS")); err == nil && n > 0 {
		rounds = n
	}
	dir := b.TempDir()
	cold := benchPodman(b)
	tp := newPodman(b, 2, fmt.Sprintf("[vm]\ntemplate = \"auto\"\ntemplate_dir = %q\n", dir))
	rootfs := benchRootfs(b)
	start := time.Now()
	if out, err := exec.Command(tp.runtime, "setup", "--template").CombinedOutput(); err != nil {
		b.Fatalf("setup --template: %v\n%s", err, out)
	}
	makeD := time.Since(start)
	files, _ := filepath.Glob(filepath.Join(dir, "*.tmpl"))
	if len(files) != 1 {
		b.Fatalf("templates: %v", files)
	}
	fi, err := os.Stat(files[0])
	if err != nil {
		b.Fatal(err)
	}
	recorded, err := vm.TemplateMakeTime(dir, strings.TrimSuffix(filepath.Base(files[0]), ".tmpl"))
	if err != nil {
		b.Fatal(err)
	}
	// The RAM file's data: what every restored box copies into its own
	// memory (the file's size is the guest's RAM; the rest are holes).
	var ramSt syscall.Stat_t
	if err := syscall.Stat(strings.TrimSuffix(files[0], ".tmpl")+".ram", &ramSt); err != nil {
		b.Fatal(err)
	}
	ramData := ramSt.Blocks * 512
	runTrue := func(p *podman) time.Duration {
		start := time.Now()
		if r := p.run("", "run", "--rm", "--rootfs", rootfs, "true"); r.code != 0 {
			b.Fatalf("run true: exit %d, stderr %q", r.code, r.stderr)
		}
		return time.Since(start)
	}
	var coldD, tmplD, coldTrue, tmplTrue []time.Duration
	for range rounds {
		coldD = append(coldD, timeToFirstByte(b, cold.cmd("run", "--rm", "--rootfs", rootfs, "sh", "-c", "echo ready"), "ready"))
		tmplD = append(tmplD, timeToFirstByte(b, tp.cmd("run", "--rm", "--rootfs", rootfs, "sh", "-c", "echo ready"), "ready"))
		coldTrue = append(coldTrue, runTrue(cold))
		tmplTrue = append(tmplTrue, runTrue(tp))
	}
	b.Logf("TCG. first output: cold %v, template %v; run true: cold %v, template %v; template made in %s (setup --template %s), stream %d bytes, RAM file data %d bytes",
		coldD, tmplD, coldTrue, tmplTrue, recorded.Round(time.Millisecond), makeD.Round(time.Millisecond), fi.Size(), ramData)
	mc, mt := median(coldD), median(tmplD)
	b.ReportMetric(float64(mc.Milliseconds()), "cold-first-output-ms")
	b.ReportMetric(float64(mt.Milliseconds()), "template-first-output-ms")
	b.ReportMetric(float64(mt)/float64(mc), "template/cold")
	b.ReportMetric(float64(median(coldTrue).Milliseconds()), "cold-run-true-ms")
	b.ReportMetric(float64(median(tmplTrue).Milliseconds()), "template-run-true-ms")
	b.ReportMetric(float64(recorded.Milliseconds()), "template-make-ms")
	b.ReportMetric(float64(fi.Size())/(1<<20), "template-MiB")
	b.ReportMetric(float64(ramData)/(1<<20), "template-RAM-MiB")
}
