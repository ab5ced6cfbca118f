// Package loopdev hands out the host's loop devices to builds.
//
// An Allocator caps how many loop devices are leased at once (the host's
// capacity), serves requests first come first served across processes, and
// never strands a device: a lease is an OFD lock on a file under the
// allocator's directory, so the kernel releases it when the holding process
// dies, and the next allocator call that finds such a stale lease detaches
// the device and removes its partition nodes before anyone gets it again.
//
// Layout of the allocator directory:
//
//	lock              allocator mutex (OFD lock, held for milliseconds)
//	ticket            the last queue ticket handed out
//	queue/T.wait      one per waiting request, locked by the waiter
//	leases/loopN.lease one per leased device, locked by the holder
//
// Besides its lease, the holder keeps the device's host-wide claim locked
// (Host.ClaimDir/loopN), which every allocator takes before it leases or
// detaches a device: allocators that do not share a directory (a test's
// private one beside the host's) can then neither lease one device twice
// nor detach each other's.
package loopdev
