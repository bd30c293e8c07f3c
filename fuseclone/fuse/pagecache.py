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

Not noted: READs of FOPEN_DIRECT_IO opens, which bypass the page cache, but for a shared mmap
of such an open, whose faults fill it (no request tells that it was mapped; such an mmap was
never counted as a caching open either).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

CHUNK = 64 << 10  # what is noted and dropped together: a READ is at most 1 MiB, 16 chunks
# Chunks noted at most (about 6 MiB of memory: 4 GiB of the image read since its last drops).
# Beyond, the whole image counts as read, until one invalidation of all of it ends.
MAX_CHUNKS = 1 << 16


@dataclass(frozen=True, slots=True)
class Invalidation:
    """A range to drop from the page cache: `length` bytes at `offset`. `seen`: READs noted
    when it was planned, all of whose pages it drops."""

    offset: int
    length: int
    seen: int


class CachedRanges:
    def __init__(self, size: int) -> None:
        self._size = size  # the image's
        self._lock = threading.Lock()
        self._reads = 0  # READs and writes noted so far: each one's number is the count after it
        self._read_at: dict[int, int] = {}  # chunk -> the number of the last note of it
        self._all_read_at = 0  # too many chunks: every chunk was read by READ number this

    def note_cached(self, offset: int, length: int) -> None:
        """A READ of a caching open or a buffered write came: its pages may be cached from
        now on."""
        with self._lock:
            self._reads += 1
            if len(self._read_at) >= MAX_CHUNKS:
                self._all_read_at = self._reads
                self._read_at.clear()
                return
            for chunk in _chunks(offset, length):
                self._read_at[chunk] = self._reads

    def plan(self, offset: int, length: int) -> Invalidation | None:
        """What to drop for a write of `length` bytes at `offset` that has reached DST, before
        it is answered: None if no READ touched its range since that was last dropped."""
        with self._lock:
            if self._all_read_at:
                return Invalidation(0, self._size, self._reads)
            chunks = _chunks(offset, length)
            if not any(chunk in self._read_at for chunk in chunks):
                return None
            return Invalidation(chunks.start * CHUNK, len(chunks) * CHUNK, self._reads)

    def dropped(self, done: Invalidation) -> None:
        """`done` has ended: the READs noted before it was planned have nothing cached in its
        range any more."""
        with self._lock:
            if done.offset == 0 and done.length >= self._size:
                if self._all_read_at <= done.seen:
                    self._all_read_at = 0
                self._read_at = {chunk: read for chunk, read in self._read_at.items()
                                 if read > done.seen}
                return
            for chunk in _chunks(done.offset, done.length):
                if self._read_at.get(chunk, done.seen + 1) <= done.seen:
                    del self._read_at[chunk]


def _chunks(offset: int, length: int) -> range:
    return range(offset // CHUNK, (offset + max(length, 1) - 1) // CHUNK + 1)
