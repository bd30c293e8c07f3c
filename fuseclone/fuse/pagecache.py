"""Which parts of the image the kernel's page cache may hold: what the READs of caching opens
asked for (the kernel fills their pages with what DST held), and what buffered writes wrote
(a write-through one fills its pages before it is sent; the write cache's hold them until
written back). fs.py asks it whether a direct writer's write must have its range dropped
again before it is answered, and a write whose range none of those touched since the last
drop of it needs none (an idle buffered open beside a `--direct-io=on` loop device: no
invalidation at all).

Sans-IO, and safe for threads: READs and writes are noted on the event loop as they come,
direct writes ask from whichever thread finished their data, and an invalidation tells of its
end from the thread that made it.

Why a note when a request comes is enough: a direct write asks once its data is in DST. A
READ or buffered write noted after that reads or writes DST after it, so what it caches is
what DST holds. One noted before: a READ's pages are in the page cache (locked) before the
kernel sends it, so the invalidation, which starts after, finds them, waits for the answer if
they are still locked, and drops them; a buffered write's pages were filled before it was sent.
What is noted after an invalidation was planned stays noted: it may fill pages the
invalidation has passed.

By pages, not by the 64 KiB chunks they are kept in: a write drops only its own pages, which
the kernel had dropped already before it sent the write, so only those filled since go again.
Dropping whole chunks cost a buffered random reader beside a direct writer half its reads:
each write took 16 of its cached pages away.

Not noted: READs of FOPEN_DIRECT_IO opens, which bypass the page cache, but for a shared mmap
of such an open, whose faults fill it (no request tells that it was mapped; such an mmap was
never counted as a caching open either).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

PAGE = 4096  # noted and dropped by pages: the kernel caches whole ones, of this size at least
CHUNK = 64 << 10  # pages noted together, as one mask
PAGES_PER_CHUNK = CHUNK // PAGE
# Chunks noted at most (about 8 MiB of memory: 4 GiB of the image read since its last drops).
# Beyond, the whole image counts as read, until one invalidation of all of it ends.
MAX_CHUNKS = 1 << 16


@dataclass(frozen=True, slots=True)
class Invalidation:
    """A range to drop from the page cache: `length` bytes at `offset`. `seen`: the notes
    made when it was planned, all of whose pages in its range it drops."""

    offset: int
    length: int
    seen: int


class CachedRanges:
    def __init__(self, size: int) -> None:
        self._size = size  # the image's
        self._lock = threading.Lock()
        self._notes = 0  # READs and writes noted so far: each one's number is the count after it
        # chunk -> (the number of its last note, the mask of its pages noted)
        self._noted: dict[int, tuple[int, int]] = {}
        self._all_noted_at = 0  # too many chunks: every page was noted by this note

    def note_cached(self, offset: int, length: int) -> None:
        """A READ of a caching open or a buffered write came: its pages may be cached from
        now on."""
        with self._lock:
            self._notes += 1
            if len(self._noted) >= MAX_CHUNKS:
                self._all_noted_at = self._notes
                self._noted.clear()
                return
            for chunk, pages in _pages(offset, length):
                noted = self._noted.get(chunk, (0, 0))[1]
                self._noted[chunk] = (self._notes, noted | pages)

    def plan(self, offset: int, length: int) -> Invalidation | None:
        """What to drop for a write of `length` bytes at `offset` that has reached DST, before
        it is answered: its pages, or None if nothing noted any of them since they were last
        dropped."""
        with self._lock:
            if self._all_noted_at:
                return Invalidation(0, self._size, self._notes)
            if not any(self._noted.get(chunk, (0, 0))[1] & pages
                       for chunk, pages in _pages(offset, length)):
                return None
            start = offset // PAGE * PAGE
            end = -(-(offset + max(length, 1)) // PAGE) * PAGE
            return Invalidation(start, end - start, self._notes)

    def dropped(self, done: Invalidation) -> None:
        """`done` has ended: what was noted before it was planned has nothing cached in its
        range any more. A chunk noted since keeps all its pages noted: which of them the later
        note filled is not kept."""
        with self._lock:
            if done.offset == 0 and done.length >= self._size:
                if self._all_noted_at <= done.seen:
                    self._all_noted_at = 0
                self._noted = {chunk: noted for chunk, noted in self._noted.items()
                               if noted[0] > done.seen}
                return
            for chunk, pages in _pages(done.offset, done.length):
                last, noted = self._noted.get(chunk, (done.seen + 1, 0))
                if last > done.seen:
                    continue
                if noted & ~pages:
                    self._noted[chunk] = (last, noted & ~pages)
                else:
                    del self._noted[chunk]


def _pages(offset: int, length: int) -> Iterator[tuple[int, int]]:
    """(chunk, mask of its pages) for each chunk that `length` bytes at `offset` touch."""
    first, last = offset // PAGE, (offset + max(length, 1) - 1) // PAGE
    for chunk in range(first // PAGES_PER_CHUNK, last // PAGES_PER_CHUNK + 1):
        low = max(first, chunk * PAGES_PER_CHUNK) - chunk * PAGES_PER_CHUNK
        high = min(last, chunk * PAGES_PER_CHUNK + PAGES_PER_CHUNK - 1) - chunk * PAGES_PER_CHUNK
        yield chunk, ((1 << (high - low + 1)) - 1) << low
