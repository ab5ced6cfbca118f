package main

import (
	"fmt"
	"os"

	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
)

var setupCommand = cli.Command{
	Name:  "setup",
	Usage: "put a guest kernel for VM mode into the cache directory",
	Description: `Downloads Debian's generic kernel package for the architecture with
   apt-get and unpacks it under cache_dir/kernels/ARCH; the host's /boot is
   not touched. Does nothing when a kernel is already there.`,
	Flags: []cli.Flag{cli.StringFlag{Name: "arch", Value: vm.HostArch(), Usage: "guest architecture: x86_64 or aarch64"}},
	Action: withEnv(func(ctx *cli.Context, e *env) error {
		k, err := vm.Setup(e.cfg.CacheDir, ctx.String("arch"), os.Stderr)
		if err != nil {
			return err
		}
		fmt.Printf("guest kernel %s\n  image:   %s\n  modules: %s\n", k.Release, k.Image, k.ModulesDir)
		return nil
	}),
}
