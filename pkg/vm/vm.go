// Package vm runs a container's box: it chooses the kernel and accelerator,
// builds QEMU's command line, and runs the monitor process that owns QEMU,
// talks to kiwi-box-init over the control port and relays stdio.
package vm
