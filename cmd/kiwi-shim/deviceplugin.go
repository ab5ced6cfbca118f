package main

import (
	"context"
	"os/signal"
	"syscall"

	"github.com/urfave/cli"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/kiwi-shim/kiwi-shim/pkg/config"
	"github.com/kiwi-shim/kiwi-shim/pkg/deviceplugin"
)

var devicePluginCommand = cli.Command{
	Name:  "device-plugin",
	Usage: "serve the host's loop capacity to the kubelet as the resource " + deviceplugin.ResourceName,
	Description: `A Kubernetes device plugin (kubelet device plugin API v1beta1). It
   registers with the kubelet at --kubelet-socket, serves its own socket
   (--endpoint) in that directory, and advertises ` + deviceplugin.ResourceName + `
   with --devices devices (default: the loop capacity of this host's
   allocator, loop.capacity in the config file or ` + config.EnvLoopCapacity + `).
   It registers again whenever the kubelet restarts, and stops on SIGTERM
   or SIGINT.

   A pod that requests N gets N loop devices leased from the host's
   allocator (loop.dir, ` + config.EnvLoopDir + `: the one every kiwi-shim box
   of this host uses), passed to kiwi-shim in the annotation
   io.kiwi-shim.loop.lease; the box's keeper adopts that lease and frees
   it when the container ends. A lease that no container adopts is freed
   when the kubelet reuses its devices or after --adopt-timeout. Run it
   as root, with the kubelet's device plugin directory and the
   allocator directory (and /dev, /sys) of the host.`,
	Flags: []cli.Flag{
		cli.StringFlag{Name: "kubelet-socket", Value: pluginapi.KubeletSocket, Usage: "the kubelet's registration socket; the plugin's socket goes into its directory"},
		cli.StringFlag{Name: "endpoint", Value: deviceplugin.DefaultEndpoint, Usage: "file name of the plugin's socket"},
		cli.IntFlag{Name: "devices", Usage: "devices to advertise (default: the loop capacity); for several kubelets on one host sharing its loop devices"},
		cli.DurationFlag{Name: "adopt-timeout", Value: deviceplugin.DefaultAdoptTimeout, Usage: "free an allocation's lease when no container adopted it within this time"},
		cli.DurationFlag{Name: "allocate-timeout", Value: deviceplugin.DefaultAllocateTimeout, Usage: "how long an allocation waits for devices held by ending pods or other boxes"},
	},
	Action: withEnv(func(ctx *cli.Context, e *env) error {
		a, err := e.allocator()
		if err != nil {
			return err
		}
		p, err := deviceplugin.New(deviceplugin.Options{
			Alloc:           a,
			KubeletSocket:   ctx.String("kubelet-socket"),
			Endpoint:        ctx.String("endpoint"),
			Devices:         ctx.Int("devices"),
			AdoptTimeout:    ctx.Duration("adopt-timeout"),
			AllocateTimeout: ctx.Duration("allocate-timeout"),
			Logger:          e.log,
		})
		if err != nil {
			return err
		}
		sctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
		defer stop()
		return p.Run(sctx)
	}),
}
