"""Spike (not part of the package, not imported by tests): one image file served through FUSE in
two transports with the same per-request work, to measure what FUSE over io_uring buys.

    python spikes/uring_fuse.py IMAGE MOUNTPOINT --transport T [--threads N] [--entries E]

MOUNTPOINT is a regular file; the mount makes it a one-file filesystem (root = the image). The
daemon serves INIT, GETATTR, OPEN, READ, WRITE, FSYNC, FLUSH, RELEASE, STATFS and answers
ENOSYS to everything else. It runs until the mount goes away (`umount MOUNTPOINT`).

- classic: THREADS plain threads share the /dev/fuse descriptor, each reads a request, serves
  it (pread/pwrite of IMAGE) and writev()s the reply.
- uring (Linux 6.14+, fuse.enable_uring=Y): INIT goes over /dev/fuse with FUSE_OVER_IO_URING;
  then, for each possible CPU's queue, THREADS threads each set up an io_uring of 128-byte SQEs
  and register ENTRIES ring entries ([header, payload] buffers) with
  FUSE_IO_URING_CMD_REGISTER; each completion is a request in an entry, answered in place and
  sent back with COMMIT_AND_FETCH, which fetches the next request into the same entry.
- uring-async: as uring, but one thread per queue, and the file's reads, writes and fsyncs are
  SQEs on the same ring (so one thread keeps ENTRIES requests in flight).
- classic-ring: the control for uring-async: one thread, one ring, the same file I/O as SQEs,
  but requests come from ENTRIES READ SQEs on /dev/fuse and replies go back as WRITE SQEs.
  Unsound: such a READ can run inline in the ring's thread and block it in the kernel while
  it holds requests to answer (seen with --defer-taskrun at iodepth 1: a hang until more
  requests came).
- classic-poll: the sound form of classic-ring: non-blocking /dev/fuse, a POLL_ADD SQE, readv
  until EAGAIN, writev replies; the file's I/O as SQEs on the ring.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import mmap
import os
import stat
import struct
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuseclone.fuse import abi, codec  # noqa: E402
from fuseclone.fuse.abi import Opcode  # noqa: E402
from fuseclone.fuse.mount import mount_fuse  # noqa: E402
from fuseclone.libc import libc  # noqa: E402
from fuseclone import uring  # noqa: E402
from fuseclone.uring import CQE_SIZE, PARAMS_SIZE, cqe, params_head  # noqa: E402

MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // 4096
READ_BUFFER_SIZE = MAX_WRITE + 64 * 1024
FUSE_OVER_IO_URING = 1 << 41  # 7.42 (linux/fuse.h of Linux 6.14)
INIT_FLAGS = (abi.FUSE_ASYNC_READ | abi.FUSE_BIG_WRITES | abi.FUSE_MAX_PAGES | abi.FUSE_ASYNC_DIO
              | abi.FUSE_PARALLEL_DIROPS | abi.FUSE_INIT_EXT | abi.FUSE_DIRECT_IO_ALLOW_MMAP)
ATTR_VALID = 3600.0

# ---- the per-request work, shared by both transports ----------------------------------------


class Image:
    def __init__(self, path: str, direct_reads: bool = False) -> None:
        self.fd = os.open(path, os.O_RDWR)
        # --direct-reads: READs bypass the page cache, like the raw dio loop device they are
        # compared with (buffered, a 5 s run at 50k IOPS re-reads a third of what it read
        # before from the cache). Their buffers must then be page-aligned.
        self.read_fd = os.open(path, os.O_RDONLY | os.O_DIRECT) if direct_reads else self.fd
        st = os.fstat(self.fd)
        self.attr = codec.Attr(ino=abi.ROOT_ID, size=st.st_size, mode=stat.S_IFREG | 0o644,
                               blocks=st.st_size // 512, mtime=st.st_mtime, ctime=st.st_ctime)
        self.requests = 0
        self.over_dev = 0  # of which read from /dev/fuse (the rest came through the ring)

    def serve(self, opcode: int, op_in: memoryview, data: memoryview,
              out: memoryview) -> tuple[int, int]:
        """Serve one request: OP_IN is its fixed per-opcode struct, DATA what follows (a WRITE's
        bytes); the reply's payload goes into OUT. Returns (errno, payload length)."""
        self.requests += 1
        if opcode == Opcode.READ:
            _fh, offset, size, *_ = abi.read_in.unpack_from(op_in)
            return 0, os.preadv(self.read_fd, [out[:size]], offset)
        if opcode == Opcode.WRITE:
            _fh, offset, size, *_ = abi.write_in.unpack_from(op_in)
            written = os.pwritev(self.fd, [data[:size]], offset)
            abi.write_out.pack_into(out, 0, written, 0)
            return 0, abi.write_out.size
        if opcode == Opcode.FSYNC:
            os.fdatasync(self.fd)
            return 0, 0
        if opcode in (Opcode.FLUSH, Opcode.RELEASE):
            return 0, 0
        if opcode == Opcode.GETATTR:
            return 0, _put(out, codec.AttrReply(self.attr, ATTR_VALID).payload())
        if opcode == Opcode.OPEN:
            flags, _ = abi.open_in.unpack_from(op_in)
            open_flags = abi.FOPEN_KEEP_CACHE | abi.FOPEN_PARALLEL_DIRECT_WRITES
            if flags & os.O_DIRECT:
                open_flags |= abi.FOPEN_DIRECT_IO  # as fuseclone answers an O_DIRECT open
            return 0, _put(out, codec.OpenReply(1, open_flags).payload())
        if opcode == Opcode.STATFS:
            blocks = self.attr.size // 4096
            abi.kstatfs.pack_into(out, 0, blocks, 0, 0, 1, 0, 4096, 255, 4096, 0)
            return 0, abi.kstatfs.size
        return errno.ENOSYS, 0


def _put(out: memoryview, parts: list) -> int:
    data = b"".join(parts)
    out[:len(data)] = data
    return len(data)


# Size of the fixed per-opcode struct at the start of a classic request's body (the rest is data).
OP_IN_SIZE = {Opcode.READ: abi.read_in.size, Opcode.WRITE: abi.write_in.size,
              Opcode.FSYNC: abi.fsync_in.size, Opcode.FLUSH: abi.flush_in.size,
              Opcode.RELEASE: abi.release_in.size, Opcode.GETATTR: abi.getattr_in.size,
              Opcode.OPEN: abi.open_in.size}

# ---- INIT (always over /dev/fuse) -------------------------------------------------------------


def answer_init(dev: int, uring: bool) -> None:
    buf = os.read(dev, READ_BUFFER_SIZE)
    _len, opcode, unique, *_ = abi.in_header.unpack_from(buf)
    if opcode != Opcode.INIT:
        raise SystemExit(f"first request is opcode {opcode}, not INIT")
    major, minor, max_readahead, flags = abi.init_in_head.unpack_from(buf, abi.in_header.size)
    if flags & abi.FUSE_INIT_EXT:
        (flags2,) = struct.unpack_from("<I", buf, abi.in_header.size + abi.init_in_head.size)
        flags |= flags2 << 32
    wanted = INIT_FLAGS | (FUSE_OVER_IO_URING if uring else 0)
    if uring and not flags & FUSE_OVER_IO_URING:
        raise SystemExit("the kernel does not offer FUSE_OVER_IO_URING "
                         "(echo Y > /sys/module/fuse/parameters/enable_uring)")
    reply = codec.InitReply(minor=min(minor, 42), max_readahead=max_readahead,
                            flags=flags & wanted, max_background=64, congestion_threshold=48,
                            max_write=MAX_WRITE, max_pages=MAX_PAGES)
    os.writev(dev, codec.encode_reply(unique, reply))

# ---- classic transport ------------------------------------------------------------------------


def classic_worker(dev: int, image: Image) -> None:
    request = bytearray(READ_BUFFER_SIZE)
    header = bytearray(abi.out_header.size)
    reply = mmap.mmap(-1, READ_BUFFER_SIZE)  # page-aligned, for --direct-reads
    req_view, out = memoryview(request), memoryview(reply)
    while True:
        try:
            length = os.readv(dev, [request])
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.ENOTCONN):
                return  # unmounted
            if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                continue
            raise
        _len, opcode, unique, *_ = abi.in_header.unpack_from(request)
        if opcode in (Opcode.FORGET, Opcode.BATCH_FORGET):
            continue
        image.over_dev += 1
        body = abi.in_header.size
        op_size = OP_IN_SIZE.get(opcode, 0)
        error, n = image.serve(opcode, req_view[body:body + op_size],
                               req_view[body + op_size:length], out)
        abi.out_header.pack_into(header, 0, abi.out_header.size + n, -error, unique)
        try:
            os.writev(dev, [header, out[:n]])
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the request was interrupted meanwhile
                raise

# ---- io_uring, by raw syscalls ------------------------------------------------------------------


SYS_io_uring_setup, SYS_io_uring_enter = 425, 426  # x86_64
IORING_SETUP_SQE128 = 1 << 10
IORING_OP_URING_CMD = 46
IORING_OP_FSYNC, IORING_OP_READ, IORING_OP_WRITE = 3, 22, 23
IORING_FSYNC_DATASYNC = 1
IORING_SETUP_COOP_TASKRUN, IORING_SETUP_SINGLE_ISSUER, IORING_SETUP_DEFER_TASKRUN = 1 << 8, 1 << 12, 1 << 13
IORING_ENTER_GETEVENTS = 1
SQE_SIZE = 128
FUSE_IO_URING_CMD_REGISTER, FUSE_IO_URING_CMD_COMMIT_AND_FETCH = 1, 2

# struct io_uring_params and the rings' offsets: fuseclone/uring.py
# struct io_uring_sqe, the fields a URING_CMD uses: opcode flags ioprio fd cmd_op pad addr len
# uring_cmd_flags user_data; the command's 80 bytes start at 48
sqe_head = struct.Struct("<BBHiIIQIIQ")
# struct fuse_uring_cmd_req, in the SQE's command area: flags commit_id qid padding[6]
uring_cmd_req = struct.Struct("<QQH6x")
SQE_CMD_OFFSET = 48
ZERO_SQE = bytes(SQE_SIZE)
# struct fuse_uring_req_header: in_out[128] op_in[128] ring_ent_in_out{flags commit_id payload_sz padding reserved}
URING_IN_OUT_SZ = URING_OP_IN_SZ = 128
ent_in_out = struct.Struct("<QQIIQ")
URING_HEADER_SIZE = URING_IN_OUT_SZ + URING_OP_IN_SZ + ent_in_out.size
ENT_IN_OUT_OFFSET = URING_IN_OUT_SZ + URING_OP_IN_SZ

syscall = libc.syscall
syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


class Ring:
    """One io_uring with 128-byte SQEs, its rings mapped into our memory."""

    def __init__(self, entries: int, flags: int = 0) -> None:
        params = ctypes.create_string_buffer(PARAMS_SIZE)
        params_head.pack_into(params, 0, 0, 0, IORING_SETUP_SQE128 | flags, 0, 0, 0, 0)
        self.fd = _check(syscall(SYS_io_uring_setup, ctypes.c_uint(entries), params),
                         "io_uring_setup")
        (sq_entries, cq_entries, sq, cq), (self.sq_ring, self.cq_ring, self.sqes) = \
            uring.map_rings(self.fd, params, SQE_SIZE)
        self.sq_head_at, self.sq_tail_at, self.sq_mask = sq[0], sq[1], sq_entries - 1
        self.sq_array_at = sq[6]
        self.cq_head_at, self.cq_tail_at, self.cq_mask, self.cqes_at = cq[0], cq[1], cq_entries - 1, cq[5]
        self.sq_view, self.cq_view = memoryview(self.sq_ring), memoryview(self.cq_ring)
        self.sq_u32 = self.sq_view.cast("I")
        self.cq_u32 = self.cq_view.cast("I")
        self.pending = 0

    def push(self, opcode: int, fd: int, off: int, addr: int, length: int, user_data: int,
             op_flags: int = 0, cmd: tuple[int, int] | None = None) -> None:
        """Queue one SQE; CMD (commit_id, qid) fills a FUSE uring command's area."""
        tail = self.sq_u32[self.sq_tail_at // 4]
        index = tail & self.sq_mask
        at = index * SQE_SIZE
        self.sqes[at:at + SQE_SIZE] = ZERO_SQE
        sqe_head.pack_into(self.sqes, at, opcode, 0, 0, fd, off & 0xFFFFFFFF, off >> 32, addr,
                           length, op_flags, user_data)
        if cmd is not None:
            uring_cmd_req.pack_into(self.sqes, at + SQE_CMD_OFFSET, 0, *cmd)
        self.sq_u32[self.sq_array_at // 4 + index] = index
        # x86 keeps stores in order: the SQE is written before the kernel can see the new tail
        self.sq_u32[self.sq_tail_at // 4] = (tail + 1) & 0xFFFFFFFF
        self.pending += 1

    def push_uring_cmd(self, fd: int, cmd_op: int, iov_addr: int, user_data: int,
                       commit_id: int, qid: int) -> None:
        # for a URING_CMD the SQE's off field is cmd_op (low 32 bits); len is the iovec count
        self.push(IORING_OP_URING_CMD, fd, cmd_op, iov_addr, 2, user_data, cmd=(commit_id, qid))

    def submit_and_wait(self) -> None:
        """Submit what is queued and block (without the GIL) until a completion is there."""
        while True:
            done = syscall(SYS_io_uring_enter, self.fd, self.pending, 1, IORING_ENTER_GETEVENTS,
                           None, 0)
            if done >= 0:
                self.pending -= done
                return
            if ctypes.get_errno() != errno.EINTR:
                _check(done, "io_uring_enter")

    def completions(self) -> list[tuple[int, int]]:
        head = self.cq_u32[self.cq_head_at // 4]
        tail = self.cq_u32[self.cq_tail_at // 4]
        found = []
        while head != tail:
            user_data, res, _flags = cqe.unpack_from(self.cq_ring,
                                                     self.cqes_at + (head & self.cq_mask) * CQE_SIZE)
            found.append((user_data, res))
            head = (head + 1) & 0xFFFFFFFF
        self.cq_u32[self.cq_head_at // 4] = head
        return found


class RingEntry:
    """A [header, payload] pair of buffers the kernel writes requests into and reads replies
    from; the iovec array that names them stays alive as long as the entry."""

    def __init__(self, payload_size: int) -> None:
        self.header = mmap.mmap(-1, URING_HEADER_SIZE)
        self.payload = mmap.mmap(-1, payload_size)
        self.header_view, self.payload_view = memoryview(self.header), memoryview(self.payload)
        iov = (ctypes.c_uint64 * 4)(_address(self.header), URING_HEADER_SIZE,
                                    _address(self.payload), payload_size)
        self.iov = iov
        self.payload_addr = _address(self.payload)
        self.iov_addr = ctypes.addressof(iov)


def _address(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def uring_worker(dev: int, image: Image, qid: int, entries: int, ready: threading.Barrier) -> None:
    ring = Ring(entries)
    slots = [RingEntry(MAX_WRITE + 4096) for _ in range(entries)]
    for i, slot in enumerate(slots):
        ring.push_uring_cmd(dev, FUSE_IO_URING_CMD_REGISTER, slot.iov_addr, i, 0, qid)
    _check(syscall(SYS_io_uring_enter, ring.fd, ring.pending, 0, 0, None, 0), "register entries")
    ring.pending = 0
    ready.wait()
    while True:
        ring.submit_and_wait()
        for index, res in ring.completions():
            if res < 0:
                if res in (-errno.ENOTCONN, -errno.ECONNABORTED, -errno.ECANCELED):
                    return  # unmounted
                raise OSError(-res, f"queue {qid} entry {index}: {os.strerror(-res)}")
            slot = slots[index]
            h = slot.header_view
            _len, opcode, unique, *_ = abi.in_header.unpack_from(h)
            _flags, commit_id, payload_sz, _pad, _res = ent_in_out.unpack_from(h, ENT_IN_OUT_OFFSET)
            error, n = image.serve(opcode, h[URING_IN_OUT_SZ:ENT_IN_OUT_OFFSET],
                                   slot.payload_view[:payload_sz], slot.payload_view)
            abi.out_header.pack_into(h, 0, abi.out_header.size + n, -error, unique)
            ent_in_out.pack_into(h, ENT_IN_OUT_OFFSET, 0, 0, n, 0, 0)
            ring.push_uring_cmd(dev, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, slot.iov_addr, index,
                                commit_id, qid)


# user_data of the async worker's SQEs: the entry's index, and what the SQE does
FETCH, DISK = 0, 1 << 32


def uring_async_worker(dev: int, image: Image, qid: int, entries: int, ready: threading.Barrier,
                       ring_flags: int, pin: bool) -> None:
    """One thread serves queue QID: the file's reads, writes and fsyncs of READ, WRITE and FSYNC
    go through the same ring as the FUSE commands, so one thread keeps many in flight and one
    io_uring_enter both sends replies and starts disk I/O."""
    if pin:
        os.sched_setaffinity(0, {qid})
    ring = Ring(entries * 2, ring_flags)
    slots = [RingEntry(MAX_WRITE + 4096) for _ in range(entries)]
    for i, slot in enumerate(slots):
        ring.push_uring_cmd(dev, FUSE_IO_URING_CMD_REGISTER, slot.iov_addr, FETCH | i, 0, qid)
    _check(syscall(SYS_io_uring_enter, ring.fd, ring.pending, 0, 0, None, 0), "register entries")
    ring.pending = 0
    commit_ids = [0] * entries
    ready.wait()
    while True:
        ring.submit_and_wait()
        for user_data, res in ring.completions():
            index = user_data & 0xFFFFFFFF
            slot = slots[index]
            h = slot.header_view
            if user_data & DISK:
                image.requests += 1
                _len, opcode, unique, *_ = abi.in_header.unpack_from(h)
                error, n = (-res, 0) if res < 0 else (0, res)
                if opcode == Opcode.WRITE and not error:
                    abi.write_out.pack_into(slot.payload, 0, res, 0)
                    n = abi.write_out.size
                elif opcode == Opcode.FSYNC:
                    n = 0
                _reply(ring, dev, slot, index, qid, unique, error, n, commit_ids[index])
                continue
            if res < 0:
                if res in (-errno.ENOTCONN, -errno.ECONNABORTED, -errno.ECANCELED):
                    return  # unmounted
                raise OSError(-res, f"queue {qid} entry {index}: {os.strerror(-res)}")
            _len, opcode, unique, *_ = abi.in_header.unpack_from(h)
            _flags, commit_ids[index], payload_sz, _pad, _res = ent_in_out.unpack_from(h, ENT_IN_OUT_OFFSET)
            op_in = h[URING_IN_OUT_SZ:ENT_IN_OUT_OFFSET]
            if opcode == Opcode.READ:
                _fh, offset, size, *_ = abi.read_in.unpack_from(op_in)
                ring.push(IORING_OP_READ, image.read_fd, offset, slot.payload_addr, size, DISK | index)
            elif opcode == Opcode.WRITE:
                _fh, offset, size, *_ = abi.write_in.unpack_from(op_in)
                ring.push(IORING_OP_WRITE, image.fd, offset, slot.payload_addr, size, DISK | index)
            elif opcode == Opcode.FSYNC:
                ring.push(IORING_OP_FSYNC, image.fd, 0, 0, 0, DISK | index,
                          op_flags=IORING_FSYNC_DATASYNC)
            else:
                error, n = image.serve(opcode, op_in, slot.payload_view[:payload_sz],
                                       slot.payload_view)
                _reply(ring, dev, slot, index, qid, unique, error, n, commit_ids[index])


def _reply(ring: Ring, dev: int, slot: RingEntry, index: int, qid: int, unique: int, error: int,
           n: int, commit_id: int) -> None:
    h = slot.header_view
    abi.out_header.pack_into(h, 0, abi.out_header.size + n, -error, unique)
    ent_in_out.pack_into(h, ENT_IN_OUT_OFFSET, 0, 0, n, 0, 0)
    ring.push_uring_cmd(dev, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, slot.iov_addr, FETCH | index,
                        commit_id, qid)



REPLY = 2 << 32  # classic-ring: a reply's write to /dev/fuse
FILE_POSITION = (1 << 64) - 1  # a READ SQE's offset -1: the file's position (/dev/fuse has none)


def classic_ring_worker(dev: int, image: Image, entries: int, ring_flags: int,
                        ready: threading.Barrier) -> None:
    """The control for uring-async: the same single thread and the same file I/O on a ring, but
    requests read from /dev/fuse by ENTRIES READ SQEs (io_uring hands a read of /dev/fuse to its
    io-wq workers) and replies written by WRITE SQEs."""
    ring = Ring(entries * 4, ring_flags)
    requests = [mmap.mmap(-1, READ_BUFFER_SIZE) for _ in range(entries)]
    replies = [mmap.mmap(-1, READ_BUFFER_SIZE) for _ in range(entries)]
    request_at = [_address(m) for m in requests]
    reply_at = [_address(m) for m in replies]
    views = [memoryview(m) for m in requests]
    out_views = [memoryview(m) for m in replies]
    for i in range(entries):
        ring.push(IORING_OP_READ, dev, FILE_POSITION, request_at[i], READ_BUFFER_SIZE, FETCH | i)
    ready.wait()
    while True:
        ring.submit_and_wait()
        for user_data, res in ring.completions():
            i = user_data & 0xFFFFFFFF
            kind = user_data & ~0xFFFFFFFF
            if kind == REPLY:
                if res < 0 and res != -errno.ENOENT:  # ENOENT: interrupted meanwhile
                    raise OSError(-res, f"reply of entry {i}: {os.strerror(-res)}")
                continue
            request, out = views[i], out_views[i]
            if kind == DISK:
                image.requests += 1
                _len, opcode, unique, *_ = abi.in_header.unpack_from(request)
                error, n = (-res, 0) if res < 0 else (0, res)
                if opcode == Opcode.WRITE and not error:
                    abi.write_out.pack_into(out, abi.out_header.size, res, 0)
                    n = abi.write_out.size
                elif opcode == Opcode.FSYNC:
                    n = 0
                _classic_reply(ring, dev, i, unique, error, n, out, reply_at[i], request_at[i])
                continue
            if res < 0:
                if res in (-errno.ENODEV, -errno.ENOTCONN):
                    return  # unmounted
                if res in (-errno.EINTR, -errno.EAGAIN, -errno.ENOENT):
                    ring.push(IORING_OP_READ, dev, FILE_POSITION, request_at[i], READ_BUFFER_SIZE, FETCH | i)
                    continue
                raise OSError(-res, f"read of /dev/fuse: {os.strerror(-res)}")
            _len, opcode, unique, *_ = abi.in_header.unpack_from(request)
            body = abi.in_header.size
            image.over_dev += 1
            if opcode in (Opcode.FORGET, Opcode.BATCH_FORGET):
                ring.push(IORING_OP_READ, dev, FILE_POSITION, request_at[i], READ_BUFFER_SIZE, FETCH | i)
            elif opcode == Opcode.READ:
                _fh, offset, size, *_ = abi.read_in.unpack_from(request, body)
                ring.push(IORING_OP_READ, image.fd, offset, reply_at[i] + abi.out_header.size, size,
                          DISK | i)
            elif opcode == Opcode.WRITE:
                _fh, offset, size, *_ = abi.write_in.unpack_from(request, body)
                ring.push(IORING_OP_WRITE, image.fd, offset, request_at[i] + body + abi.write_in.size,
                          size, DISK | i)
            elif opcode == Opcode.FSYNC:
                ring.push(IORING_OP_FSYNC, image.fd, 0, 0, 0, DISK | i, op_flags=IORING_FSYNC_DATASYNC)
            else:
                op_size = OP_IN_SIZE.get(opcode, 0)
                error, n = image.serve(opcode, request[body:body + op_size],
                                       request[body + op_size:res], out[abi.out_header.size:])
                _classic_reply(ring, dev, i, unique, error, n, out, reply_at[i], request_at[i])


def _classic_reply(ring: Ring, dev: int, i: int, unique: int, error: int, n: int,
                   out: memoryview, reply_at: int, request_at: int) -> None:
    """Queue the reply's write and, behind it, the next read of /dev/fuse into the same entry."""
    abi.out_header.pack_into(out, 0, abi.out_header.size + n, -error, unique)
    ring.push(IORING_OP_WRITE, dev, FILE_POSITION, reply_at, abi.out_header.size + n, REPLY | i)
    ring.push(IORING_OP_READ, dev, FILE_POSITION, request_at, READ_BUFFER_SIZE, FETCH | i)



POLL = 3 << 32  # classic-poll: the ring's poll of /dev/fuse
IORING_OP_POLL_ADD = 6
POLLIN = 1


def classic_poll_worker(dev: int, image: Image, entries: int, ring_flags: int,
                        ready: threading.Barrier) -> None:
    """The sound form of classic-ring (which reads /dev/fuse with READ SQEs, and those can block
    the ring's thread inside the kernel): /dev/fuse non-blocking, a POLL_ADD SQE says when it has
    requests, `readv` takes them until EAGAIN (at most ENTRIES in flight), the file's I/O is SQEs
    on the ring, replies are `writev`s. This is fuseclone's structure (trio's wait_readable, a
    non-blocking read, writev) with DST's reads on a ring instead of threads."""
    ring = Ring(entries * 4, ring_flags)
    requests = [mmap.mmap(-1, READ_BUFFER_SIZE) for _ in range(entries)]
    replies = [mmap.mmap(-1, READ_BUFFER_SIZE) for _ in range(entries)]
    reply_at = [_address(m) for m in replies]  # the reply's payload; its header goes separately
    views = [memoryview(m) for m in requests]
    out_views = [memoryview(m) for m in replies]
    free = list(range(entries))
    polling = False
    os.set_blocking(dev, False)
    ready.wait()
    while True:
        if free and not polling:
            ring.push(IORING_OP_POLL_ADD, dev, 0, 0, 0, POLL, op_flags=POLLIN)
            polling = True
        ring.submit_and_wait()
        for user_data, res in ring.completions():
            if user_data == POLL:
                polling = False
                while free:
                    i = free[-1]
                    try:
                        length = os.readv(dev, [requests[i]])
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if e.errno in (errno.ENODEV, errno.ENOTCONN):
                            return  # unmounted
                        if e.errno in (errno.EINTR, errno.ENOENT):
                            continue
                        raise
                    free.pop()
                    if _start_request(ring, dev, image, i, views[i], length, out_views[i],
                                      reply_at[i]):
                        free.append(i)
                continue
            i = user_data & 0xFFFFFFFF
            request, out = views[i], out_views[i]
            image.requests += 1
            _len, opcode, unique, *_ = abi.in_header.unpack_from(request)
            error, n = (-res, 0) if res < 0 else (0, res)
            if opcode == Opcode.WRITE and not error:
                abi.write_out.pack_into(out, 0, res, 0)
                n = abi.write_out.size
            elif opcode == Opcode.FSYNC:
                n = 0
            _write_reply(dev, out, unique, error, n)
            free.append(i)


def _start_request(ring: Ring, dev: int, image: Image, i: int, request: memoryview, length: int,
                   out: memoryview, reply_at: int) -> bool:
    """Start the file I/O of a READ/WRITE/FSYNC as an SQE, or serve anything else at once.
    True when the entry is free again (answered, or nothing to answer)."""
    _len, opcode, unique, *_ = abi.in_header.unpack_from(request)
    body = abi.in_header.size
    image.over_dev += 1
    if opcode in (Opcode.FORGET, Opcode.BATCH_FORGET):
        return True
    if opcode == Opcode.READ:
        _fh, offset, size, *_ = abi.read_in.unpack_from(request, body)
        ring.push(IORING_OP_READ, image.read_fd, offset, reply_at, size, DISK | i)
    elif opcode == Opcode.WRITE:
        _fh, offset, size, *_ = abi.write_in.unpack_from(request, body)
        data = _address_of_view(request) + body + abi.write_in.size
        ring.push(IORING_OP_WRITE, image.fd, offset, data, size, DISK | i)
    elif opcode == Opcode.FSYNC:
        ring.push(IORING_OP_FSYNC, image.fd, 0, 0, 0, DISK | i, op_flags=IORING_FSYNC_DATASYNC)
    else:
        op_size = OP_IN_SIZE.get(opcode, 0)
        error, n = image.serve(opcode, request[body:body + op_size],
                               request[body + op_size:length], out)
        _write_reply(dev, out, unique, error, n)
        return True
    return False


def _address_of_view(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _write_reply(dev: int, payload: memoryview, unique: int, error: int, n: int) -> None:
    header = abi.out_header.pack(abi.out_header.size + n, -error, unique)
    try:
        os.writev(dev, [header, payload[:n]])
    except OSError as e:
        if e.errno != errno.ENOENT:  # ENOENT: the request was interrupted meanwhile
            raise


def possible_cpus() -> int:
    """The kernel makes one queue per possible CPU and sends nothing to the ring until every
    queue has an entry registered."""
    with open("/sys/devices/system/cpu/possible") as f:
        last = f.read().strip().split(",")[-1].split("-")[-1]
    return int(last) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("mountpoint")
    parser.add_argument("--transport", choices=("classic", "uring", "uring-async", "classic-ring", "classic-poll"), required=True)
    parser.add_argument("--threads", type=int, default=4,
                        help="classic: reader threads; uring: threads per queue")
    parser.add_argument("--entries", type=int, default=8, help="uring: ring entries per thread")
    parser.add_argument("--defer-taskrun", action="store_true",
                        help="uring-async, classic-ring: IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN")
    parser.add_argument("--pin", action="store_true", help="uring-async: queue N's thread on CPU N")
    parser.add_argument("--direct-reads", action="store_true",
                        help="READs with O_DIRECT (classic, uring, uring-async, classic-poll)")
    args = parser.parse_args()
    image = Image(args.image, args.direct_reads)
    dev = mount_fuse(args.mountpoint, fsname="uring-spike", allow_other=True)
    uring = args.transport in ("uring", "uring-async")
    answer_init(dev, uring)
    flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN if args.defer_taskrun else 0
    if args.transport in ("classic-ring", "classic-poll"):
        ready = threading.Barrier(2)
        worker = classic_ring_worker if args.transport == "classic-ring" else classic_poll_worker
        threads = [threading.Thread(target=worker,
                                    args=(dev, image, args.entries, flags, ready), daemon=True)]
    elif args.transport == "uring-async":
        queues = possible_cpus()
        ready = threading.Barrier(queues + 1)
        threads = [threading.Thread(target=uring_async_worker,
                                    args=(dev, image, qid, args.entries, ready, flags, args.pin),
                                    daemon=True, name=f"q{qid}")
                   for qid in range(queues)]
    elif uring:
        queues = possible_cpus()
        ready = threading.Barrier(queues * args.threads + 1)
        threads = [threading.Thread(target=uring_worker, args=(dev, image, qid, args.entries, ready),
                                    daemon=True, name=f"q{qid}t{t}")
                   for qid in range(queues) for t in range(args.threads)]
    else:
        threads = [threading.Thread(target=classic_worker, args=(dev, image), daemon=True)
                   for _ in range(args.threads)]
    if uring:  # anything the kernel still sends to /dev/fuse (nothing, in these runs)
        threads.append(threading.Thread(target=classic_worker, args=(dev, image), daemon=True))
    for thread in threads:
        thread.start()
    if uring or args.transport in ("classic-ring", "classic-poll"):
        ready.wait()
    print(f"serving {args.image} at {args.mountpoint} ({args.transport}), pid {os.getpid()}",
          flush=True)
    for thread in threads:
        thread.join()
    print(f"unmounted; served {image.requests} requests, {image.over_dev} of them over /dev/fuse", flush=True)


if __name__ == "__main__":
    main()
