// Package vhostuser is the back-end side of the vhost-user protocol: it
// takes a virtio device's virtqueues over from QEMU through a unix socket,
// maps the guest's memory from the file descriptors QEMU passes, and
// hands every descriptor chain the guest makes available to a Device.
//
// It implements what QEMU 7.2 and later send to a vhost-user device:
// feature and protocol-feature negotiation (VERSION_1, INDIRECT_DESC,
// EVENT_IDX, REPLY_ACK), SET_MEM_TABLE and ADD/REM_MEM_REG, every vring
// message including GET_VRING_BASE (answered after the ring's requests
// finished, which is what lets a guest power off), VRING_ENABLE, and
// repeated stop/start cycles on one connection. Everything the front end
// or the guest sends is bounds-checked: a malformed message ends the
// connection with an error, a malformed descriptor chain is dropped, and
// neither crashes the process.
package vhostuser
