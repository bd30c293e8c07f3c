"""A minimal io_uring for reads from files, driven from trio: reads are queued as SQEs,
submitted without waiting (`io_uring_enter(to_submit, 0, 0)`), and their completions reaped
from the mapped CQ ring when the eventfd registered on the ring says there are some
(`trio.lowlevel.wait_readable`).

The FUSE session reads hydrated data from DST this way: many reads in flight and a few
microseconds of CPU each, where a thread per read cost a hand-over, a GIL round and the
thread's own reply (docs/benchmark/cold-reads.md).

The rings are shared with the kernel through mmap, and a new SQ tail must reach memory after
the SQE it publishes: x86_64 keeps stores in order, other CPUs would need a barrier that Python
cannot issue, so `ReadRing` refuses to start anywhere else (the session then reads on threads).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
from dataclasses import dataclass
from typing import Any

import trio

from .libc import libc

# Syscall numbers (the same on every architecture that has io_uring, from the unified table).
SYS_IO_URING_SETUP, SYS_IO_URING_ENTER, SYS_IO_URING_REGISTER = 425, 426, 427
IORING_OP_READ = 22
IORING_ENTER_GETEVENTS = 1
# Features (io_uring_params.features) of Linux 5.6, the release that brought IORING_OP_READ
IORING_FEAT_NODROP, IORING_FEAT_RW_CUR_POS = 1 << 1, 1 << 3
IORING_REGISTER_EVENTFD = 4
IORING_OFF_SQ_RING, IORING_OFF_CQ_RING, IORING_OFF_SQES = 0, 0x8000000, 0x10000000
SQE_SIZE, CQE_SIZE = 64, 16
DISABLED_SWITCH = "/proc/sys/kernel/io_uring_disabled"

# struct io_uring_params: sq_entries cq_entries flags sq_thread_cpu sq_thread_idle features
# wq_fd resv[3], then struct io_sqring_offsets and struct io_cqring_offsets
params_head = struct.Struct("<IIIIIII12x")
sq_offsets = struct.Struct("<IIIIIIIIQ")  # head tail ring_mask ring_entries flags dropped array resv1 user_addr
cq_offsets = struct.Struct("<IIIIIIIIQ")  # head tail ring_mask ring_entries overflow cqes flags resv1 user_addr
PARAMS_SIZE = params_head.size + sq_offsets.size + cq_offsets.size
# struct io_uring_sqe's first 40 bytes: opcode flags ioprio fd off addr len rw_flags user_data;
# the rest (buf_index, personality, splice_fd_in, addr3) stays zero
sqe_head = struct.Struct("<BBHiQQIIQ")
ZERO_SQE_TAIL = bytes(SQE_SIZE - sqe_head.size)
cqe = struct.Struct("<QiI")  # user_data res flags

RING_ENTRIES = 256  # SQEs per submit batch; the CQ ring gets twice as many


class RingUnavailable(Exception):
    """io_uring cannot be used here (old kernel, disabled by the administrator, not x86_64)."""


def _syscall(number: int, *args: Any) -> int:
    """A raw syscall; raises OSError from errno when it fails."""
    while True:
        result = libc.syscall(ctypes.c_long(number), *args)
        if result >= 0:
            return result
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def _address(buffer: bytearray) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class ReadRing:
    """One io_uring with its SQ and CQ rings mapped, and an eventfd the kernel signals at every
    completion. Only the thread that made it may use it."""

    def __init__(self, entries: int = RING_ENTRIES) -> None:
        if platform.machine() != "x86_64":
            raise RingUnavailable(f"not on {platform.machine()} (see fuseclone/uring.py)")
        params = ctypes.create_string_buffer(PARAMS_SIZE)
        try:
            self.fd = _syscall(SYS_IO_URING_SETUP, ctypes.c_uint(entries), params)
        except OSError as exc:
            raise RingUnavailable(_why_unavailable(exc)) from exc
        try:
            self._check_features(params)
            self._map(params)
            self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError as exc:  # out of descriptors or address space (ulimit -n, -v)
            os.close(self.fd)
            raise RingUnavailable(f"its rings cannot be set up: {exc.strerror}") from exc
        except BaseException:
            os.close(self.fd)
            raise
        try:
            registered = ctypes.c_int32(self.eventfd)
            _syscall(SYS_IO_URING_REGISTER, self.fd, IORING_REGISTER_EVENTFD,
                     ctypes.byref(registered), ctypes.c_uint(1))
        except OSError as exc:
            self.close()
            raise RingUnavailable(f"io_uring_register(EVENTFD): {exc.strerror}") from exc
        self.queued = 0  # SQEs in the SQ ring, not yet submitted

    def _check_features(self, params: ctypes.Array) -> None:
        features = params_head.unpack_from(params)[5]
        wanted = IORING_FEAT_NODROP | IORING_FEAT_RW_CUR_POS
        if features & wanted != wanted:
            raise RingUnavailable("io_uring's reads need Linux 5.6 or later")

    def _map(self, params: ctypes.Array) -> None:
        (sq_entries, cq_entries, sq, cq), (self._sq_ring, self._cq_ring, self._sqes) = \
            map_rings(self.fd, params, SQE_SIZE)
        self._sq = memoryview(self._sq_ring).cast("I")
        self._cq = memoryview(self._cq_ring).cast("I")
        self._sq_tail, self._sq_array, self._sq_mask = sq[1] // 4, sq[6] // 4, sq_entries - 1
        self._cq_head, self._cq_tail, self._cq_mask, self._cqes = cq[0] // 4, cq[1] // 4, cq_entries - 1, cq[5]
        self.sq_entries = sq_entries

    def queue_read(self, fd: int, offset: int, address: int, length: int, user_data: int) -> None:
        """Queue a read of `length` bytes of `fd` at `offset` into memory at `address`, which
        must stay valid until its completion is reaped. Only when `has_room()`."""
        tail = self._sq[self._sq_tail]
        index = tail & self._sq_mask
        at = index * SQE_SIZE
        sqe_head.pack_into(self._sqes, at, IORING_OP_READ, 0, 0, fd, offset, address, length,
                           0, user_data)
        self._sqes[at + sqe_head.size:at + SQE_SIZE] = ZERO_SQE_TAIL
        self._sq[self._sq_array + index] = index
        # The SQE is complete before the kernel can see the new tail (see the module's doc).
        self._sq[self._sq_tail] = (tail + 1) & 0xFFFFFFFF
        self.queued += 1

    def submit(self) -> bool:
        """Hand the queued SQEs to the kernel without waiting for any completion. False when
        it takes none for now (EAGAIN: short of memory; EBUSY: too many completions not yet
        reaped): they stay queued for the next call."""
        while self.queued:
            try:
                self.queued -= _syscall(SYS_IO_URING_ENTER, self.fd, ctypes.c_uint(self.queued),
                                        ctypes.c_uint(0), ctypes.c_uint(0), None,
                                        ctypes.c_size_t(0))
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EBUSY):
                    return False
                raise
        return True

    def has_room(self) -> bool:
        """Whether another read can be queued (submitting what is queued, if the SQ ring is
        full)."""
        return self.queued < self.sq_entries or self.submit()

    def wait_for(self, count: int) -> None:
        """Block until `count` completions are in the CQ ring (submitting what is queued)."""
        _syscall(SYS_IO_URING_ENTER, self.fd, ctypes.c_uint(self.queued), ctypes.c_uint(count),
                 ctypes.c_uint(IORING_ENTER_GETEVENTS), None, ctypes.c_size_t(0))
        self.queued = 0

    def completions(self) -> list[tuple[int, int]]:
        """(user_data, res) of every completion in the CQ ring, which they leave."""
        head, tail = self._cq[self._cq_head], self._cq[self._cq_tail]
        found = []
        while head != tail:
            user_data, res, _flags = cqe.unpack_from(self._cq_ring,
                                                     self._cqes + (head & self._cq_mask) * CQE_SIZE)
            found.append((user_data, res))
            head = (head + 1) & 0xFFFFFFFF
        self._cq[self._cq_head] = head
        return found

    async def wait_readable(self) -> None:
        """Return once completions may be in the CQ ring."""
        await trio.lowlevel.wait_readable(self.eventfd)
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            pass  # another wakeup took the count; the CQ ring says what is there

    def close(self) -> None:
        """Unmap and close; no read may be in flight (their buffers are the caller's)."""
        self._sq.release()
        self._cq.release()
        for mapping in (self._sq_ring, self._cq_ring, self._sqes):
            mapping.close()
        os.close(self.eventfd)
        os.close(self.fd)


def map_rings(fd: int, params: ctypes.Array, sqe_size: int
              ) -> tuple[tuple[int, int, tuple, tuple], tuple[mmap.mmap, mmap.mmap, mmap.mmap]]:
    """Map the SQ ring, the CQ ring and the SQE array of the io_uring `fd`, set up with
    `params` (io_uring_setup's answer in them): (sq_entries, cq_entries, the SQ ring's offsets,
    the CQ ring's offsets), (the three mappings)."""
    sq_entries, cq_entries, *_ = params_head.unpack_from(params)
    sq = sq_offsets.unpack_from(params, params_head.size)
    cq = cq_offsets.unpack_from(params, params_head.size + sq_offsets.size)
    sq_ring = mmap.mmap(fd, sq[6] + sq_entries * 4, offset=IORING_OFF_SQ_RING)
    cq_ring = mmap.mmap(fd, cq[5] + cq_entries * CQE_SIZE, offset=IORING_OFF_CQ_RING)
    sqes = mmap.mmap(fd, sq_entries * sqe_size, offset=IORING_OFF_SQES)
    return (sq_entries, cq_entries, sq, cq), (sq_ring, cq_ring, sqes)


def _why_unavailable(exc: OSError) -> str:
    if exc.errno == errno.ENOSYS:
        return "the kernel has no io_uring"
    if exc.errno == errno.EPERM:
        return f"io_uring is disabled ({DISABLED_SWITCH})"
    return f"io_uring_setup: {exc.strerror}"


@dataclass(slots=True)
class _Read:
    buffer: bytearray
    context: Any


class Reads:
    """Reads in flight on a ReadRing, each into a buffer of its own that stays referenced until
    its completion is reaped: the kernel writes into it until then."""

    def __init__(self, ring: ReadRing) -> None:
        self.ring = ring
        self._in_flight: dict[int, _Read] = {}
        self._next_id = 0
        self.started = 0  # reads queued since the start (a counter for status)

    def __len__(self) -> int:
        return len(self._in_flight)

    def start(self, fd: int, offset: int, length: int, context: Any) -> None:
        """Queue a read; `reaped` gives back (context, buffer, res) once it completes."""
        buffer = bytearray(length)
        read_id = self._next_id
        self._next_id += 1
        self.ring.queue_read(fd, offset, _address(buffer), length, read_id)
        self._in_flight[read_id] = _Read(buffer, context)
        self.started += 1

    def reaped(self) -> list[tuple[Any, bytearray, int]]:
        """The reads that completed: (context, buffer, res: bytes read or -errno)."""
        done = []
        for read_id, res in self.ring.completions():
            read = self._in_flight.pop(read_id)
            done.append((read.context, read.buffer, res))
        return done

    def wait_all(self) -> list[tuple[Any, bytearray, int]]:
        """Block until every read in flight completed; all of them, reaped (for the end of a
        session: the ring may be closed and the buffers freed only after this)."""
        done = self.reaped()
        while self._in_flight:
            self.ring.wait_for(1)
            done += self.reaped()
        return done
