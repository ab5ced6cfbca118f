package vmshare

// FUSE opcodes, as linux/fuse.h numbers them (go-fuse keeps its own
// unexported): the ones Quick tells apart and the ones the tests send.
const (
	opLookup      = 1  // FUSE_LOOKUP
	opForget      = 2  // FUSE_FORGET
	opGetattr     = 3  // FUSE_GETATTR
	opSetattr     = 4  // FUSE_SETATTR
	opReadlink    = 5  // FUSE_READLINK
	opSymlink     = 6  // FUSE_SYMLINK
	opMknod       = 8  // FUSE_MKNOD
	opMkdir       = 9  // FUSE_MKDIR
	opUnlink      = 10 // FUSE_UNLINK
	opLink        = 13 // FUSE_LINK
	opOpen        = 14 // FUSE_OPEN
	opRead        = 15 // FUSE_READ
	opWrite       = 16 // FUSE_WRITE
	opStatfs      = 17 // FUSE_STATFS
	opRelease     = 18 // FUSE_RELEASE
	opFsync       = 20 // FUSE_FSYNC
	opSetxattr    = 21 // FUSE_SETXATTR
	opGetxattr    = 22 // FUSE_GETXATTR
	opListxattr   = 23 // FUSE_LISTXATTR
	opRemovexattr = 24 // FUSE_REMOVEXATTR
	opFlush       = 25 // FUSE_FLUSH
	opInit        = 26 // FUSE_INIT
	opOpendir     = 27 // FUSE_OPENDIR
	opReleasedir  = 29 // FUSE_RELEASEDIR
	opAccess      = 34 // FUSE_ACCESS
	opCreate      = 35 // FUSE_CREATE
	opBatchForget = 42 // FUSE_BATCH_FORGET
	opReaddirplus = 44 // FUSE_READDIRPLUS
	opRename2     = 45 // FUSE_RENAME2
)
