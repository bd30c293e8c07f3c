"""The kernel FUSE ABI, mirrored from linux/fuse.h (protocol 7.38, plus the passthrough parts of
7.40: FUSE_PASSTHROUGH, FOPEN_PASSTHROUGH, fuse_open_out.backing_id, fuse_init_out.max_stack_depth
and the backing-file ioctls): opcodes, flags and the binary layout of every structure fuseclone
reads or writes. Only data, no behaviour.

Every structure is little-endian and padded to 64 bits, exactly as in the header; each `Struct`
below is named after the C structure it mirrors and lists its fields in the same order.
"""

from __future__ import annotations

import enum
import struct

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 38
PASSTHROUGH_MINOR_VERSION = 40  # the protocol a mount speaks once it negotiated passthrough
ROOT_ID = 1
MIN_READ_BUFFER = 8192


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42  # no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51


class NotifyCode(enum.IntEnum):
    """What a notification (a message the daemon sends unasked: unique 0) is; its code goes
    where a reply carries its error."""
    INVAL_INODE = 2


# fuse_init_in/out flags (bits 32..63 travel in flags2)
FUSE_ASYNC_READ = 1 << 0
FUSE_POSIX_LOCKS = 1 << 1
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_EXPORT_SUPPORT = 1 << 4
FUSE_BIG_WRITES = 1 << 5
FUSE_DONT_MASK = 1 << 6
FUSE_SPLICE_WRITE = 1 << 7
FUSE_SPLICE_MOVE = 1 << 8
FUSE_SPLICE_READ = 1 << 9
FUSE_FLOCK_LOCKS = 1 << 10
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_NO_OPEN_SUPPORT = 1 << 17
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_HANDLE_KILLPRIV = 1 << 19
FUSE_POSIX_ACL = 1 << 20
FUSE_ABORT_ERROR = 1 << 21
FUSE_MAX_PAGES = 1 << 22
FUSE_CACHE_SYMLINKS = 1 << 23
FUSE_NO_OPENDIR_SUPPORT = 1 << 24
FUSE_EXPLICIT_INVAL_DATA = 1 << 25
FUSE_INIT_EXT = 1 << 30
FUSE_DIRECT_IO_ALLOW_MMAP = 1 << 36  # 7.39: shared mmap of a FOPEN_DIRECT_IO open
FUSE_PASSTHROUGH = 1 << 37  # 7.40: opens may name a backing file for reads and writes

# fuse_write_in.write_flags
FUSE_WRITE_CACHE = 1 << 0  # the write is the kernel writing back its cache

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7  # 7.40: fuse_open_out.backing_id serves this open's I/O

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

FUSE_FSYNC_FDATASYNC = 1 << 0
FUSE_GETATTR_FH = 1 << 0

# fallocate(2) modes that reach FUSE_FALLOCATE
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# struct layouts, in the header's field order
in_header = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
out_header = struct.Struct("<IiQ")  # len error unique
attr = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks atime mtime ctime *nsec mode nlink uid gid rdev blksize flags
kstatfs = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize padding spare[6]
entry_out_head = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec
attr_out_head = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
forget_in = struct.Struct("<Q")  # nlookup
forget_one = struct.Struct("<QQ")  # nodeid nlookup
batch_forget_in = struct.Struct("<II")  # count dummy
getattr_in = struct.Struct("<IIQ")  # getattr_flags dummy fh
setattr_in = struct.Struct("<IIQQQQQQIIIIIIII")  # valid padding fh size lock_owner atime mtime ctime *nsec mode unused4 uid gid unused5
open_in = struct.Struct("<II")  # flags open_flags
open_out = struct.Struct("<QIi")  # fh open_flags backing_id (7.40; padding before)
release_in = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
flush_in = struct.Struct("<QIIQ")  # fh unused padding lock_owner
read_in = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
write_in = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding
write_out = struct.Struct("<II")  # size padding
fsync_in = struct.Struct("<QII")  # fh fsync_flags padding
access_in = struct.Struct("<II")  # mask padding
init_in_head = struct.Struct("<IIII")  # major minor max_readahead flags (flags2 follows from 7.36)
init_out = struct.Struct("<IIIIHHIIHHII24x")  # major minor max_readahead flags max_background congestion_threshold max_write time_gran max_pages map_alignment flags2 max_stack_depth (7.40) unused[6]
interrupt_in = struct.Struct("<Q")  # unique
fallocate_in = struct.Struct("<QQQII")  # fh offset length mode padding
lseek_in = struct.Struct("<QQII")  # fh offset whence padding
lseek_out = struct.Struct("<Q")  # offset
dirent_head = struct.Struct("<QQII")  # ino off namelen type
notify_inval_inode_out = struct.Struct("<Qqq")  # ino off len (len 0: to the end)
backing_map = struct.Struct("<iIQ")  # fd flags padding (7.40)

# ioctls of /dev/fuse (7.40): _IOW(FUSE_DEV_IOC_MAGIC, nr, type)
FUSE_DEV_IOC_MAGIC = 229


def _iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (FUSE_DEV_IOC_MAGIC << 8) | nr


FUSE_DEV_IOC_BACKING_OPEN = _iow(1, backing_map.size)  # struct fuse_backing_map -> backing id
FUSE_DEV_IOC_BACKING_CLOSE = _iow(2, 4)  # uint32_t backing id
# The stacking depth a passthrough mount declares: 1, its backing files lie on a filesystem that
# stacks on nothing (ext4, xfs...), and nothing may stack on the mount itself.
PASSTHROUGH_STACK_DEPTH = 1


def rec_align(n: int) -> int:
    """FUSE_REC_ALIGN: variable-length records are padded to 8 bytes."""
    return (n + 7) & ~7
