package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// rootlessUser is the ordinary user the rootless tests create and remove.
const rootlessUser = "kiwi-rootless-test"

// testUser is an ordinary user made for one test: home, subordinate id
// ranges for rootless podman, an XDG_RUNTIME_DIR, and copies of the
// binaries under test it can execute.
type testUser struct {
	t        testing.TB
	name     string
	uid, gid int
	home     string
	runDir   string
	bin      string
	conf     string
}

func newTestUser(t testing.TB) *testUser {
	t.Helper()
	exec.Command("userdel", "-r", rootlessUser).Run() // a previous run's, if it died
	// useradd gives new users subordinate ids only when these files
	// exist; a fresh machine may have none. Made here, removed after.
	for _, f := range []string{"/etc/subuid", "/etc/subgid"} {
		if _, err := os.Stat(f); os.IsNotExist(err) {
			if err := os.WriteFile(f, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.Remove(f) }) // runs after u.remove
		}
	}
	mustRun(t, nil, "useradd", "--create-home", "--shell", "/bin/sh", rootlessUser)
	u := &testUser{t: t, name: rootlessUser, home: "/home/" + rootlessUser}
	t.Cleanup(u.remove)
	u.uid, _ = strconv.Atoi(strings.TrimSpace(mustRun(t, nil, "id", "-u", rootlessUser)))
	u.gid, _ = strconv.Atoi(strings.TrimSpace(mustRun(t, nil, "id", "-g", rootlessUser)))
	// useradd gives new users ranges when /etc/subuid exists; make sure.
	if !strings.Contains(readFile("/etc/subuid"), rootlessUser+":") || !strings.Contains(readFile("/etc/subgid"), rootlessUser+":") {
		t.Fatalf("useradd gave %s no subordinate id ranges (/etc/subuid, /etc/subgid; SUB_UID_COUNT in /etc/login.defs)", rootlessUser)
	}
	u.runDir = fmt.Sprintf("/run/user/%d", u.uid)
	os.MkdirAll(u.runDir, 0o700)
	os.Chown(u.runDir, u.uid, u.gid)
	// The binaries, where the user can run them (the test's temp
	// directories are root's).
	u.bin = filepath.Join(u.home, "bin")
	os.MkdirAll(u.bin, 0o755)
	for _, b := range []string{"kiwi-shim", "kiwi-sharefs"} {
		copyFile(t, filepath.Join(bin, b), filepath.Join(u.bin, b))
		os.Chmod(filepath.Join(u.bin, b), 0o755)
	}
	u.conf = filepath.Join(u.home, "containers.conf")
	conf := fmt.Sprintf(`[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
events_logger = "file"
cgroup_manager = "cgroupfs"
runtime_supports_json = ["crun", "runc", "kiwi-shim"]
[engine.runtimes]
kiwi-shim = [%q]
`, filepath.Join(u.bin, "kiwi-shim"))
	os.WriteFile(u.conf, []byte(conf), 0o644)
	return u
}

func readFile(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}

// run runs a command as the user, in a clean login-like environment.
func (u *testUser) run(stdin string, name string, args ...string) result {
	u.t.Helper()
	if p := filepath.Join(u.bin, name); !strings.Contains(name, "/") && fileExists(p) {
		name = p // exec.Command looks names up in the test's PATH
	}
	cmd := exec.Command(name, args...)
	cmd.Dir = u.home
	cmd.Env = []string{
		"HOME=" + u.home, "USER=" + u.name, "LOGNAME=" + u.name,
		"PATH=" + u.bin + ":/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
		"XDG_RUNTIME_DIR=" + u.runDir, "CONTAINERS_CONF=" + u.conf,
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(u.uid), Gid: uint32(u.gid)}}
	return runCmd(u.t, cmd, stdin)
}

// podman runs rootless podman with kiwi-shim as its runtime.
func (u *testUser) podman(args ...string) result {
	u.t.Helper()
	return u.run("", "podman", append([]string{"--runtime", "kiwi-shim"}, args...)...)
}

// chownR gives a tree to the user.
func (u *testUser) chownR(p string) {
	mustRun(u.t, nil, "chown", "-R", fmt.Sprintf("%d:%d", u.uid, u.gid), p)
}

// remove checks that the user left no kiwi-shim state or process, then
// removes the user's podman state, processes (podman's pause process
// holds its user namespace), runtime directory and the user.
func (u *testUser) remove() {
	t := u.t
	if ents, _ := os.ReadDir(filepath.Join(u.runDir, "kiwi-shim", "containers")); len(ents) > 0 {
		t.Errorf("rootless state left: %d container(s) in %s", len(ents), filepath.Join(u.runDir, "kiwi-shim", "containers"))
	}
	u.run("", "podman", "rm", "-af", "-t", "0")
	u.run("", "podman", "system", "reset", "-f")
	exec.Command("pkill", "-KILL", "-u", u.name).Run()
	deadline := time.Now().Add(10 * time.Second)
	for exec.Command("pgrep", "-u", u.name).Run() == nil && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	os.RemoveAll(u.runDir)
	if out, err := exec.Command("userdel", "-r", u.name).CombinedOutput(); err != nil {
		t.Errorf("userdel: %v: %s", err, out)
	}
	for _, f := range []string{"/etc/subuid", "/etc/subgid"} {
		if strings.Contains(readFile(f), u.name+":") {
			t.Errorf("%s range of %s left", f, u.name)
		}
	}
}

// TestRootlessVM: an ordinary user runs a VM-mode container with rootless
// podman: the guest's kernel, a file the guest writes to a bind mount
// belongs to the user on the host, a loop device works in the guest, a
// device node and a set-user-ID file the guest makes on the bind mount
// work in the guest and are plain files on the host (mapped mode);
// container mode is refused with the documented message; `kiwi-shim
// check` reports the user's setup; nothing is left.
func TestRootlessVM(t *testing.T) {
	rel := guestRelease(t)
	noVMLeft(t)
	leaveClean(t, "")
	u := newTestUser(t)

	r := u.run("", "kiwi-shim", "check")
	for _, want := range []string{`(?m)^ok\s+rootless\s`, `(?m)^ok\s+subuid\s`, `(?m)^ok\s+subgid\s`, `(?m)^ok\s+newuidmap\s`, `(?m)^warn\s+container mode\s`} {
		if !regexp.MustCompile(want).MatchString(r.stdout) {
			t.Fatalf("kiwi-shim check as the user: no line %s; exit %d\n%s%s", want, r.code, r.stdout, r.stderr)
		}
	}

	work := filepath.Join(u.home, "work")
	rootfs := busyboxRootfs(t, "losetup")
	os.MkdirAll(work, 0o755)
	mustRun(t, nil, "cp", "-a", rootfs, filepath.Join(work, "rootfs"))
	share := filepath.Join(work, "share")
	os.MkdirAll(share, 0o755)
	u.chownR(work)

	script := `set -e
uname -r
echo made in the box > /share/out.txt
truncate -s 16M /share/disk.img
dev=$(/usr/sbin/losetup -f --show /share/disk.img)
echo loop $dev
/usr/sbin/losetup -d "$dev"
mknod /share/null c 1 3
echo into the null of the guest > /share/null
chmod 4755 /share/out.txt
ls -ln /share/null /share/out.txt
exit 7`
	r = u.podman("run", "--rm", "-v", share+":/share", "--rootfs", filepath.Join(work, "rootfs"), "sh", "-c", script)
	if r.code != 7 || !strings.HasPrefix(r.stdout, rel+"\n") || !strings.Contains(r.stdout, "loop /dev/loop") {
		t.Fatalf("rootless VM container: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	fi, err := os.Stat(filepath.Join(share, "out.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscall.Stat_t); int(st.Uid) != u.uid || int(st.Gid) != u.gid {
		t.Fatalf("the guest's file belongs to %d:%d on the host, want the user's %d:%d", st.Uid, st.Gid, u.uid, u.gid)
	}
	// Mapped mode under rootless podman (kiwi-sharefs is root of podman's
	// user namespace, where trusted.* attributes cannot be set): the
	// guest made a working device node and a set-user-ID file, and the
	// host has plain files with user.kiwi-sharefs.mode.
	if !regexp.MustCompile(`(?m)^crw.* 1, +3 .*/share/null$`).MatchString(r.stdout) || !regexp.MustCompile(`(?m)^-rwsr-xr-x .*/share/out.txt$`).MatchString(r.stdout) {
		t.Errorf("the guest's node and set-user-ID file, as the guest lists them:\n%s", r.stdout)
	}
	for name, mode := range map[string]os.FileMode{"null": 0o600, "out.txt": 0o755} {
		fi, err := os.Lstat(filepath.Join(share, name))
		if err != nil {
			t.Errorf("host %s: %v", name, err)
			continue
		}
		if fi.Mode() != mode {
			t.Errorf("host %s: mode %v, want a plain file of mode %v", name, fi.Mode(), mode)
		}
		if _, err := unix.Lgetxattr(filepath.Join(share, name), "user.kiwi-sharefs.mode", nil); err != nil {
			t.Errorf("host %s: no user.kiwi-sharefs.mode: %v", name, err)
		}
	}

	r = u.podman("run", "--rm", "--annotation", "io.kiwi-shim.mode=container", "--rootfs", filepath.Join(work, "rootfs"), "true")
	if r.code == 0 || !strings.Contains(r.stderr, "container mode needs real root") {
		t.Fatalf("container mode as a user: exit %d, stderr %q; want the refusal", r.code, r.stderr)
	}
}

// TestRootlessBoxbuild: an ordinary user's `kiwi-shim boxbuild` (no
// podman): it runs in a user namespace of its own, unpacks root's default
// box into the user's cache and runs KIWI in a VM; KIWI's failure on a
// broken description and its exit status reach the user, and the user's
// state, work and scratch directories are empty afterwards.
func TestRootlessBoxbuild(t *testing.T) {
	ensureBox(t)
	guestRelease(t)
	noVMLeft(t)
	leaveClean(t, "")
	u := newTestUser(t)
	desc := filepath.Join(u.home, "desc")
	target := filepath.Join(u.home, "target")
	os.MkdirAll(desc, 0o755)
	os.WriteFile(filepath.Join(desc, "config.xml"), []byte("<image schemaversion=\"7.5\" name=\"broken\">\n"), 0o644)
	u.chownR(desc)
	start := time.Now()
	r := u.run("", "kiwi-shim", "boxbuild", "--box-memory", "2G", "--", "--description", desc, "--target-dir", target)
	t.Logf("rootless boxbuild: exit %d after %s", r.code, time.Since(start).Round(time.Second))
	if r.code == 0 || !strings.Contains(r.stdout+r.stderr, "unpacked") || !strings.Contains(r.stdout+r.stderr, "KiwiConfigFileFormatNotSupported") {
		t.Fatalf("want KIWI's error on the broken description: exit %d\nstdout: %s\nstderr: %s", r.code, tailLines(r.stdout, 30), tailLines(r.stderr, 30))
	}
	if fi, err := os.Stat(target); err != nil || int(fi.Sys().(*syscall.Stat_t).Uid) != u.uid {
		t.Fatalf("target directory %s: %v (want it the user's)", target, err)
	}
	for _, d := range []string{filepath.Join(u.runDir, "kiwi-shim", "containers"), filepath.Join(u.home, ".cache", "kiwi-shim", "boxbuild"), filepath.Join(u.home, ".cache", "kiwi-shim", "scratch")} {
		if left, _ := os.ReadDir(d); len(left) > 0 {
			t.Errorf("rootless boxbuild left %d entries in %s", len(left), d)
		}
	}
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
