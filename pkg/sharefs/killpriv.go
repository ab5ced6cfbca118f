package sharefs

import (
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// The kernel clears a file's set-user-ID bit (and its set-group-ID bit,
// if the file is group-executable) when a process without CAP_FSETID
// writes to it, so that nobody can change a set-id program and keep it
// set-id. A FUSE client leaves that to the server for the writes it
// sends directly (direct I/O: what a share opens write-only, or every
// file with cache=never), marking each with FUSE_WRITE_KILL_SUIDGID; the
// writes it sends from its page cache it prepares itself, with a SETATTR.
// kiwi-sharefs writes as root with CAP_FSETID, so the host's kernel keeps
// the bits: without KillPrivOnWrite, a box's unprivileged process could
// append to a set-user-ID-root program on a share and it stayed
// set-user-ID (found by comparing with runc: 6777 after the write,
// against 0777 on any local file system).

// KillPrivOnWrite wraps the file system of an export so that a write
// marked FUSE_WRITE_KILL_SUIDGID first clears the file's set-id bits as
// the kernel would (through the node's own Setattr, so that a mapped
// export's recorded bits are cleared too). The kernel's removal of
// security.capability on a write happens on the host anyway, since the
// daemon writes the host file. The set-group-ID bit of a file that is not
// group-executable stays: FUSE does not tell the server the writer's
// supplementary groups, which Linux 6.2+ consults for that case.
func KillPrivOnWrite(raw fuse.RawFileSystem) fuse.RawFileSystem { return killPriv{raw} }

type killPriv struct{ fuse.RawFileSystem }

// Write clears the set-id bits first when the client asks.
func (k killPriv) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	if st := k.beforeWrite(cancel, in); !st.Ok() {
		return 0, st
	}
	return k.RawFileSystem.Write(cancel, in, data)
}

// Writev is Write for data in pieces (go-fuse's protocol server calls it
// first).
func (k killPriv) Writev(cancel <-chan struct{}, in *fuse.WriteIn, data [][]byte) (uint32, fuse.Status) {
	if st := k.beforeWrite(cancel, in); !st.Ok() {
		return 0, st
	}
	return k.RawFileSystem.Writev(cancel, in, data)
}

func (k killPriv) beforeWrite(cancel <-chan struct{}, in *fuse.WriteIn) fuse.Status {
	if in.WriteFlags&fuse.WRITE_KILL_SUIDGID == 0 {
		return fuse.OK
	}
	return k.clearSetID(cancel, &in.InHeader, in.Fh)
}

// clearSetID clears the set-id bits of the open file fh of node h.NodeId.
func (k killPriv) clearSetID(cancel <-chan struct{}, h *fuse.InHeader, fh uint64) fuse.Status {
	var attr fuse.AttrOut
	if st := k.GetAttr(cancel, &fuse.GetAttrIn{InHeader: *h, Flags_: fuse.FUSE_GETATTR_FH, Fh_: fh}, &attr); !st.Ok() {
		return st
	}
	mode := attr.Mode & 07777
	kill := uint32(unix.S_ISUID)
	if mode&unix.S_IXGRP != 0 {
		kill |= unix.S_ISGID
	}
	if mode&kill == 0 {
		return fuse.OK
	}
	in := fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{InHeader: *h, Valid: fuse.FATTR_MODE | fuse.FATTR_FH, Fh: fh, Mode: mode &^ kill}}
	var out fuse.AttrOut
	return k.SetAttr(cancel, &in, &out)
}
