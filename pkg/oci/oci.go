// Package oci reads and checks what an OCI runtime is handed: container
// ids, bundles (config.json) and kiwi-shim's io.kiwi-shim.* annotations.
// Everything here treats its input as untrusted: sizes are bounded and
// every rejection is a one-line error that names the problem.
package oci
