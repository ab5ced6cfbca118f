package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
)

// templatePodman is a podman whose kiwi-shim restores boxes from
// templates (vm.template = "auto") kept in a directory of the test's own,
// which is returned beside it.
func templatePodman(t *testing.T, extra string) (*podman, string) {
	t.Helper()
	dir := t.TempDir()
	p := newPodman(t, 2, fmt.Sprintf("[vm]\ntemplate = \"auto\"\ntemplate_dir = %q\n%s", dir, extra))
	// Every call's log (create's, the monitor's: the template's making
	// and restore) goes to one file of the test's, shown on failure:
	// podman's own --log file is gone with the container.
	logPath := filepath.Join(t.TempDir(), "runtime.log")
	b, err := os.ReadFile(p.runtime)
	if err != nil {
		t.Fatal(err)
	}
	filter := fmt.Sprintf(`log=%q
skip=
for a do
	shift
	if [ -n "$skip" ]; then skip=; set -- "$@" "$log"; continue; fi
	case $a in
	--log) skip=1; set -- "$@" "$a" ;;
	--log=*) set -- "$@" "--log=$log" ;;
	*) set -- "$@" "$a" ;;
	esac
done
`, logPath)
	head, rest, ok := strings.Cut(string(b), "\n")
	if !ok || !strings.Contains(rest, " --root ") {
		t.Fatalf("podman's runtime wrapper: %q", b)
	}
	wrapper := head + "\n" + filter + strings.Replace(rest, " --root ", ` --log "$log" --root `, 1)
	if err := os.WriteFile(p.runtime, []byte(wrapper), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("kiwi-shim log:\n%s", b)
		}
	})
	return p, dir
}

// templateFiles lists the templates in dir (their .tmpl files).
func templateFiles(t *testing.T, dir string) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.tmpl"))
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// rootPorts is a guest's command that counts its PCI bridges: a box
// restored from a template has the template's twelve PCIe root ports, a
// cold-booted one none.
const rootPorts = `grep -l 0x060400 /sys/bus/pci/devices/*/class | wc -l`

// TestVMTemplate: with vm.template = auto, `kiwi-shim setup --template`
// makes the template, and boxes restored from it behave as cold-booted
// ones: the same output, their shares, scratch disk and network work,
// and each has its own clock, random state and boot id.
func TestVMTemplate(t *testing.T) {
	guestRelease(t)
	scratchDir := t.TempDir()
	p, dir := templatePodman(t, fmt.Sprintf("scratch_dir = %q\n", scratchDir))
	cold := newPodman(t, 2, "[vm]\ntemplate = \"off\"\n")
	noVMLeft(t)
	rootfs := busyboxRootfs(t)

	start := time.Now()
	r := run(t, nil, p.runtime, "setup", "--template")
	if r.code != 0 || !strings.Contains(r.stdout, "vm template (made now)") {
		t.Fatalf("setup --template: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	t.Logf("setup --template: %s\n%s", time.Since(start).Round(time.Millisecond), r.stdout)
	files := templateFiles(t, dir)
	if len(files) != 1 {
		t.Fatalf("templates after setup --template: %v, want one", files)
	}
	if r := run(t, nil, p.runtime, "setup", "--template"); r.code != 0 || !strings.Contains(r.stdout, "vm template (there already)") {
		t.Fatalf("setup --template again: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}

	// The same output as a cold boot's, from a restored guest.
	script := `uname -r; id; cat /proc/cmdline; ls /; echo $HOME; ` + rootPorts
	want := cold.run("", "run", "--rm", "--rootfs", rootfs, "sh", "-c", script)
	got := p.run("", "run", "--rm", "--rootfs", rootfs, "sh", "-c", script)
	if want.code != 0 || got.code != 0 {
		t.Fatalf("cold: exit %d %q; template: exit %d %q", want.code, want.stderr, got.code, got.stderr)
	}
	wantLines, gotLines := strings.Split(strings.TrimSpace(want.stdout), "\n"), strings.Split(strings.TrimSpace(got.stdout), "\n")
	if len(wantLines) != len(gotLines) || wantLines[len(wantLines)-1] != "0" || gotLines[len(gotLines)-1] != "12" {
		t.Fatalf("root ports: cold %q, template %q; want 0 and 12 (a restored guest)", want.stdout, got.stdout)
	}
	if w, g := strings.Join(wantLines[:len(wantLines)-1], "\n"), strings.Join(gotLines[:len(gotLines)-1], "\n"); w != g {
		t.Fatalf("output differs:\ncold:\n%s\ntemplate:\n%s", w, g)
	}

	// Shares (read-only and read-write), stdin and the scratch disk.
	share := t.TempDir()
	os.WriteFile(filepath.Join(share, "in.txt"), []byte("from host\n"), 0o644)
	r = p.run("through stdin\n", "run", "--rm", "-i", "-v", share+":/share", "-v", share+":/ro:ro",
		"--annotation", "io.kiwi-shim.vm.scratch=1G:/build", "--rootfs", rootfs, "sh", "-c",
		`cat /share/in.txt; cat; echo made in the box > /share/out.txt; touch /ro/x 2>/dev/null && echo ro-writable || echo ro-refused
grep " /build " /proc/mounts | cut -d" " -f3; dd if=/dev/zero of=/build/blob bs=1M count=8 2>/dev/null && ls -l /build/blob | tr -s " " | cut -d" " -f5; `+rootPorts)
	if b, err := os.ReadFile(filepath.Join(share, "out.txt")); r.code != 0 || err != nil || string(b) != "made in the box\n" ||
		r.stdout != "from host\nthrough stdin\nro-refused\next4\n8388608\n12\n" {
		t.Fatalf("shares and scratch: exit %d, stdout %q, stderr %q, host file %q %v", r.code, r.stdout, r.stderr, b, err)
	}
	if left, _ := os.ReadDir(scratchDir); len(left) != 0 {
		t.Fatalf("scratch images left: %v", left)
	}

	// A podman network: the NIC with podman's address, the gateway
	// answers.
	network := testNetwork(t, p, "198.51.100.0/24")
	r = p.run("", "run", "--rm", "--network", network, "--rootfs", rootfs, "sh", "-c",
		`ip -o -4 addr show | grep -v " lo " | tr -s " " | cut -d" " -f4; ping -c 1 -W 5 198.51.100.1 >/dev/null && echo gateway answers; `+rootPorts)
	if lines := strings.Split(strings.TrimSpace(r.stdout), "\n"); r.code != 0 || len(lines) != 3 || !strings.HasPrefix(lines[0], "198.51.100.") ||
		lines[1] != "gateway answers" || lines[2] != "12" {
		t.Fatalf("network: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}

	// Two restored boxes: their own boot id, random bytes and the
	// current time.
	ident := `cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1 | tr -d " \n"; echo; date +%s; hostname`
	var ids [2][]string
	for i := range ids {
		r := p.run("", "run", "--rm", "--hostname", fmt.Sprintf("box%d", i), "--rootfs", rootfs, "sh", "-c", ident)
		now := time.Now().Unix()
		ids[i] = strings.Split(strings.TrimSpace(r.stdout), "\n")
		if r.code != 0 || len(ids[i]) != 4 {
			t.Fatalf("identity %d: exit %d, stdout %q, stderr %q", i, r.code, r.stdout, r.stderr)
		}
		guestNow, err := strconv.ParseInt(ids[i][2], 10, 64)
		if err != nil || guestNow < now-10 || guestNow > now+1 {
			t.Errorf("box %d: guest time %s, host time %d", i, ids[i][2], now)
		}
		if ids[i][3] != fmt.Sprintf("box%d", i) {
			t.Errorf("box %d: hostname %q", i, ids[i][3])
		}
	}
	if ids[0][0] == ids[1][0] || ids[0][1] == ids[1][1] {
		t.Errorf("two restored boxes share state: boot ids %s %s, random bytes %s %s", ids[0][0], ids[1][0], ids[0][1], ids[1][1])
	}
	t.Logf("restored boxes: boot ids %s %s, random %s %s", ids[0][0], ids[1][0], ids[0][1], ids[1][1])

	// The box's boot phases say it was restored.
	name := "tmpl-" + strconv.Itoa(os.Getpid())
	if r := p.run("", "run", "-d", "--name", name, "--rootfs", rootfs, "sleep", "600"); r.code != 0 {
		t.Fatalf("run -d: exit %d, stderr %q", r.code, r.stderr)
	}
	phases, _ := filepath.Glob(filepath.Join(p.root, "containers", "*", "boot.json"))
	if len(phases) != 1 {
		t.Fatalf("boot phases: %v", phases)
	}
	ph, err := vm.ReadBootPhases(filepath.Dir(phases[0]))
	if err != nil || ph.Restore <= 0 {
		t.Fatalf("boot phases %+v (%v): want a restore", ph, err)
	}
	t.Logf("boot phases of a restored box: %+v", ph)
	restoredMem := qemuMemory(t)
	if r := p.run("", "rm", "-f", "-t", "0", name); r.code != 0 {
		t.Fatalf("rm -f: exit %d, stderr %q", r.code, r.stderr)
	}
	// Host memory of an idle box's QEMU, restored against cold-booted
	// (a figure for the docs, not a check).
	if r := cold.run("", "run", "-d", "--name", name, "--rootfs", rootfs, "sleep", "600"); r.code != 0 {
		t.Fatalf("cold run -d: exit %d, stderr %q", r.code, r.stderr)
	}
	coldMem := qemuMemory(t)
	if r := cold.run("", "rm", "-f", "-t", "0", name); r.code != 0 {
		t.Fatalf("cold rm -f: exit %d, stderr %q", r.code, r.stderr)
	}
	t.Logf("QEMU of an idle box (sleep), VmRSS/RssShmem: restored %s, cold %s", restoredMem, coldMem)
	if files := templateFiles(t, dir); len(files) != 1 {
		t.Fatalf("templates after the boxes: %v, want the one", files)
	}
	noVMLeft(t)
}

// TestVMTemplateFaults: a template that QEMU cannot load (a corrupt
// header or stream) makes the box boot cold, with the same result, and
// is removed, so that the next box makes a new one; a template or RAM
// file cut short is made again at create; with no template at all, the
// first box makes it.
func TestVMTemplateFaults(t *testing.T) {
	guestRelease(t)
	p, dir := templatePodman(t, "")
	noVMLeft(t)
	rootfs := busyboxRootfs(t)
	n := 0
	box := func(what, wantPorts string) {
		t.Helper()
		// Not --rm: a failed box's runtime log (podman's oci-log, where
		// the monitor's warnings go) is shown before it is removed.
		n++
		name := fmt.Sprintf("tmplfault-%d-%d", os.Getpid(), n)
		start := time.Now()
		r := p.run("", "run", "--name", name, "--rootfs", rootfs, "sh", "-c", "echo hello; "+rootPorts)
		took := time.Since(start)
		if r.code != 0 || r.stdout != "hello\n"+wantPorts+"\n" {
			t.Errorf("%s: exit %d, stdout %q (want hello and %s root ports), stderr %q", what, r.code, r.stdout, wantPorts, r.stderr)
			logs, _ := filepath.Glob(filepath.Join(p.root, "containers", "*", "*.log"))
			for _, l := range logs {
				b, _ := os.ReadFile(l)
				if len(b) > 4096 {
					b = b[len(b)-4096:]
				}
				t.Logf("%s:\n%s", l, b)
			}
		}
		if r := p.run("", "rm", "-f", "-t", "0", name); r.code != 0 {
			t.Errorf("rm %s: exit %d, stderr %q", name, r.code, r.stderr)
		}
		if t.Failed() {
			t.FailNow()
		}
		t.Logf("%s: %s", what, took.Round(time.Millisecond))
	}
	// First use makes the template; the box is restored from it.
	box("first box (makes the template)", "12")
	files := templateFiles(t, dir)
	if len(files) != 1 {
		t.Fatalf("templates after the first box: %v", files)
	}
	tmpl := files[0]
	good, err := os.ReadFile(tmpl)
	if err != nil {
		t.Fatal(err)
	}
	for _, fault := range []struct {
		name  string
		apply func() error
	}{
		{"corrupt header", func() error {
			b := append([]byte{}, good...)
			copy(b, "XXXXXXXX")
			return os.WriteFile(tmpl, b, 0o600)
		}},
		{"corrupt stream", func() error {
			b := append([]byte{}, good...)
			// Past the header: garbage over the list of RAM blocks and
			// the first pages.
			for i := 64; i < 64+4096; i++ {
				b[i] = 0xa5
			}
			return os.WriteFile(tmpl, b, 0o600)
		}},
	} {
		if err := fault.apply(); err != nil {
			t.Fatal(err)
		}
		box(fault.name+": cold boot", "0")
		// The template that failed to load is gone; the next box makes
		// a new one and is restored from it.
		box(fault.name+": next box (new template)", "12")
		good, err = os.ReadFile(tmpl)
		if err != nil {
			t.Fatalf("%s: no new template: %v", fault.name, err)
		}
	}
	// A template cut short is no template (its record names its size):
	// create makes it again and the box is restored from the new one.
	if err := os.Truncate(tmpl, int64(len(good)/2)); err != nil {
		t.Fatal(err)
	}
	box("truncated: made again", "12")
	if fi, err := os.Stat(tmpl); err != nil || fi.Size() < int64(len(good))/2+1 {
		t.Fatalf("truncated template not replaced: %v %v", fi, err)
	}
	// So is a RAM file cut short (the guest's memory beside the stream).
	ram := strings.TrimSuffix(tmpl, ".tmpl") + ".ram"
	fi, err := os.Stat(ram)
	if err != nil {
		t.Fatalf("no RAM file beside the template: %v", err)
	}
	if err := os.Truncate(ram, fi.Size()/2); err != nil {
		t.Fatal(err)
	}
	box("RAM file truncated: made again", "12")
	if fi2, err := os.Stat(ram); err != nil || fi2.Size() != fi.Size() {
		t.Fatalf("truncated RAM file not replaced: %v %v", fi2, err)
	}
	noVMLeft(t)
}

// qemuMemory returns the resident memory of this run's one QEMU, as
// "VmRSS/RssShmem" from its /proc status.
func qemuMemory(t *testing.T) string {
	t.Helper()
	var pids []int
	for _, p := range processes(isQEMU) {
		if fromThisRun(p.Pid) {
			pids = append(pids, p.Pid)
		}
	}
	if len(pids) != 1 {
		t.Fatalf("QEMU processes of this run: %v, want one", pids)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pids[0]))
	if err != nil {
		t.Fatal(err)
	}
	var rss, shmem string
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			rss = strings.TrimSpace(v)
		}
		if v, ok := strings.CutPrefix(l, "RssShmem:"); ok {
			shmem = strings.TrimSpace(v)
		}
	}
	return rss + "/" + shmem
}

// TestVMTemplateQEMUKilled: QEMU ended by a signal while it restores a
// box from its template (20 ms after its start). Killed from outside
// (SIGKILL), the box ends with an error that says so, as a cold boot's
// does; crashed by itself (SIGSEGV), the box boots cold with the same
// result. Either way the template stays (it was not at fault) and the
// next box is restored from it.
func TestVMTemplateQEMUKilled(t *testing.T) {
	guestRelease(t)
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		sig string
		// wantErr is the box's error, or "" for a cold boot.
		wantErr string
	}{
		{"KILL", "QEMU was killed by SIGKILL during the boot"},
		{"SEGV", ""},
	} {
		t.Run(tc.sig, func(t *testing.T) {
			// The machine's QEMU is a wrapper that becomes QEMU (exec:
			// the same process, with the inherited taps, stream and
			// RAM) and, for the first restore (a QEMU that waits for an
			// incoming stream), sends it the signal 20 ms later, while
			// QEMU sets up or connects: a restore under TCG takes
			// several times that, so the signal is never late.
			wdir := t.TempDir()
			wrapper := filepath.Join(wdir, "qemu-system-x86_64")
			mark := filepath.Join(wdir, "signalled")
			script := fmt.Sprintf(`#!/bin/sh
case " $* " in
*" -incoming "*)
	if [ ! -e %[1]q ]; then
		: >%[1]q
		(sleep 0.02; kill -%[3]s $$) &
	fi ;;
esac
exec %[2]q "$@"
`, mark, qemu, tc.sig)
			if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
				t.Fatal(err)
			}
			p, dir := templatePodman(t, fmt.Sprintf("qemu = { x86_64 = %q }\n", wrapper))
			noVMLeft(t)
			rootfs := busyboxRootfs(t)
			run := func() result {
				return p.run("", "run", "--rm", "--rootfs", rootfs, "sh", "-c", "echo hello; "+rootPorts)
			}
			if out, err := exec.Command(p.runtime, "setup", "--template").CombinedOutput(); err != nil {
				t.Fatalf("setup --template: %v\n%s", err, out)
			}
			start := time.Now()
			r := run()
			if _, err := os.Stat(mark); err != nil {
				t.Fatalf("the restore's QEMU got no signal: %v", err)
			}
			switch {
			case tc.wantErr != "" && (r.code == 0 || !strings.Contains(r.stderr, tc.wantErr)):
				t.Fatalf("SIG%s during the restore: exit %d, stdout %q, stderr %q; want a failure that says %q", tc.sig, r.code, r.stdout, r.stderr, tc.wantErr)
			case tc.wantErr == "" && (r.code != 0 || r.stdout != "hello\n0\n"):
				t.Fatalf("SIG%s during the restore: exit %d, stdout %q, stderr %q; want a cold boot (hello, 0 root ports)", tc.sig, r.code, r.stdout, r.stderr)
			}
			t.Logf("SIG%s during the restore: exit %d in %s: %s", tc.sig, r.code, time.Since(start).Round(time.Millisecond), strings.TrimSpace(r.stderr))
			if files := templateFiles(t, dir); len(files) != 1 {
				t.Fatalf("templates after the signal: %v (want the one, kept)", files)
			}
			if r := run(); r.code != 0 || r.stdout != "hello\n12\n" {
				t.Fatalf("next box: exit %d, stdout %q, stderr %q; want hello and 12 root ports (restored)", r.code, r.stdout, r.stderr)
			}
			noVMLeft(t)
		})
	}
}
