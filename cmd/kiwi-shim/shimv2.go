package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/manager"
	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/task"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/containerd/v2/plugins"
	runc "github.com/containerd/go-runc"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
)

// ShimName is the name containerd runs the kiwi-shim binary under for
// the runtime io.containerd.kiwi.v2 (make install makes the link).
const ShimName = "containerd-shim-kiwi-v2"

// shimRoot is the state root the shim gives kiwi-shim (per namespace
// below it), apart from podman's and the host runc's.
const shimRoot = "/run/kiwi-shim/containerd"

// runShimV2 is main for containerd-shim-kiwi-v2: containerd's own runc
// shim (task service, reaper, IO, rootfs mounts, events) driving the
// kiwi-shim OCI CLI instead of runc, so that both modes behave exactly as
// they do under podman. The only additions: the runtime defaults to this
// kiwi-shim binary with its own root when containerd passes no runc
// options (ctr, a CRI runtime without an options table), and options of
// another type, on which the runc shim would crash, are replaced.
func runShimV2() {
	self, err := os.Executable()
	if err == nil {
		self, err = filepath.EvalSymlinks(self)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", ShimName, err)
		os.Exit(1)
	}
	// go-runc's default command, used by the shim's `delete` action and
	// -info when there are no options.
	runc.DefaultCommand = self
	registry.Register(&plugin.Registration{
		Type:     plugins.TTRPCPlugin,
		ID:       "task",
		Requires: []plugin.Type{plugins.EventPlugin, plugins.InternalPlugin},
		InitFn: func(ic *plugin.InitContext) (any, error) {
			pub, err := ic.GetByID(plugins.EventPlugin, "publisher")
			if err != nil {
				return nil, err
			}
			sd, err := ic.GetByID(plugins.InternalPlugin, "shutdown")
			if err != nil {
				return nil, err
			}
			ts, err := task.NewTaskService(ic.Context, pub.(shim.Publisher), sd.(shutdown.Service))
			if err != nil {
				return nil, err
			}
			return &kiwiTask{TTRPCTaskService: ts, binary: self}, nil
		},
	})
	shim.RunShim(context.Background(), manager.NewShimManager("io.containerd.kiwi.v2"))
}

// kiwiTask is the runc shim's task service with kiwi-shim's defaults.
type kiwiTask struct {
	taskAPI.TTRPCTaskService
	binary string
}

// Create fills in the runtime options before the runc shim reads them.
func (k *kiwiTask) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (*taskAPI.CreateTaskResponse, error) {
	opts := &options.Options{}
	if r.Options.GetValue() != nil {
		if v, err := typeurl.UnmarshalAny(r.Options); err == nil {
			if o, ok := v.(*options.Options); ok {
				opts = o
			}
		}
	}
	if opts.BinaryName == "" {
		opts.BinaryName = k.binary
	}
	if opts.Root == "" {
		opts.Root = shimRoot
	}
	a, err := typeurl.MarshalAnyToProto(opts)
	if err != nil {
		return nil, fmt.Errorf("runtime options: %w", err)
	}
	r.Options = a
	return k.TTRPCTaskService.Create(ctx, r)
}

// RegisterTTRPC serves the wrapped service.
func (k *kiwiTask) RegisterTTRPC(s *ttrpc.Server) error {
	taskAPI.RegisterTTRPCTaskService(s, k)
	return nil
}
