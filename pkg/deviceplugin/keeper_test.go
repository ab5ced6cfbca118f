package deviceplugin

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kiwi-shim/kiwi-shim/pkg/containermode"
	"github.com/kiwi-shim/kiwi-shim/pkg/loopdev"
)

// TestKeeperAdoptsTheAllocation runs a box's keeper (containermode.Keep,
// as `kiwi-shim loop-keeper --lease` runs it) on an allocation's
// annotation: it reports exactly the allocated devices to create (which
// puts them, and only them, into the container's spec), holds them while
// the container's process lives, and frees them when it exits.
func TestKeeperAdoptsTheAllocation(t *testing.T) {
	e := newEnv(t, 4, 4)
	k := startKubelet(t, e.kubelet)
	p, _ := e.run(t, Options{})
	k.registered(t)
	c := dial(t, filepath.Join(e.dir, DefaultEndpoint))
	lease := allocate(t, c, slotPrefix+"0", slotPrefix+"3")

	box := exec.Command("sleep", "infinity")
	if err := box.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { box.Process.Kill(); box.Wait() })

	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	kept := make(chan error, 1)
	go func() {
		kept <- containermode.Keep(context.Background(), containermode.KeepOptions{
			Lease: func(ctx context.Context) (*loopdev.Lease, error) {
				return Adopt(ctx, e.alloc, HandoverDir(e.loopDir), lease, "box-1")
			},
			Owner: "box-1", Log: p.log,
		}, inR, outW)
		outW.Close()
	}()
	line, err := bufio.NewReader(outR).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	want := "ok"
	for _, d := range lease.Devices {
		want += " /dev/" + d
	}
	if strings.TrimSpace(line) != want {
		t.Fatalf("keeper says %q, want %q", line, want)
	}
	fmt.Fprintf(inW, "pid %d\n", box.Process.Pid)
	inW.Close()
	h := held(t, e.alloc)
	if len(h) != 2 || h[lease.Devices[0]].Owner != "box-1" || h[lease.Devices[1]].Owner != "box-1" {
		t.Fatalf("while the box runs: %+v, want the allocation held by box-1", h)
	}
	box.Process.Kill()
	box.Wait()
	if err := <-kept; err != nil {
		t.Fatal(err)
	}
	if h := held(t, e.alloc); len(h) != 0 {
		t.Errorf("after the box ended: %+v", h)
	}
}
