package vm

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/kiwi-shim/kiwi-shim/pkg/fdutil"
)

const (
	shareFSLog     = "sharefs.log"
	shareFSExports = "sharefs.json"
	shareFSPidFile = "sharefs.pid"
)

// startShareFS starts kiwi-sharefs for the VM's virtio-fs exports, as a
// child that dies with the monitor, and waits until its sockets listen.
// Without exports it returns a nil command and a channel that never
// closes.
func (m *monitor) startShareFS() (*exec.Cmd, <-chan struct{}, error) {
	sf := m.cfg.ShareFS
	if sf == nil || len(sf.Exports) == 0 {
		return nil, nil, nil
	}
	b, err := json.Marshal(sf.Exports)
	if err != nil {
		return nil, nil, err
	}
	exports := filepath.Join(m.dir, shareFSExports)
	if err := os.WriteFile(exports, b, 0o600); err != nil {
		return nil, nil, err
	}
	readyR, readyW, err := os.Pipe()
	if err != nil {
		return nil, nil, err
	}
	defer readyR.Close()
	logPath := filepath.Join(m.dir, shareFSLog)
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, nil, err
	}
	defer logf.Close()
	args := []string{"--log", logPath}
	if sf.Debug {
		args = append(args, "--trace")
	}
	args = append(args, "serve", "--exports", exports, "--ready-fd", "3")
	cmd := exec.Command(sf.Binary, args...)
	cmd.Dir = m.dir // socket names may be relative to it (SocketPath)
	// Its last words (an error exit) go to the log as well.
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{readyW}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	err = fdutil.WithInheritedHidden(cmd.Start)
	readyW.Close()
	if err != nil {
		return nil, nil, fmt.Errorf("start %s: %w", sf.Binary, err)
	}
	os.WriteFile(filepath.Join(m.dir, shareFSPidFile), []byte(strconv.Itoa(cmd.Process.Pid)), 0o600)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(readyR).ReadString('\n')
		line <- s
	}()
	select {
	case s := <-line:
		if s == "ready\n" {
			return cmd, done, nil
		}
	case <-time.After(30 * time.Second):
	}
	cmd.Process.Kill()
	<-done
	return nil, nil, fmt.Errorf("kiwi-sharefs did not start: %s", tail(logPath))
}

// stopShareFS waits for kiwi-sharefs, which exits once QEMU closed its
// connections, and kills it if it does not.
func (m *monitor) stopShareFS(cmd *exec.Cmd, done <-chan struct{}) {
	if cmd == nil {
		return
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		m.log.Warn("kiwi-sharefs still running after QEMU ended: killing it", "id", m.cfg.ID)
		cmd.Process.Kill()
		<-done
	}
}
