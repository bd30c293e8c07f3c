"""Receive buffers of the NBD source: reads land in them straight from the socket, and the
ones hydration hands back are kept for the next read of the same size and kind."""

from __future__ import annotations

import logging
import mmap
import weakref
from collections.abc import Callable

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
ALIGNED_BUFFER_MIN = 64 * KiB  # reads this large are received into page-aligned memory
HUGE_PAGE = 2 * MiB  # receive buffers this large ask for transparent huge pages


class BufferPool:
    """Buffers by kind and length, at most `limit` bytes of them kept for reuse. The kept ones
    and the page-aligned ones handed out and not yet back never add up to more than the most
    ever out at once: a buffer of a new length pushes kept ones out first. So a copy of odd
    length (a sparse source's extent) replaces a kept buffer instead of coming on top of the
    pool, and hydration's buffers stay within what its copies in flight need (row 6, nbdkit
    sparse-random 1T: the pool's 32 MiB on top of 24 MiB in flight took the peak past 100 MiB).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free_buffers: dict[tuple[type, int], list] = {}  # by kind and length
        self._free_bytes = 0
        # Aligned buffers handed out and not recycled; a lost one (its read failed) leaves by
        # itself when it is freed.
        self._out: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()
        self._most_out = 0  # the most bytes of them out at once

    @property
    def kept_bytes(self) -> int:
        """Bytes of buffers waiting to be reused."""
        return self._free_bytes

    @property
    def out_bytes(self) -> int:
        """Bytes of page-aligned buffers handed out and not recycled (nor freed) yet."""
        return sum(len(buf) for buf in self._out)

    def take(self, length: int, aligned: bool) -> bytearray | mmap.mmap:
        """A receive buffer: a recycled one of this length and kind, else a new one. Aligned
        ones are anonymous mmaps when large: page-aligned, so DST can take them with direct I/O.
        New buffers are zero-filled, and that memset was 8% of the daemon's CPU while hydrating
        from NBD."""
        kind = mmap.mmap if aligned and length >= ALIGNED_BUFFER_MIN else bytearray
        free = self._free_buffers.get((kind, length))
        if free:
            self._free_bytes -= length
            buf = free.pop()
        elif kind is bytearray:
            return bytearray(length)
        else:
            buf = self._new_mapping(length)
        if kind is mmap.mmap:
            self._out.add(buf)
        return buf

    def _new_mapping(self, length: int) -> mmap.mmap:
        out = self.out_bytes + length
        self._most_out = max(self._most_out, out)
        self._drop_oldest_while(lambda: self._free_bytes + out > self._most_out)
        # Private, not mmap's default shared mapping: shared anonymous memory is shmem, slower
        # to fault in (~3% of a hydration from NBD) and shared with forked children.
        buf = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if length >= HUGE_PAGE:
            _ask_for_huge_pages(buf)
        return buf

    def recycle(self, data: bytes | bytearray | mmap.mmap) -> None:
        """Keep DATA (a buffer `take` returned) for a later `take`, if there is room."""
        # Only buffers of reads that returned come back, so no reply can still be arriving
        # into one (a cancelled or failed read's buffer is never handed back).
        n = len(data)
        kind = type(data)
        if kind not in (bytearray, mmap.mmap) or n > self.limit:
            return
        room = self.limit
        if kind is mmap.mmap:
            self._out.discard(data)
            room = min(room, self._most_out - self.out_bytes)  # less for another pool's buffer
        key = (kind, n)
        # Smaller buffers go when a larger one comes back: they are the odd sizes of a sparse
        # source's extents, or the copies of a depth still ramping up, and would otherwise sit
        # in the daemon's memory (row 6 peaked 9 MiB higher). A full pool drops the sizes
        # recycled longest ago, so an odd size cannot keep the usual one out.
        for smaller in [k for k in self._free_buffers if k[1] < n]:
            self._free_bytes -= smaller[1] * len(self._free_buffers.pop(smaller))
        same = self._free_buffers.pop(key, [])
        self._drop_oldest_while(lambda: self._free_bytes + n > room)
        if self._free_bytes + n <= room:
            same.append(data)
            self._free_bytes += n
        if same:
            self._free_buffers[key] = same  # last: the most recently recycled size

    def _drop_oldest_while(self, too_many: Callable[[], bool]) -> None:
        """Forget kept buffers, the sizes recycled longest ago first, while `too_many()`."""
        while too_many() and self._free_buffers:
            oldest = next(iter(self._free_buffers))
            self._free_bytes -= oldest[1] * len(self._free_buffers.pop(oldest))


def _ask_for_huge_pages(buf: mmap.mmap) -> None:
    """Back BUF with huge pages where the kernel can. A direct write from 4 KiB pages becomes
    requests of at most the device's segment limit times 4 KiB (254 x 4 KiB on virtio-blk);
    from 2 MiB pages, of its max_sectors_kb (4 MiB). Hydrating 1 GiB from nbdkit, DST's writes
    went from 440-1540 requests of 0.7-2.4 MiB to 286 of 3.7 MiB, and the disk's busy time from
    1.17-1.60 s to 1.10-1.21 s. The kernel falls back to small pages when it has no huge one."""
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError) as exc:  # a kernel without transparent huge pages
        log.debug("no huge pages for receive buffers: %s", exc)
