"""The kernel FUSE protocol as a sans-IO codec: request bytes in, typed requests out; typed
replies in, bytes out. No file descriptors and no trio here, so every path is testable with
plain byte strings.

`parse_request(buf)` turns one message read from /dev/fuse into a `Request` subclass (or
`Unsupported` for opcodes fuseclone does not serve). A message that is short or inconsistent
raises `MalformedRequest`, which carries the request's `unique` when the header was readable so
the session can still answer it with an error. Replies are built by `encode_reply(unique,
reply)` and `encode_error(unique, errno)`, which return a list of buffers for writev(2).
"""

from __future__ import annotations

import errno as errno_codes
from dataclasses import dataclass, fields
from typing import Callable, ClassVar

from . import abi
from .abi import Opcode


def _wire(cls: type) -> type:
    """A wire structure: a slotted dataclass whose repr and == come from the two functions below
    instead of being generated for each of the codec's 35 classes (generating them took 5 of the
    12 ms this module's import took, on every start of a mount)."""
    cls = dataclass(slots=True, repr=False, eq=False)(cls)
    cls.__repr__ = _repr
    cls.__eq__ = _eq
    cls.__hash__ = None  # mutable, compared by value: like a dataclass with eq
    return cls


def _repr(self) -> str:
    shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
    return f"{type(self).__qualname__}({shown})"


def _eq(self, other: object) -> bool:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return all(getattr(self, f.name) == getattr(other, f.name) for f in fields(self))


class MalformedRequest(ValueError):
    """A request the codec cannot decode. `unique` is None when even the header was short."""

    def __init__(self, message: str, unique: int | None = None, opcode: int | None = None) -> None:
        super().__init__(message)
        self.unique = unique
        self.opcode = opcode


# ---- requests -------------------------------------------------------------------------------


@_wire
class Request:
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int

    opcode: ClassVar[int] = 0
    #: FORGET and BATCH_FORGET are never answered
    expects_reply: ClassVar[bool] = True


@_wire
class Init(Request):
    major: int
    minor: int
    max_readahead: int
    flags: int  # flags | flags2 << 32
    opcode: ClassVar[int] = Opcode.INIT


@_wire
class Destroy(Request):
    opcode: ClassVar[int] = Opcode.DESTROY


@_wire
class Lookup(Request):
    name: bytes
    opcode: ClassVar[int] = Opcode.LOOKUP


@_wire
class Forget(Request):
    nlookup: int
    opcode: ClassVar[int] = Opcode.FORGET
    expects_reply: ClassVar[bool] = False


@_wire
class BatchForget(Request):
    forgets: list[tuple[int, int]]  # (nodeid, nlookup)
    opcode: ClassVar[int] = Opcode.BATCH_FORGET
    expects_reply: ClassVar[bool] = False


@_wire
class GetAttr(Request):
    flags: int
    fh: int
    opcode: ClassVar[int] = Opcode.GETATTR


@_wire
class SetAttr(Request):
    valid: int  # FATTR_* bits saying which fields are set
    fh: int
    size: int
    mode: int
    uid_new: int
    gid_new: int
    opcode: ClassVar[int] = Opcode.SETATTR


@_wire
class Open(Request):
    flags: int
    opcode: ClassVar[int] = Opcode.OPEN


@_wire
class OpenDir(Request):
    flags: int
    opcode: ClassVar[int] = Opcode.OPENDIR


@_wire
class Read(Request):
    fh: int
    offset: int
    size: int
    open_flags: int = 0  # the file's open(2) flags: O_DIRECT says the kernel keeps no copy
    opcode: ClassVar[int] = Opcode.READ


@_wire
class Write(Request):
    fh: int
    offset: int
    data: memoryview
    write_flags: int
    open_flags: int = 0  # the file's open(2) flags: O_DIRECT says the writer keeps no copy
    opcode: ClassVar[int] = Opcode.WRITE


@_wire
class ReadDir(Request):
    fh: int
    offset: int
    size: int
    plus: bool
    opcode: ClassVar[int] = Opcode.READDIR


@_wire
class Release(Request):
    fh: int
    flags: int
    opcode: ClassVar[int] = Opcode.RELEASE


@_wire
class ReleaseDir(Request):
    fh: int
    opcode: ClassVar[int] = Opcode.RELEASEDIR


@_wire
class Flush(Request):
    fh: int
    opcode: ClassVar[int] = Opcode.FLUSH


@_wire
class Fsync(Request):
    fh: int
    datasync: bool
    opcode: ClassVar[int] = Opcode.FSYNC


@_wire
class StatFs(Request):
    opcode: ClassVar[int] = Opcode.STATFS


@_wire
class Fallocate(Request):
    fh: int
    offset: int
    length: int
    mode: int
    opcode: ClassVar[int] = Opcode.FALLOCATE


@_wire
class Lseek(Request):
    fh: int
    offset: int
    whence: int
    opcode: ClassVar[int] = Opcode.LSEEK


@_wire
class Interrupt(Request):
    target: int  # unique of the request to interrupt
    opcode: ClassVar[int] = Opcode.INTERRUPT
    expects_reply: ClassVar[bool] = False


@_wire
class Access(Request):
    mask: int
    opcode: ClassVar[int] = Opcode.ACCESS


@_wire
class Unsupported(Request):
    """Any opcode fuseclone does not serve: answered ENOSYS."""

    code: int = 0


# ---- parsing --------------------------------------------------------------------------------


def _fixed(layout, build: Callable) -> Callable:
    """A parser for a request whose body is one fixed structure."""

    def parse(head: tuple, body: memoryview) -> Request:
        if len(body) < layout.size:
            raise ValueError(f"body of {len(body)} bytes, need {layout.size}")
        return build(head, layout.unpack_from(body))

    return parse


def _name(body: memoryview) -> bytes:
    raw = bytes(body)
    end = raw.find(b"\0")
    if end < 0:
        raise ValueError("name is not NUL-terminated")
    return raw[:end]


def _init(head: tuple, body: memoryview) -> Init:
    if len(body) < abi.init_in_head.size:
        raise ValueError("short INIT")
    major, minor, max_readahead, flags = abi.init_in_head.unpack_from(body)
    if (flags & abi.FUSE_INIT_EXT) and len(body) >= abi.init_in_head.size + 4:
        flags |= int.from_bytes(body[16:20], "little") << 32
    return Init(*head, major, minor, max_readahead, flags)


def _write(head: tuple, body: memoryview) -> Write:
    if len(body) < abi.write_in.size:
        raise ValueError("short WRITE")
    fh, offset, size, write_flags, _owner, open_flags, _pad = abi.write_in.unpack_from(body)
    data = body[abi.write_in.size:]
    if len(data) < size:
        raise ValueError(f"WRITE of {size} bytes carries only {len(data)}")
    return Write(*head, fh, offset, data[:size], write_flags, open_flags)


def _getattr(head: tuple, body: memoryview) -> GetAttr:
    if len(body) < abi.getattr_in.size:  # the body is optional before 7.9: no fh then
        return GetAttr(*head, 0, 0)
    flags, _dummy, fh = abi.getattr_in.unpack_from(body)
    return GetAttr(*head, flags, fh)


def _batch_forget(head: tuple, body: memoryview) -> BatchForget:
    if len(body) < abi.batch_forget_in.size:
        raise ValueError("short BATCH_FORGET")
    count, _ = abi.batch_forget_in.unpack_from(body)
    start = abi.batch_forget_in.size
    if len(body) < start + count * abi.forget_one.size:
        raise ValueError("BATCH_FORGET shorter than its count")
    return BatchForget(*head, [abi.forget_one.unpack_from(body, start + i * abi.forget_one.size)
                               for i in range(count)])


_PARSERS: dict[int, Callable[[tuple, memoryview], Request]] = {
    Opcode.INIT: _init,
    Opcode.DESTROY: lambda head, body: Destroy(*head),
    Opcode.LOOKUP: lambda head, body: Lookup(*head, _name(body)),
    Opcode.FORGET: _fixed(abi.forget_in, lambda h, f: Forget(*h, f[0])),
    Opcode.BATCH_FORGET: _batch_forget,
    Opcode.GETATTR: _getattr,
    Opcode.SETATTR: _fixed(abi.setattr_in, lambda h, f: SetAttr(*h, f[0], f[2], f[3], f[11], f[13], f[14])),
    Opcode.OPEN: _fixed(abi.open_in, lambda h, f: Open(*h, f[0])),
    Opcode.OPENDIR: _fixed(abi.open_in, lambda h, f: OpenDir(*h, f[0])),
    Opcode.READ: _fixed(abi.read_in, lambda h, f: Read(*h, f[0], f[1], f[2], f[5])),
    Opcode.WRITE: _write,
    Opcode.READDIR: _fixed(abi.read_in, lambda h, f: ReadDir(*h, f[0], f[1], f[2], False)),
    Opcode.READDIRPLUS: _fixed(abi.read_in, lambda h, f: ReadDir(*h, f[0], f[1], f[2], True)),
    Opcode.RELEASE: _fixed(abi.release_in, lambda h, f: Release(*h, f[0], f[1])),
    Opcode.RELEASEDIR: _fixed(abi.release_in, lambda h, f: ReleaseDir(*h, f[0])),
    Opcode.FLUSH: _fixed(abi.flush_in, lambda h, f: Flush(*h, f[0])),
    Opcode.FSYNC: _fixed(abi.fsync_in, lambda h, f: Fsync(*h, f[0], bool(f[1] & abi.FUSE_FSYNC_FDATASYNC))),
    Opcode.STATFS: lambda head, body: StatFs(*head),
    Opcode.FALLOCATE: _fixed(abi.fallocate_in, lambda h, f: Fallocate(*h, f[0], f[1], f[2], f[3])),
    Opcode.LSEEK: _fixed(abi.lseek_in, lambda h, f: Lseek(*h, f[0], f[1], f[2])),
    Opcode.INTERRUPT: _fixed(abi.interrupt_in, lambda h, f: Interrupt(*h, f[0])),
    Opcode.ACCESS: _fixed(abi.access_in, lambda h, f: Access(*h, f[0])),
}


def parse_request(buf: bytes | bytearray | memoryview) -> Request:
    """Decode one message read from /dev/fuse. WRITE data is a memoryview into `buf`."""
    view = memoryview(buf)
    if len(view) < abi.in_header.size:
        raise MalformedRequest(f"request of {len(view)} bytes is shorter than its header")
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = abi.in_header.unpack_from(view)
    if length != len(view) or length < abi.in_header.size + extlen * 8:
        raise MalformedRequest(f"request length {length} does not match the {len(view)} bytes read",
                               unique, opcode)
    head = (unique, nodeid, uid, gid, pid)
    # Extensions (security contexts, supplementary groups) trail the body; fuseclone uses none.
    body = view[abi.in_header.size : length - extlen * 8]
    parser = _PARSERS.get(opcode)
    if parser is None:
        return Unsupported(*head, code=opcode)
    try:
        return parser(head, body)
    except (ValueError, IndexError) as exc:  # struct.error is a ValueError
        name = Opcode(opcode).name if opcode in Opcode._value2member_map_ else str(opcode)
        raise MalformedRequest(f"malformed {name} request: {exc}", unique, opcode) from None


# ---- replies --------------------------------------------------------------------------------


@_wire
class Attr:
    ino: int
    size: int
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    blocks: int = 0
    atime: float = 0.0
    mtime: float = 0.0
    ctime: float = 0.0
    blksize: int = 4096

    def pack(self) -> bytes:
        secs = [int(t) for t in (self.atime, self.mtime, self.ctime)]
        nsecs = [int((t - int(t)) * 1e9) for t in (self.atime, self.mtime, self.ctime)]
        return abi.attr.pack(self.ino, self.size, self.blocks, *secs, *nsecs, self.mode,
                             self.nlink, self.uid, self.gid, 0, self.blksize, 0)


def _split_seconds(seconds: float) -> tuple[int, int]:
    return int(seconds), int((seconds - int(seconds)) * 1e9)


class Reply:
    """A successful answer; `payload()` returns the buffers that follow the out header."""

    def payload(self) -> list:
        raise NotImplementedError


@_wire
class EmptyReply(Reply):
    def payload(self) -> list:
        return []


@_wire
class DataReply(Reply):
    data: bytes | bytearray | memoryview

    def payload(self) -> list:
        return [self.data]


@_wire
class EntryReply(Reply):
    nodeid: int
    attr: Attr
    entry_valid: float
    attr_valid: float
    generation: int = 0

    def pack(self) -> bytes:
        ev, evn = _split_seconds(self.entry_valid)
        av, avn = _split_seconds(self.attr_valid)
        return abi.entry_out_head.pack(self.nodeid, self.generation, ev, av, evn, avn) + self.attr.pack()

    def payload(self) -> list:
        return [self.pack()]


@_wire
class AttrReply(Reply):
    attr: Attr
    attr_valid: float

    def payload(self) -> list:
        av, avn = _split_seconds(self.attr_valid)
        return [abi.attr_out_head.pack(av, avn, 0) + self.attr.pack()]


@_wire
class OpenReply(Reply):
    fh: int
    open_flags: int = 0
    backing_id: int = 0  # with FOPEN_PASSTHROUGH: the registered backing file serving this open

    def payload(self) -> list:
        return [abi.open_out.pack(self.fh, self.open_flags, self.backing_id)]


@_wire
class WriteReply(Reply):
    size: int

    def payload(self) -> list:
        return [abi.write_out.pack(self.size, 0)]


@_wire
class StatFsReply(Reply):
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int = 4096
    namelen: int = 255

    def payload(self) -> list:
        return [abi.kstatfs.pack(self.blocks, self.bfree, self.bavail, self.files, self.ffree,
                                 self.bsize, self.namelen, self.bsize, 0)]


@_wire
class LseekReply(Reply):
    offset: int

    def payload(self) -> list:
        return [abi.lseek_out.pack(self.offset)]


@_wire
class InitReply(Reply):
    minor: int
    max_readahead: int
    flags: int
    max_background: int
    congestion_threshold: int
    max_write: int
    max_pages: int
    time_gran: int = 1
    max_stack_depth: int = 0  # with FUSE_PASSTHROUGH: how deep backing filesystems may stack

    def payload(self) -> list:
        flags2 = self.flags >> 32
        return [abi.init_out.pack(abi.KERNEL_VERSION, self.minor, self.max_readahead,
                                  self.flags & 0xFFFFFFFF, self.max_background,
                                  self.congestion_threshold, self.max_write, self.time_gran,
                                  self.max_pages, 0, flags2, self.max_stack_depth)]


@_wire
class DirEntry:
    ino: int
    name: bytes
    kind: int  # DT_* (the S_IFMT bits >> 12)
    entry: EntryReply | None = None  # READDIRPLUS only


@_wire
class DirReply(Reply):
    """Directory entries from index `offset` on, as many as fit in `size` bytes."""

    entries: list[DirEntry]
    offset: int
    size: int
    plus: bool = False

    def payload(self) -> list:
        out = bytearray()
        for index in range(self.offset, len(self.entries)):
            record = _dirent(self.entries[index], index + 1, self.plus)
            if len(out) + len(record) > self.size:
                break
            out += record
        return [bytes(out)]


def _dirent(entry: DirEntry, next_offset: int, plus: bool) -> bytes:
    head = abi.dirent_head.pack(entry.ino, next_offset, len(entry.name), entry.kind) + entry.name
    record = head + bytes(abi.rec_align(len(head)) - len(head))
    if not plus:
        return record
    # "." and ".." carry a zero entry: the kernel does not look them up
    prefix = entry.entry.pack() if entry.entry is not None else bytes(
        abi.entry_out_head.size + abi.attr.size)
    return prefix + record


def encode_reply(unique: int, reply: Reply) -> list:
    """The buffers to writev(2) to /dev/fuse for a successful answer."""
    parts = reply.payload()
    length = abi.out_header.size + sum(len(p) for p in parts)
    return [abi.out_header.pack(length, 0, unique), *parts]


def encode_inval_inode(nodeid: int, offset: int, length: int) -> list:
    """The notification that drops the kernel's cached pages of `length` bytes at `offset`
    of inode `nodeid` (and its cached attributes)."""
    body = abi.notify_inval_inode_out.pack(nodeid, offset, length)
    return [abi.out_header.pack(abi.out_header.size + len(body), abi.NotifyCode.INVAL_INODE, 0),
            body]


def encode_error(unique: int, errno: int) -> list:
    """An error answer; `errno` is positive (the header carries it negated)."""
    if not 0 < errno < 4096:
        errno = errno_codes.EIO
    return [abi.out_header.pack(abi.out_header.size, -errno, unique)]
