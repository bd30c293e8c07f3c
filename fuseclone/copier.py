"""Moving bytes from the source into the destination: hydration copies and copy-on-read stores.

The copier knows nothing of claims or bits: the engine claims regions, has them copied here,
and sets their bits once the copy returned (see engine.py). What it owns is how the bytes
travel: the source's zero extents become holes, a copy is read into page-aligned memory where
the source can (`Source.read_for_copy`) and then written to DST with direct I/O, other copies
are written buffered with their writeback started at once and dropped from DST's page cache a
window later (`Destination.start_writeback`, `Destination.forget`), all-zero regions of a copy
are punched rather than written, buffers go back to the source once written (`recycle`), and
only a few threads write at a time. While users are active, a copy reaches DST's disk in small
pieces, one at a time (BOUNDED_WRITE_BYTES).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator

import trio

from .destination import Destination
from .errors import describe
from .regions import Geometry
from .sources.base import Extent, Source, SourceReadError
from .threads import in_thread

_ZEROS = bytes(1 << 20)
WRITEBACK_WINDOW = 64 << 20  # hydration copies kept in DST's page cache before they are dropped
COPY_WRITER_THREADS = 2
# While users are active, copies reach DST's disk this much at a time: each piece written and
# its writeback waited for before the next, so a user's read of DST waits behind one piece at
# most, not behind every copy the disk has accepted (a prefetch's did: many ms). Small enough
# for a read's tail, large enough to write far faster than a source delivers; the measurements
# behind it are in docs/benchmark/row9-follow-users.md.
BOUNDED_WRITE_BYTES = 128 << 10


class Copier:
    """Copies byte ranges of the image from the source into DST (blocking work in threads)."""

    def __init__(self, source: Source, dst: Destination, geometry: Geometry,
                 users_active: Callable[[], bool] = lambda: False) -> None:
        self.source = source
        self.dst = dst
        self.geometry = geometry
        self._users_active = users_active  # on the event loop: whether copies write in pieces
        self._piece_lock = threading.Lock()  # one piece at DST's disk at a time
        self.source_reads = 0  # bytes read from the source, for status and tests
        # Hydration copies write DST from a few threads only: more just contend for its inode lock.
        self._copy_writers = trio.CapacityLimiter(COPY_WRITER_THREADS)
        # Copies' pieces go to DST's disk one at a time anyway: one thread waits for them, and
        # the writers above are free to put the next copies into DST's page cache meanwhile.
        self._piece_writer = trio.CapacityLimiter(1)
        self._copied: deque[tuple[int, int]] = deque()
        self._copied_bytes = 0
        self._asked = itertools.count()
        self._asking: dict[int, float] = {}  # the source's requests in flight: when each began

    async def copy(self, regions: range, *, prefetch: bool = False,
                   readable: Callable[[], None] = lambda: None) -> None:
        """Copy the regions from the source into DST, keeping zeros as holes, calling
        `readable()` once DST holds the copy for readers. Raises OSError.

        A `prefetch` copy (of a trace: regions users read, and will again soon) asks for no
        block status, which only delayed it (a round trip per 64 MiB window: the start-up
        workload's first copies waited 30-100 ms on a cold server; zeros still become holes),
        and stays in DST's page cache, where the user's reads find it (the workload's files
        read in 0.037 s instead of 0.079 s from DST's disk).

        A buffered copy made while users are active goes to DST's disk in pieces after
        `readable()`: users waiting for it read it from DST's page cache meanwhile (the
        start-up workload waits for its prefetch copies, and waited for its 32 MiB to reach
        DST's disk 128 KiB at a time)."""
        start, nbytes = self.geometry.byte_range(regions)
        if prefetch:
            extents = [Extent(start, nbytes, zero=False)]
        else:
            with self._asking_source():
                extents = await self.source.extents(start, nbytes)
        unwritten: list[tuple[int, int]] = []  # in DST's page cache, for the disk in pieces
        for extent in extents:
            if extent.zero:
                await in_thread(self.dst.punch_hole, extent.offset, extent.length)
            else:
                data = await self.source_read(extent.offset, extent.length, for_copy=True)
                direct = not prefetch and self.dst.can_write_direct(extent.offset, data)
                kept = direct or prefetch  # not dropped from the page cache later
                stale = [] if kept else self._note_copied(extent.offset, len(data))
                in_pieces = self._users_active()
                await in_thread(self._store_copy, extent.offset, data, stale,
                                direct, in_pieces, limiter=self._copy_writers)
                self.source.recycle(data)  # written: the source may reuse the buffer
                if in_pieces and not direct:
                    unwritten.append((extent.offset, len(data)))
        readable()
        if unwritten:
            await in_thread(self._write_back_in_pieces, unwritten, limiter=self._piece_writer)

    def _note_copied(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Remember a hydration copy; return the copies now more than WRITEBACK_WINDOW behind."""
        self._copied.append((offset, length))
        self._copied_bytes += length
        stale = []
        while self._copied_bytes > WRITEBACK_WINDOW:
            old = self._copied.popleft()
            self._copied_bytes -= old[1]
            stale.append(old)
        return stale

    def _store_copy(self, offset: int, data: bytes, stale: list[tuple[int, int]],
                    direct: bool = False, in_pieces: bool = False) -> None:
        """Blocking: write a hydration copy. A copy in aligned memory (the NBD source's) goes
        to DST with direct I/O: no copy into the page cache, which was 38% of the daemon's CPU
        hydrating from NBD (`perf`), and nothing to write back or drop later. Otherwise start
        its writeback at once, like nbdcopy, so dirty data stays bounded and commits' fdatasync
        stays short, and drop the page cache of copies written a window ago. `in_pieces`
        (users are active): a direct copy is written BOUNDED_WRITE_BYTES at a time; a buffered
        one is left to `_write_back_in_pieces`. Either way the data is durable only after the
        commit's datasync, which comes before its bits."""
        self.write_or_punch(offset, data, direct, BOUNDED_WRITE_BYTES if in_pieces and direct else 0)
        if not direct and not in_pieces:
            self.dst.start_writeback(offset, len(data))
        for old_offset, old_length in stale:
            self.dst.forget(old_offset, old_length)

    def write_or_punch(self, offset: int, data: bytes, direct: bool = False, piece: int = 0) -> None:
        """Blocking: all-zero regions become holes, so the destination stays sparse. With a
        `piece` size, the rest goes to DST's disk in pieces of that size, one at a time."""
        view = memoryview(data)
        write = self.dst.write_direct if direct else self.dst.write
        for is_zero, lo, hi in _zero_runs(data, self.geometry.region_size):
            if is_zero:
                self.dst.punch_hole(offset + lo, hi - lo)
            elif piece:
                for at in range(lo, hi, piece):
                    self._write_piece(write, offset + at, view[at : min(hi, at + piece)], direct)
            else:
                write(offset + lo, view[lo:hi])

    def _write_back_in_pieces(self, ranges: list[tuple[int, int]]) -> None:
        """Blocking: the ranges, written to DST's page cache, reach its disk a piece at a
        time, each waited for while no other piece is on its way there."""
        for offset, length in ranges:
            for at in range(offset, offset + length, BOUNDED_WRITE_BYTES):
                with self._piece_lock:
                    self.dst.write_back(at, min(BOUNDED_WRITE_BYTES, offset + length - at))

    def _write_piece(self, write: Callable[[int, memoryview], object], offset: int,
                     data: memoryview, direct: bool) -> None:
        """Blocking: `write` the piece and wait until DST's disk has it, while no other piece
        is on its way there (a direct write returns once the disk has it)."""
        with self._piece_lock:
            write(offset, data)
            if not direct:
                self.dst.write_back(offset, len(data))

    async def source_read(self, offset: int, length: int, *, for_copy: bool = False) -> bytes:
        """Bytes from the source (for a copy: maybe page-aligned memory, to `recycle` once
        written). A failed read is an EIO OSError."""
        try:
            with self._asking_source():
                if for_copy:
                    data = await self.source.read_for_copy(offset, length)
                else:
                    data = await self.source.read(offset, length)
        except SourceReadError as exc:
            raise OSError(errno.EIO, f"source read failed: {describe(exc)}") from exc
        self.source_reads += len(data)
        return data

    def source_waited(self) -> float:
        """Seconds the oldest request to the source still in flight has waited (0 if none)."""
        if not self._asking:
            return 0.0
        return trio.current_time() - next(iter(self._asking.values()))

    @contextlib.contextmanager
    def _asking_source(self) -> Iterator[None]:
        key = next(self._asked)
        self._asking[key] = trio.current_time()  # in order: the first is the oldest
        try:
            yield
        finally:
            del self._asking[key]


def _zero_runs(data: bytes | bytearray, step: int) -> list[tuple[bool, int, int]]:
    """Split `data` into maximal runs of all-zero / not-all-zero `step`-sized pieces.

    Only pieces whose first byte is zero can be all-zero; they are found with one strided copy
    and checked with a `find` of a zero piece as long as their window (a memcmp, no slice
    copies; unlike startswith it also works on an mmap), so random data costs almost nothing
    and zero-filled data runs at memcmp speed rather than element-wise memoryview comparison."""
    step = min(step, len(_ZEROS))
    size = len(data)
    zero_piece = _ZEROS[:step]
    heads = bytes(memoryview(data)[::step])
    runs: list[tuple[bool, int, int]] = []
    covered = 0  # bytes of data already in runs
    index = heads.find(0)
    while index >= 0:
        lo = index * step
        hi = min(size, lo + step)
        if data.find(zero_piece[: hi - lo], lo, hi) == lo:
            if covered < lo:
                runs.append((False, covered, lo))
            if runs and runs[-1][0] and runs[-1][2] == lo:
                runs[-1] = (True, runs[-1][1], hi)
            else:
                runs.append((True, lo, hi))
            covered = hi
        index = heads.find(0, index + 1)
    if covered < size:
        runs.append((False, covered, size))
    return runs
