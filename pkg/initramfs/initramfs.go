// Package initramfs builds the guest's initramfs: kiwi-box-init as /init
// plus the closure of kernel modules the box needs, as a newc cpio
// archive, cached by kernel and init identity so that only the first start
// on a kernel pays for it.
package initramfs
