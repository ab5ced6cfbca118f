//go:build tools

// Package tools records the commands the integration tests build from
// the module proxy (containerd, ctr and the runc shim of the containerd
// kiwi-shim depends on, and go-fuse's loopback example), so that their
// dependencies are in go.sum and `make deps` downloads them.
package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
	_ "github.com/hanwen/go-fuse/v2/example/loopback"
)
