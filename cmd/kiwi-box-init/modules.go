package main

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The box's kernel modules load in two steps (pkg/initramfs): those its
// setup needs before the process starts (LoadList), and the rest
// (LaterList: xfs, btrfs, vfat, ...) on a thread of their own while the
// box starts. A mount that asks the kernel for one of those meanwhile
// makes the kernel run its modprobe, which is this binary
// (modprobePath): it waits until the loading thread is done, and the
// kernel looks again.

// modprobePath is what the kernel runs for a module it lacks
// (/proc/sys/kernel/modprobe): this binary, PID 1's, through /proc. The
// kernel resolves it from the root PID 1 has then (the initramfs, later
// the container's root, where setup mounts the guest's /proc), and runs
// it outside the container's namespaces, so it is never the image's own
// modprobe.
const modprobePath = "/proc/1/exe"

// loaderName is the loading thread's name, which the module request
// waits on.
const loaderName = "kiwi-modload"

// moduleRequestTimeout bounds how long a module request waits.
const moduleRequestTimeout = 2 * time.Minute

// openModules opens the modules listed in path (one absolute path per
// line, dependencies first), before setup covers the initramfs with the
// container's root. A module that cannot be opened is reported, the rest
// still load.
func openModules(path string) ([]*os.File, error) {
	f, err := os.Open(path)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var mods []*os.File
	var failed []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		p := strings.TrimSpace(sc.Text())
		if p == "" {
			continue
		}
		mf, err := os.Open(p)
		if err != nil {
			failed = append(failed, filepath.Base(p)+": "+err.Error())
			continue
		}
		mods = append(mods, mf)
	}
	if err := sc.Err(); err != nil {
		failed = append(failed, path+": "+err.Error())
	}
	if len(failed) > 0 {
		return mods, fmt.Errorf("modules not opened: %s", strings.Join(failed, "; "))
	}
	return mods, nil
}

// loadModules loads mods in order and closes them. A module already
// there (built in, or loaded) is no failure.
func loadModules(mods []*os.File) error {
	var failed []string
	for _, mf := range mods {
		err := unix.FinitModule(int(mf.Fd()), "", 0)
		if err != nil && err != unix.EEXIST {
			failed = append(failed, filepath.Base(mf.Name())+": "+err.Error())
		}
		mf.Close()
	}
	if len(failed) > 0 {
		return fmt.Errorf("modules not loaded: %s", strings.Join(failed, "; "))
	}
	return nil
}

// answerModuleRequests makes this binary the kernel's modprobe.
func answerModuleRequests() error {
	if err := os.WriteFile("/proc/sys/kernel/modprobe", []byte(modprobePath), 0o644); err != nil {
		return fmt.Errorf("module requests: %w", err)
	}
	return nil
}

// loadInBackground loads mods on a thread named loaderName and returns
// once that thread carries its name, so that a module request from now
// on waits for the loading. Failures go to the console. The channel it
// returns is closed when the loading is over.
func loadInBackground(mods []*os.File) <-chan struct{} {
	loaded := make(chan struct{})
	if len(mods) == 0 {
		close(loaded)
		return loaded
	}
	named := make(chan struct{})
	go func() {
		defer close(loaded)
		// Never unlocked: the thread ends with the loading, and its
		// name with it.
		runtime.LockOSThread()
		if err := os.WriteFile("/proc/thread-self/comm", []byte(loaderName), 0o644); err != nil {
			fmt.Fprintf(os.Stderr, "kiwi-box-init: name the module loader: %v\n", err)
		}
		close(named)
		if err := loadModules(mods); err != nil {
			fmt.Fprintf(os.Stderr, "kiwi-box-init: %v\n", err)
		}
	}()
	<-named
	return loaded
}

// isModuleRequest reports whether this process is the kernel's module
// request (modprobe) rather than the guest's init or the exec helper.
func isModuleRequest() bool { return os.Getpid() != 1 && !isExecHelper() }

// moduleRequest answers a module request. The later modules are file
// systems and the character sets vfat mounts with: a request for a file
// system ("fs-NAME", a mount's) waits while PID 1 loads them, until that
// file system is registered; one for a character set ("nls_NAME") waits
// until the loading is done; either ends with success, and the kernel
// then looks for what it wanted again. Any other request (an exec's
// "binfmt-*", a socket's "net-pf-*", ...) fails at once: nothing the box
// loads later provides it. Waits are bounded by moduleRequestTimeout. The
// name, which a container can choose, is only compared with
// /proc/filesystems.
func moduleRequest() int {
	name := ""
	if n := len(os.Args); n > 1 {
		name = os.Args[n-1]
	}
	fs, isFS := strings.CutPrefix(name, "fs-")
	if !isFS && !strings.HasPrefix(name, "nls_") {
		return 1
	}
	deadline := time.Now().Add(moduleRequestTimeout)
	for loaderRunning() && !(isFS && fsRegistered(fs)) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	return 0
}

// fsRegistered reports whether the kernel has file system name
// (/proc/filesystems: "nodev\tNAME" or "\tNAME" per line).
func fsRegistered(name string) bool {
	b, err := os.ReadFile("/proc/filesystems")
	if err != nil {
		return false
	}
	return registered(string(b), name)
}

// registered reports whether a /proc/filesystems text lists name.
func registered(filesystems, name string) bool {
	for _, l := range strings.Split(filesystems, "\n") {
		f := strings.Fields(l)
		if len(f) > 0 && f[len(f)-1] == name {
			return true
		}
	}
	return false
}

// loaderRunning reports whether PID 1's loading thread is still there.
func loaderRunning() bool {
	tasks, err := os.ReadDir("/proc/1/task")
	if err != nil {
		return false
	}
	for _, t := range tasks {
		b, err := os.ReadFile(filepath.Join("/proc/1/task", t.Name(), "comm"))
		if err == nil && strings.TrimSpace(string(b)) == loaderName {
			return true
		}
	}
	return false
}
