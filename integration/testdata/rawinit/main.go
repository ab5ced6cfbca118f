// Command rawinit is the minimal init of the raw QEMU boot that the VM
// start benchmark compares kiwi-shim with: it prints one line on the
// console and powers off.
package main

import (
	"os"

	"golang.org/x/sys/unix"
)

func main() {
	os.Stdout.WriteString("ready\n")
	unix.Sync()
	unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}
