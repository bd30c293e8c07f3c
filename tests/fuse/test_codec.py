"""The sans-IO FUSE codec with plain byte strings: every request fuseclone serves, malformed
input, and the exact layout of every reply (sizes from linux/fuse.h)."""

import errno
import os
import struct

import pytest
from hypothesis import given, strategies as st

from fuseclone.fuse import abi, codec
from fuseclone.fuse.abi import Opcode


def request(opcode, body=b"", *, unique=7, nodeid=1, uid=1000, gid=100, pid=4242, extlen=0, length=None):
    total = abi.in_header.size + len(body)
    head = abi.in_header.pack(total if length is None else length, opcode, unique, nodeid, uid, gid,
                              pid, extlen, 0)
    return head + body


def test_header_fields_reach_every_request():
    req = codec.parse_request(request(Opcode.GETATTR, abi.getattr_in.pack(abi.FUSE_GETATTR_FH, 0, 9)))
    assert isinstance(req, codec.GetAttr)
    assert (req.unique, req.nodeid, req.uid, req.gid, req.pid) == (7, 1, 1000, 100, 4242)
    assert (req.flags, req.fh) == (abi.FUSE_GETATTR_FH, 9)


def test_init_with_flags2():
    body = abi.init_in_head.pack(7, 40, 131072, abi.FUSE_ASYNC_READ | abi.FUSE_INIT_EXT) + struct.pack("<I", 3) + bytes(44)
    req = codec.parse_request(request(Opcode.INIT, body))
    assert isinstance(req, codec.Init)
    assert (req.major, req.minor, req.max_readahead) == (7, 40, 131072)
    assert req.flags == abi.FUSE_ASYNC_READ | abi.FUSE_INIT_EXT | (3 << 32)


def test_init_of_an_old_kernel_without_flags2():
    req = codec.parse_request(request(Opcode.INIT, abi.init_in_head.pack(7, 31, 4096, abi.FUSE_MAX_PAGES)))
    assert req.flags == abi.FUSE_MAX_PAGES


def test_lookup_name_stops_at_nul():
    req = codec.parse_request(request(Opcode.LOOKUP, b"image\0"))
    assert isinstance(req, codec.Lookup) and req.name == b"image"
    with pytest.raises(codec.MalformedRequest) as exc:
        codec.parse_request(request(Opcode.LOOKUP, b"image"))
    assert exc.value.unique == 7


def test_write_data_is_a_view_of_the_buffer():
    payload = os.urandom(10000)
    open_flags = os.O_RDWR | os.O_DIRECT
    buf = bytearray(request(Opcode.WRITE, abi.write_in.pack(3, 1 << 40, len(payload), 0, 0, open_flags, 0)
                            + payload))
    req = codec.parse_request(buf)
    assert isinstance(req, codec.Write)
    assert (req.fh, req.offset, len(req.data), req.open_flags) == (3, 1 << 40, len(payload), open_flags)
    assert bytes(req.data) == payload
    buf[-1] ^= 0xFF  # no copy was made
    assert req.data[-1] == payload[-1] ^ 0xFF


def test_write_shorter_than_its_size_is_malformed():
    body = abi.write_in.pack(3, 0, 4096, 0, 0, 0, 0) + bytes(100)
    with pytest.raises(codec.MalformedRequest, match="WRITE"):
        codec.parse_request(request(Opcode.WRITE, body, unique=99))


@pytest.mark.parametrize("opcode, body, expected", [
    (Opcode.READ, abi.read_in.pack(1, 8192, 131072, 0, 0, 0, 0), codec.Read(7, 1, 1000, 100, 4242, 1, 8192, 131072)),
    (Opcode.READDIR, abi.read_in.pack(0, 2, 4096, 0, 0, 0, 0), codec.ReadDir(7, 1, 1000, 100, 4242, 0, 2, 4096, False)),
    (Opcode.READDIRPLUS, abi.read_in.pack(0, 0, 4096, 0, 0, 0, 0), codec.ReadDir(7, 1, 1000, 100, 4242, 0, 0, 4096, True)),
    (Opcode.OPEN, abi.open_in.pack(os.O_RDWR, 0), codec.Open(7, 1, 1000, 100, 4242, os.O_RDWR)),
    (Opcode.OPENDIR, abi.open_in.pack(0, 0), codec.OpenDir(7, 1, 1000, 100, 4242, 0)),
    (Opcode.RELEASE, abi.release_in.pack(5, os.O_RDWR, 0, 0), codec.Release(7, 1, 1000, 100, 4242, 5, os.O_RDWR)),
    (Opcode.RELEASEDIR, abi.release_in.pack(6, 0, 0, 0), codec.ReleaseDir(7, 1, 1000, 100, 4242, 6)),
    (Opcode.FLUSH, abi.flush_in.pack(5, 0, 0, 0), codec.Flush(7, 1, 1000, 100, 4242, 5)),
    (Opcode.FSYNC, abi.fsync_in.pack(5, abi.FUSE_FSYNC_FDATASYNC, 0), codec.Fsync(7, 1, 1000, 100, 4242, 5, True)),
    (Opcode.FALLOCATE, abi.fallocate_in.pack(5, 4096, 8192, abi.FALLOC_FL_PUNCH_HOLE | abi.FALLOC_FL_KEEP_SIZE, 0),
     codec.Fallocate(7, 1, 1000, 100, 4242, 5, 4096, 8192, 3)),
    (Opcode.LSEEK, abi.lseek_in.pack(5, 123, os.SEEK_HOLE, 0), codec.Lseek(7, 1, 1000, 100, 4242, 5, 123, os.SEEK_HOLE)),
    (Opcode.INTERRUPT, abi.interrupt_in.pack(55), codec.Interrupt(7, 1, 1000, 100, 4242, 55)),
    (Opcode.ACCESS, abi.access_in.pack(os.R_OK, 0), codec.Access(7, 1, 1000, 100, 4242, os.R_OK)),
    (Opcode.FORGET, abi.forget_in.pack(3), codec.Forget(7, 1, 1000, 100, 4242, 3)),
    (Opcode.STATFS, b"", codec.StatFs(7, 1, 1000, 100, 4242)),
    (Opcode.DESTROY, b"", codec.Destroy(7, 1, 1000, 100, 4242)),
])
def test_fixed_body_requests(opcode, body, expected):
    assert codec.parse_request(request(opcode, body)) == expected


def test_setattr_fields():
    body = abi.setattr_in.pack(abi.FATTR_SIZE | abi.FATTR_MODE, 0, 5, 1 << 30, 0, 1, 2, 3, 0, 0, 0, 0o644, 0, 11, 12, 0)
    req = codec.parse_request(request(Opcode.SETATTR, body))
    assert (req.valid, req.fh, req.size, req.mode, req.uid_new, req.gid_new) == (
        abi.FATTR_SIZE | abi.FATTR_MODE, 5, 1 << 30, 0o644, 11, 12)


def test_batch_forget():
    body = abi.batch_forget_in.pack(2, 0) + abi.forget_one.pack(2, 5) + abi.forget_one.pack(3, 1)
    req = codec.parse_request(request(Opcode.BATCH_FORGET, body))
    assert req.forgets == [(2, 5), (3, 1)] and not req.expects_reply
    with pytest.raises(codec.MalformedRequest):
        codec.parse_request(request(Opcode.BATCH_FORGET, abi.batch_forget_in.pack(3, 0) + abi.forget_one.pack(2, 5)))


def test_extensions_are_skipped():
    body = abi.open_in.pack(os.O_RDONLY, 0) + bytes(16)  # two 8-byte extension units
    req = codec.parse_request(request(Opcode.OPEN, body, extlen=2))
    assert isinstance(req, codec.Open) and req.flags == os.O_RDONLY


@pytest.mark.parametrize("opcode", [Opcode.MKDIR, Opcode.SYMLINK, Opcode.IOCTL, Opcode.COPY_FILE_RANGE, 9999])
def test_unknown_and_unserved_opcodes_are_unsupported(opcode):
    req = codec.parse_request(request(opcode, b"whatever"))
    assert isinstance(req, codec.Unsupported) and req.code == opcode and req.expects_reply


def test_short_header_has_no_unique():
    with pytest.raises(codec.MalformedRequest) as exc:
        codec.parse_request(b"\x01\x02")
    assert exc.value.unique is None


def test_length_mismatch_is_malformed_with_unique():
    with pytest.raises(codec.MalformedRequest) as exc:
        codec.parse_request(request(Opcode.STATFS, length=200, unique=31))
    assert exc.value.unique == 31


def test_short_fixed_body_is_malformed():
    with pytest.raises(codec.MalformedRequest, match="READ"):
        codec.parse_request(request(Opcode.READ, bytes(10), unique=5))


@given(st.binary(max_size=300))
def test_garbage_never_crashes_the_parser(data):
    try:
        codec.parse_request(data)
    except codec.MalformedRequest:
        pass


@given(st.sampled_from(list(Opcode)), st.binary(max_size=120))
def test_any_body_of_a_known_opcode_parses_or_is_malformed(opcode, body):
    try:
        req = codec.parse_request(request(opcode, body))
    except codec.MalformedRequest as exc:
        assert exc.unique == 7
    else:
        assert req.unique == 7


# ---- replies --------------------------------------------------------------------------------


def joined(parts):
    return b"".join(bytes(p) for p in parts)


def test_error_reply_negates_errno():
    out = joined(codec.encode_error(77, errno.ENOENT))
    assert abi.out_header.unpack(out) == (16, -errno.ENOENT, 77)
    assert abi.out_header.unpack(joined(codec.encode_error(1, 0)))[1] == -errno.EIO


@pytest.mark.parametrize("reply, size", [
    # the sizes of the kernel's structures: fuse_entry_out 128, fuse_attr_out 104, ...
    (codec.EntryReply(2, codec.Attr(2, 10, 0o100600), 1.5, 2.25), 128),
    (codec.AttrReply(codec.Attr(2, 10, 0o100600), 1.0), 104),
    (codec.OpenReply(1, abi.FOPEN_KEEP_CACHE), 16),
    (codec.WriteReply(4096), 8),
    (codec.StatFsReply(10, 0, 0, 1, 0), 80),
    (codec.LseekReply(8192), 8),
    (codec.InitReply(38, 131072, abi.FUSE_MAX_PAGES, 64, 48, 1 << 20, 256), 64),
    (codec.EmptyReply(), 0),
])
def test_reply_sizes_match_the_kernel(reply, size):
    out = joined(codec.encode_reply(9, reply))
    assert abi.out_header.unpack_from(out) == (16 + size, 0, 9)
    assert len(out) == 16 + size


def test_entry_reply_fields():
    attr = codec.Attr(ino=2, size=1 << 33, mode=0o100600, uid=5, gid=6, blocks=99, mtime=1700000000.5)
    out = joined(codec.encode_reply(1, codec.EntryReply(2, attr, 3600.0, 1.25)))[16:]
    nodeid, gen, ev, av, evn, avn = abi.entry_out_head.unpack_from(out)
    assert (nodeid, gen, ev, av, evn, avn) == (2, 0, 3600, 1, 0, 250_000_000)
    fields = abi.attr.unpack_from(out, abi.entry_out_head.size)
    assert fields[:3] == (2, 1 << 33, 99)
    assert fields[4] == 1700000000 and fields[7] == 500_000_000  # mtime, mtimensec
    assert fields[9:13] == (0o100600, 1, 5, 6)  # mode nlink uid gid


def test_init_reply_splits_flags2():
    reply = codec.InitReply(38, 4096, abi.FUSE_ASYNC_READ | (1 << 33), 64, 48, 1 << 20, 256)
    fields = abi.init_out.unpack(joined(codec.encode_reply(1, reply))[16:])
    assert fields[0:4] == (7, 38, 4096, abi.FUSE_ASYNC_READ)
    assert fields[6] == 1 << 20 and fields[8] == 256 and fields[10] == 2


def test_open_reply_carries_its_backing_id():
    out = joined(codec.encode_reply(1, codec.OpenReply(1, abi.FOPEN_PASSTHROUGH, backing_id=3)))[16:]
    assert abi.open_out.unpack(out) == (1, abi.FOPEN_PASSTHROUGH, 3)


def parse_dirents(data, plus=False):
    names, pos = [], 0
    while pos < len(data):
        if plus:
            pos += abi.entry_out_head.size + abi.attr.size
        ino, off, namelen, kind = abi.dirent_head.unpack_from(data, pos)
        start = pos + abi.dirent_head.size
        names.append((data[start : start + namelen], off, ino))
        pos += abi.rec_align(abi.dirent_head.size + namelen)
    return names


def test_dir_reply_pages_by_offset_and_size():
    entries = [codec.DirEntry(1, b".", 4), codec.DirEntry(1, b"..", 4), codec.DirEntry(2, b"image", 8)]
    full = joined(codec.encode_reply(1, codec.DirReply(entries, 0, 4096)))[16:]
    assert [(n, o) for n, o, _ in parse_dirents(full)] == [(b".", 1), (b"..", 2), (b"image", 3)]
    assert len(full) % 8 == 0
    rest = joined(codec.encode_reply(1, codec.DirReply(entries, 2, 4096)))[16:]
    assert [n for n, _, _ in parse_dirents(rest)] == [b"image"]
    one = joined(codec.encode_reply(1, codec.DirReply(entries, 0, 40)))[16:]
    assert [n for n, _, _ in parse_dirents(one)] == [b"."]  # the next record would not fit
    assert joined(codec.encode_reply(1, codec.DirReply(entries, 3, 4096)))[16:] == b""


def test_dir_reply_plus_carries_entries():
    entry = codec.EntryReply(2, codec.Attr(2, 10, 0o100600), 1, 1)
    entries = [codec.DirEntry(1, b".", 4), codec.DirEntry(2, b"image", 8, entry)]
    out = joined(codec.encode_reply(1, codec.DirReply(entries, 0, 4096, plus=True)))[16:]
    assert [(n, i) for n, _, i in parse_dirents(out, plus=True)] == [(b".", 1), (b"image", 2)]
    second = abi.entry_out_head.size + abi.attr.size + abi.rec_align(abi.dirent_head.size + 1)
    assert abi.entry_out_head.unpack_from(out, second)[0] == 2  # image's entry names node 2


def test_wire_structures_compare_and_print_by_their_named_fields():
    read = codec.Read(7, 1, 1000, 100, 4242, fh=3, offset=8192, size=4096)
    assert read == codec.Read(7, 1, 1000, 100, 4242, fh=3, offset=8192, size=4096)
    assert read != codec.Read(7, 1, 1000, 100, 4242, fh=3, offset=0, size=4096)
    assert codec.ReleaseDir(7, 1, 1000, 100, 4242, fh=3) != codec.Flush(7, 1, 1000, 100, 4242, fh=3)
    assert repr(read) == ("Read(unique=7, nodeid=1, uid=1000, gid=100, pid=4242, fh=3, offset=8192, "
                          "size=4096, open_flags=0)")
    entries = [codec.DirEntry(1, b"image", 8)]
    assert codec.DirReply(entries, 0, 4096) == codec.DirReply([codec.DirEntry(1, b"image", 8)], 0, 4096)
    with pytest.raises(TypeError):
        hash(read)  # mutable and compared by value
    with pytest.raises(AttributeError):
        read.not_a_field = 1  # slotted: a misspelt field is an error
