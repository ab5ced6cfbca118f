package main

import (
	"context"
	"fmt"
	"os"

	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/vm"
	"github.com/kiwi-shim/kiwi-shim/pkg/vmmode"
)

var setupCommand = cli.Command{
	Name:  "setup",
	Usage: "put a guest kernel for VM mode into the cache directory",
	Description: `Downloads Debian's kernel package of the configured series and flavour
   (vm.kernel_version, default 6.12; vm.kernel_flavour, default generic)
   for the architecture with apt-get and unpacks it under
   cache_dir/kernels/ARCH/VERSION-FLAVOUR; the host's /boot is not
   touched. Does nothing when such a kernel is already there.
   --kernel-version and --kernel-flavour fetch another one without
   changing which one VMs boot.

   --template also makes the VM template of the configured kernel and
   the default guest size (vm.memory, vm.cpus): a guest booted once and
   saved in cache_dir/templates (or vm.template_dir), which boxes are
   restored from instead of booting when vm.template = "auto". Without
   it, the first such box makes the template.`,
	Flags: []cli.Flag{
		cli.StringFlag{Name: "arch", Value: vm.HostArch(), Usage: "guest architecture: x86_64 or aarch64"},
		cli.StringFlag{Name: "kernel-version", Usage: "kernel series, e.g. 6.12 or 6.1 (default: vm.kernel_version)"},
		cli.StringFlag{Name: "kernel-flavour", Usage: "generic or cloud (default: vm.kernel_flavour)"},
		cli.BoolFlag{Name: "template", Usage: "also make the VM template of the configured kernel and default guest size"},
	},
	Action: withEnv(func(ctx *cli.Context, e *env) error {
		c := vmmode.KernelChoice(e.cfg.VM)
		if v := ctx.String("kernel-version"); v != "" {
			c.Version = v
		}
		if f := ctx.String("kernel-flavour"); f != "" {
			c.Flavour = f
		}
		k, err := vm.Setup(context.Background(), e.cfg.CacheDir, ctx.String("arch"), c, os.Stderr)
		if err != nil {
			return err
		}
		fmt.Printf("guest kernel %s\n  image:   %s\n  modules: %s\n", k.Release, k.Image, k.ModulesDir)
		// Unpacked now, so that the first box does not wait for it.
		boot, err := vm.BootImage(k.Image, ctx.String("arch"), e.cfg.CacheDir)
		if err != nil {
			fmt.Printf("  boots:   %s (not unpacked: %v)\n", boot, err)
		} else {
			fmt.Printf("  boots:   %s\n", boot)
		}
		if !ctx.Bool("template") {
			return nil
		}
		t, made, err := e.vmManager(ctx).MakeTemplate(context.Background(), ctx.String("arch"))
		if err != nil {
			return err
		}
		state := "there already"
		if made {
			state = "made now"
		}
		fmt.Printf("vm template (%s)\n  file:    %s\n  size:    %d bytes\n", state, t.Path, t.Size)
		return nil
	}),
}
