package integration

import (
	"debug/elf"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
)

// The default box, built by contrib/box/build (cached until its recipe
// changes; the first build takes about two minutes).
const box = "localhost/kiwi-box:bookworm"

func ensureBox(t testing.TB, args ...string) {
	t.Helper()
	cmd := exec.Command("../contrib/box/build", args...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("contrib/box/build: %v\n%s", err, out)
	}
}

// renderDescription copies an example description and fills in this
// machine's Debian mirror, as make demo does.
func renderDescription(t testing.TB, name string, edit func(string) string) string {
	t.Helper()
	mirror, err := exec.Command("bash", "-c", ". ../contrib/lib/common.sh && debian_mirror").Output()
	if err != nil {
		t.Fatalf("debian_mirror: %v", err)
	}
	dir := filepath.Join(t.TempDir(), "description")
	mustRun(t, nil, "cp", "-a", filepath.Join("../contrib/descriptions", name), dir)
	p := filepath.Join(dir, "config.kiwi")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	s := strings.ReplaceAll(string(b), "@MIRROR@", strings.TrimSpace(string(mirror)))
	if edit != nil {
		s = edit(s)
	}
	if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// kiwiBuild runs kiwi-ng in the box through podman and kiwi-shim, with its
// working tree on a tmpfs and the results copied to out.
func kiwiBuild(p *podman, mode, desc, out string) result {
	script := `kiwi-ng --logfile /out/kiwi.log system build --description /description --target-dir /build; rc=$?
cp --sparse=always /build/*.raw /build/*.packages /out/ 2>/dev/null
exit $rc`
	return p.run("", "run", "--rm", "--annotation", "io.kiwi-shim.mode="+mode,
		"--tmpfs", "/build:rw,exec,dev,suid,size=3g,mode=0755",
		"-v", desc+":/description:ro", "-v", out+":/out", box, "sh", "-c", script)
}

// checkImage checks the oem image in out: one .raw disk whose Linux
// partition (the only one with BIOS firmware; after the ESP with EFI) is
// ext4 and holds /usr/bin/hello, the described package, built for the
// host's architecture.
func checkImage(t testing.TB, out string) { checkImageArch(t, out, hostMachine()) }

// linuxPartition is the partition type of a Linux file system, in an
// msdos and in a GPT partition table.
var linuxPartition = map[string]bool{"83": true, "0FC63DAF-8483-4772-8E79-3D69D8477DE4": true}

// checkImageArch is checkImage for an image of the given architecture.
func checkImageArch(t testing.TB, out string, machine elf.Machine) {
	t.Helper()
	dev, detach := attachRoot(t, out)
	defer detach()
	if fs := strings.TrimSpace(mustRun(t, nil, "blkid", "-o", "value", "-s", "TYPE", dev)); fs != "ext4" {
		t.Fatalf("root filesystem %q, want ext4", fs)
	}
	hello := filepath.Join(t.TempDir(), "hello")
	mustRun(t, nil, "debugfs", "-R", "dump /usr/bin/hello "+hello, dev)
	f, err := elf.Open(hello)
	if err != nil {
		t.Fatalf("/usr/bin/hello (the described package) not in the image: %v", err)
	}
	defer f.Close()
	if f.Machine != machine {
		t.Fatalf("/usr/bin/hello is built for %s, want %s", f.Machine, machine)
	}
}

// attachRoot attaches the root partition of the one .raw image in out
// (its last partition, which must be a Linux one) read-only to a loop
// device and returns the device and a function that detaches it.
func attachRoot(t testing.TB, out string) (string, func()) {
	t.Helper()
	images, _ := filepath.Glob(filepath.Join(out, "*.raw"))
	if len(images) != 1 {
		t.Fatalf("want one .raw image in %s, got %v", out, images)
	}
	var table struct {
		PartitionTable struct {
			Label      string `json:"label"`
			Partitions []struct {
				Start int64  `json:"start"`
				Type  string `json:"type"`
			} `json:"partitions"`
		} `json:"partitiontable"`
	}
	if err := json.Unmarshal([]byte(mustRun(t, nil, "sfdisk", "--json", images[0])), &table); err != nil {
		t.Fatal(err)
	}
	pt := table.PartitionTable
	last := len(pt.Partitions) - 1
	if last < 0 || !linuxPartition[strings.ToUpper(pt.Partitions[last].Type)] {
		t.Fatalf("partition table %+v, want a Linux partition last", pt)
	}
	offset := strconv.FormatInt(pt.Partitions[last].Start*512, 10)
	dev := strings.TrimSpace(mustRun(t, nil, "losetup", "--read-only", "--offset", offset, "--find", "--show", images[0]))
	return dev, func() { exec.Command("losetup", "-d", dev).Run() }
}

// hostMachine is the ELF machine of this host's programs.
func hostMachine() elf.Machine {
	if runtime.GOARCH == "arm64" {
		return elf.EM_AARCH64
	}
	return elf.EM_X86_64
}

// TestKiwiBuildContainerMode: a real KIWI oem build (Debian bookworm, ext4,
// partition table) through podman and kiwi-shim in container mode, with
// only leased loop devices and their partitions visible in the container.
func TestKiwiBuildContainerMode(t *testing.T) {
	ensureBox(t)
	p := newPodman(t, 2, "")
	out := t.TempDir()
	r := kiwiBuild(p, "container", renderDescription(t, "bookworm-oem", nil), out)
	if r.code != 0 {
		log, _ := os.ReadFile(filepath.Join(out, "kiwi.log"))
		t.Fatalf("kiwi-ng exit %d\n%s\n%s\nKIWI log tail:\n%s", r.code, tailLines(r.stdout, 20), r.stderr, tailLines(string(log), 20))
	}
	checkImage(t, out)
}

// TestKiwiBuildFailure: KIWI's own exit status and error come through.
func TestKiwiBuildFailure(t *testing.T) {
	ensureBox(t)
	p := newPodman(t, 2, "")
	desc := renderDescription(t, "bookworm-oem", func(s string) string {
		return strings.Replace(s, `<package name="hello"/>`, `<package name="kiwi-shim-no-such-package"/>`, 1)
	})
	r := kiwiBuild(p, "container", desc, t.TempDir())
	if r.code == 0 || !strings.Contains(r.stdout+r.stderr, "kiwi-shim-no-such-package") {
		t.Fatalf("exit %d, want KIWI's failure naming the package:\n%s\n%s", r.code, tailLines(r.stdout, 20), r.stderr)
	}
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
