//go:build cgroup2

package integration

// Tests that only make sense on a cgroup v2 (unified) host. make
// test-cgroup2 runs them inside a Debian 12 VM with systemd as PID 1
// (contrib/cgroup2), once with each podman cgroup manager, together with
// the container-mode tests that hold on every host (loop devices and
// their partitions, capacity, the KIWI oem build). On a cgroup v1 host
// they fail: that is not the host they are about.

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiwi-shim/kiwi-shim/pkg/containermode"
)

// wantCgroupManager is the manager the run asked podman for; podman's
// default on a host with systemd as PID 1 is systemd.
func wantCgroupManager() string {
	if m := os.Getenv(cgroupManagerEnv); m != "" {
		return m
	}
	return "systemd"
}

// TestCgroup2Host: the host is the one the other tests claim to run on:
// the unified hierarchy only, podman reporting cgroup v2 and the manager
// asked for, and a container-mode container placed by that manager.
func TestCgroup2Host(t *testing.T) {
	var fs unix.Statfs_t
	if err := unix.Statfs("/sys/fs/cgroup", &fs); err != nil {
		t.Fatal(err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		t.Fatalf("/sys/fs/cgroup is not cgroup2fs (magic %#x): not a cgroup v2 host", fs.Type)
	}
	p := newPodman(t, 1, "")
	manager := wantCgroupManager()
	if got, want := p.must("info", "--format", "{{.Host.CgroupsVersion}} {{.Host.CgroupManager}}"), "v2 "+manager; got != want {
		t.Fatalf("podman info: %q, want %q", got, want)
	}
	// With the host's cgroup namespace the container's /proc/self/cgroup
	// shows where the manager put it: a systemd scope, or a directory
	// under libpod_parent.
	rootfs := busyboxRootfs(t)
	out := p.must("run", "--rm", "--cgroupns=host", "--annotation", containerMode, "--annotation", "io.kiwi-shim.loop.count=1",
		"--rootfs", rootfs, "cat", "/proc/self/cgroup")
	path, ok := strings.CutPrefix(strings.TrimSpace(out), "0::")
	if !ok || strings.Contains(path, "\n") {
		t.Fatalf("/proc/self/cgroup in the container: %q, want one cgroup v2 line", out)
	}
	placed := map[string]bool{"systemd": strings.Contains(path, ".scope"), "cgroupfs": strings.Contains(path, "/libpod_parent/")}
	if !placed[manager] {
		t.Fatalf("container's cgroup %s was not made by the %s manager", path, manager)
	}
	t.Logf("cgroup v2, manager %s, container cgroup %s", manager, path)
}

// TestCgroup2Partitions: a container-mode box partitions its leased loop
// device; it must see exactly that device and its partition, use the
// partition, and be refused a partition of a loop device it did not lease
// (a node made by hand for it). Then a part is killed with SIGKILL, the
// keeper or the container's init, and once the container is removed no
// partition node, lease or device filter (cgroup_device BPF program) of it
// may remain.
func TestCgroup2Partitions(t *testing.T) {
	if _, err := exec.LookPath("bpftool"); err != nil {
		t.Fatal("bpftool not found: the cgroup v2 test host installs it (contrib/cgroup2/image)")
	}
	// A partitioned loop device outside any lease, attached by hand.
	// Leases do not keep host tools off a leased device that is not
	// bound, and a keeper that ends detaches whatever is bound to its
	// devices then: an earlier test's keeper still releasing (its
	// container is gone, the keeper not yet) would detach this device
	// under the test, the partition's number would go to the
	// container's own partition and the foreign check would prove
	// nothing. So no keeper may be running when it is attached.
	eventually(t, time.Minute, "no loop keeper of an earlier test running", func() bool {
		return len(processes(func(argv []string) bool {
			return strings.Contains(" "+strings.Join(argv, " ")+" ", " "+containermode.KeeperCommand+" ")
		})) == 0
	})
	dir := t.TempDir()
	leaveClean(t, dir)
	foreignImg := filepath.Join(dir, "foreign.img")
	mustRun(t, nil, "truncate", "-s", "16M", foreignImg)
	mustRun(t, nil, "sh", "-c", `printf 'label: dos\n,8M,L\n' | sfdisk -q "$0"`, foreignImg)
	// Without partition scanning (-P), its partition registered with
	// partx as the box does: udev's watch re-reads the partition table
	// of a loop device that a writer closed (losetup opens it so), and
	// on a partition-scanning device that re-read drops and re-adds the
	// partition, which may then come back with another number while a
	// box takes the old one; the "foreign" node would be the box's own
	// partition (seen in make test-cgroup2: the box's loop1p1 got
	// 259:0, the foreign loop0p1 came back as 259:1). On a loop device
	// without partition scanning the re-read fails (EINVAL) and the
	// number stays.
	foreign := strings.TrimSpace(mustRun(t, nil, "losetup", "-f", "--show", foreignImg))
	t.Cleanup(func() {
		exec.Command("partx", "-d", foreign).Run()
		exec.Command("losetup", "-d", foreign).Run()
	})
	mustRun(t, nil, "partx", "-a", foreign)
	var foreignDev string
	eventually(t, 10*time.Second, foreign+"p1 registered", func() bool {
		b, err := os.ReadFile(filepath.Join("/sys/class/block", filepath.Base(foreign)+"p1", "dev"))
		foreignDev = strings.TrimSpace(string(b))
		return err == nil
	})
	majMin := strings.Replace(foreignDev, ":", " ", 1)

	rootfs := busyboxRootfs(t, "losetup", "sfdisk", "partx", "mke2fs")
	for _, victim := range []string{"keeper", "container"} {
		t.Run("kill-"+victim, func(t *testing.T) {
			p := newPodman(t, 2, "")
			img := filepath.Join(t.TempDir(), "disk.img")
			mustRun(t, nil, "truncate", "-s", "16M", img)
			progs := cgroupDevicePrograms(t)
			parts := len(loopPartitions())
			script := `dev=$(/usr/sbin/losetup -f --show /disk.img) || exit 1
printf 'label: dos\n,8M,L\n' | /usr/sbin/sfdisk -q "$dev"
/usr/sbin/partx -a "$dev"
i=0; while [ ! -b "${dev}p1" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "nodes: $(ls /dev | grep '^loop' | tr '\n' ' ')"
echo "kernel's partitions: $(cd /sys/class/block/$(basename $dev) && ls -d $(basename $dev)p*)"
if /usr/sbin/mke2fs -q -t ext2 "${dev}p1"; then echo "made ${dev}p1"; else echo "partition unusable"; fi
echo "${dev}p1 is $(stat -c '%t:%T' "${dev}p1") (hex), the kernel's $(cat /sys/class/block/$(basename $dev)p1/dev)"
rm -f /tmp/foreign; mknod /tmp/foreign b ` + majMin + `
if cat /tmp/foreign > /dev/null; then echo "foreign opened"; else echo "foreign refused"; fi
sleep 3
if cat /tmp/foreign > /dev/null; then echo "foreign opened later"; else echo "foreign refused later"; fi
echo ready
exec sleep 600
`
			id := p.must("run", "-d", "--annotation", containerMode, "--annotation", "io.kiwi-shim.loop.count=1",
				"-v", img+":/disk.img", "--rootfs", rootfs, "sh", "-c", script)
			stopWatch := watchDeviceFilters(t, p, id)
			var logs string
			eventually(t, 3*time.Minute, "the container's partition steps", func() bool {
				out, _ := p.cmd("logs", id).CombinedOutput()
				logs = string(out)
				return strings.Contains(logs, "ready")
			})
			t.Logf("container output:\n%s", logs)
			t.Logf("device programs attached to the container's cgroup, as they changed:\n%s", stopWatch())
			m := regexp.MustCompile(`made /dev/(loop\d+)p1`).FindStringSubmatch(logs)
			if m == nil {
				t.Errorf("the partition of the leased device is not usable in the container")
			} else if want := "nodes: " + m[1] + " " + m[1] + "p1 \n"; !strings.Contains(logs, want) {
				t.Errorf("the container's /dev loop nodes are not exactly its device and its partition (want %q)", strings.TrimSpace(want))
			}
			// The foreign partition must still be the one the node was
			// made for, or the check below is void.
			if now, err := os.ReadFile(filepath.Join("/sys/class/block", filepath.Base(foreign)+"p1", "dev")); err != nil || strings.TrimSpace(string(now)) != foreignDev {
				t.Errorf("the foreign partition %sp1 is no longer %s (now %q, %v): the foreign check proves nothing", foreign, foreignDev, strings.TrimSpace(string(now)), err)
			} else if !strings.Contains(logs, "foreign refused\n") || !strings.Contains(logs, "foreign refused later\n") {
				now, err := os.ReadFile(filepath.Join("/sys/class/block", filepath.Base(foreign)+"p1", "dev"))
				t.Errorf("the container opened %s (%s; now %q, %v), a partition of a loop device it did not lease", foreign+"p1", foreignDev, strings.TrimSpace(string(now)), err)
				logDeviceFilters(t, p, id)
			}
			if len(status(t, p.loopEnv).Held) != 1 {
				t.Errorf("loop status while running: want one leased device")
			}

			switch victim {
			case "keeper":
				keepers := processes(func(argv []string) bool {
					s := strings.Join(argv, " ")
					return strings.Contains(s, " "+containermode.KeeperCommand+" ") && strings.Contains(s, id)
				})
				if len(keepers) != 1 {
					t.Fatalf("want one loop keeper for %s, found %v", id, keepers)
				}
				syscall.Kill(keepers[0].Pid, syscall.SIGKILL)
			case "container":
				pid := p.must("inspect", "--format", "{{.State.Pid}}", id)
				mustRun(t, nil, "kill", "-9", pid)
				eventually(t, time.Minute, "podman sees the container exit", func() bool {
					out, _ := p.cmd("inspect", "--format", "{{.State.Running}}", id).Output()
					return strings.TrimSpace(string(out)) == "false"
				})
			}
			p.must("rm", "-f", "-t", "0", id)

			eventually(t, time.Minute, "no partition node, lease or device filter left", func() bool {
				return len(loopPartitions()) == parts && len(status(t, p.loopEnv).Held) == 0 && cgroupDevicePrograms(t) <= progs
			})
		})
	}
}

// cgroupDevicePrograms counts the loaded cgroup device filters (eBPF
// programs of type cgroup_device), which live as long as they are
// attached to a cgroup.
func cgroupDevicePrograms(t testing.TB) int {
	t.Helper()
	var progs []struct {
		Type string `json:"type"`
	}
	if err := json.Unmarshal([]byte(mustRun(t, nil, "bpftool", "prog", "show", "--json")), &progs); err != nil {
		t.Fatalf("bpftool prog show: %v", err)
	}
	n := 0
	for _, p := range progs {
		if p.Type == "cgroup_device" {
			n++
		}
	}
	return n
}

// logDeviceFilters logs, for a failed device check, the device programs
// in effect on the container's cgroup (bpftool names systemd's sd_devices)
// and, under systemd, its unit's device properties.
func logDeviceFilters(t *testing.T, p *podman, id string) {
	t.Helper()
	pid := p.must("inspect", "--format", "{{.State.Pid}}", id)
	b, err := os.ReadFile("/proc/" + pid + "/cgroup")
	if err != nil {
		t.Logf("cgroup of the container: %v", err)
		return
	}
	path, _ := strings.CutPrefix(strings.TrimSpace(string(b)), "0::")
	dir := filepath.Join("/sys/fs/cgroup", path)
	for _, args := range [][]string{{"cgroup", "show", dir, "effective"}, {"cgroup", "show", dir}, {"prog", "show"}} {
		out, err := exec.Command("bpftool", args...).CombinedOutput()
		t.Logf("bpftool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	if unit := filepath.Base(path); strings.HasSuffix(unit, ".scope") {
		out, err := exec.Command("systemctl", "show", "-p", "DevicePolicy", "-p", "DeviceAllow", "-p", "Delegate", unit).CombinedOutput()
		t.Logf("systemctl show %s: %v\n%s", unit, err, out)
	}
}

// watchDeviceFilters records, until the returned function is called, the
// device programs attached to the container's cgroup each time they change
// (bpftool's ids and names, looked at every 50 ms), and returns the record.
func watchDeviceFilters(t *testing.T, p *podman, id string) func() string {
	t.Helper()
	pid := p.must("inspect", "--format", "{{.State.Pid}}", id)
	b, err := os.ReadFile("/proc/" + pid + "/cgroup")
	if err != nil {
		return func() string { return err.Error() }
	}
	path, _ := strings.CutPrefix(strings.TrimSpace(string(b)), "0::")
	dir := filepath.Join("/sys/fs/cgroup", path)
	stop := make(chan struct{})
	done := make(chan string)
	start := time.Now()
	go func() {
		var rec strings.Builder
		last := ""
		for {
			var progs []struct {
				ID   int    `json:"id"`
				Name string `json:"name"`
			}
			out, err := exec.Command("bpftool", "--json", "cgroup", "show", dir).Output()
			cur := ""
			if err != nil {
				cur = "error: " + err.Error()
			} else if err := json.Unmarshal(out, &progs); err != nil {
				cur = "error: " + err.Error()
			} else {
				for _, pr := range progs {
					cur += fmt.Sprintf(" %d(%s)", pr.ID, pr.Name)
				}
			}
			if cur != last {
				fmt.Fprintf(&rec, "  %6.2fs:%s\n", time.Since(start).Seconds(), cur)
				last = cur
			}
			select {
			case <-stop:
				done <- dir + "\n" + rec.String()
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	var once sync.Once
	var rec string
	finish := func() string {
		once.Do(func() { close(stop); rec = <-done })
		return rec
	}
	t.Cleanup(func() { finish() })
	return finish
}
