package main

import (
	"encoding/json"
	"os"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/opencontainers/runtime-spec/specs-go/features"
	"github.com/urfave/cli"

	"github.com/kiwi-shim/kiwi-shim/pkg/oci"
)

var featuresCommand = cli.Command{
	Name:  "features",
	Usage: "print what this runtime supports, as runtime-spec features JSON",
	Action: func(*cli.Context) error {
		yes := true
		f := features.Features{
			OCIVersionMin: "1.0.0",
			OCIVersionMax: specs.Version,
			Hooks:         []string{"prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"},
			MountOptions:  []string{"ro", "rw", "bind", "rbind", "nosuid", "nodev", "noexec", "relatime", "private", "rprivate", "slave", "rslave", "shared", "rshared"},
			Linux: &features.Linux{
				Namespaces: []string{"cgroup", "ipc", "mount", "network", "pid", "user", "uts"},
				Cgroup:     &features.Cgroup{V1: &yes, V2: &yes, Systemd: &yes},
			},
			Annotations: map[string]string{
				"io.kiwi-shim.annotations": oci.AnnotationMode + " " + oci.AnnotationLoopCount + " " + oci.AnnotationLoopTimeout + " " +
					oci.AnnotationLoopControl + " " + oci.AnnotationVMMemory + " " + oci.AnnotationVMCPUs + " " + oci.AnnotationVMArch + " " +
					oci.AnnotationVMScratch + " " + oci.AnnotationVMDNS + " " + oci.AnnotationShare + " " + oci.AnnotationShareCache + " " + oci.AnnotationShareMapped + " " + oci.AnnotationLoopLease,
				"io.kiwi-shim.modes":   "container",
				"io.kiwi-shim.version": version,
			},
		}
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "    ")
		return enc.Encode(f)
	},
}
