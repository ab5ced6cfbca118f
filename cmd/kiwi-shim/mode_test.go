package main

import (
	"flag"
	"io"
	"log/slog"
	"testing"

	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/state"
)

// TestOpenVM: a VM record opens as a VM container, whatever else the
// host has (no runc is looked for); update with nothing to change
// succeeds for it (there is no cgroup to write to).
func TestOpenVM(t *testing.T) {
	e := &env{cfg: config.Default(), root: t.TempDir(), log: slog.New(slog.NewTextHandler(io.Discard, nil)), closeLog: func() {}}
	e.cfg.Container.Runtime = "/nonexistent/runc"
	ctx := cli.NewContext(cli.NewApp(), flag.NewFlagSet("test", flag.ContinueOnError), nil)
	rec := &state.Container{ID: "box", Mode: config.ModeVM}
	c, err := e.open(ctx, rec)
	if err != nil {
		t.Fatal(err)
	}
	vc, ok := c.(*vmContainer)
	if !ok || c.Record() != rec || vc.m.Store.Dir("box") != e.store().Dir("box") {
		t.Fatalf("open(vm record) = %T %+v", c, c)
	}
	if err := c.Update(ctx); err != nil {
		t.Errorf("Update = %v", err)
	}
	// A container-mode record needs the runtime: its absence is the error.
	if _, err := e.open(ctx, &state.Container{ID: "c", Mode: config.ModeContainer}); err == nil {
		t.Error("container-mode record opened without a runtime")
	}
}
