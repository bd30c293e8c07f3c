"""The daemon's malloc heap: one arena for every thread, and the memory that bursts freed
given back to the system once the daemon goes idle.

Large per-request buffers (source reads of up to 4 MiB, DST reads, FUSE replies) are Python
bytes objects, malloc'd in whichever thread asks. glibc gives each new thread an arena of its
own (up to 8 per core), and each keeps what was freed in it: after 24 concurrent readers the
daemon held 40-50 MiB free in a dozen arenas (docs/benchmark/memory.md).
Python allocates only while holding the GIL, so threads never contend for one arena. Freed
memory inside the heap, below chunks still in use, goes back only through malloc_trim."""

from __future__ import annotations

import logging
import time

from .libc import M_ARENA_MAX, libc

log = logging.getLogger(__name__)


def use_one_arena() -> None:
    """Have every thread allocate from the main arena. Call before any thread starts: a thread
    keeps the arena it was given."""
    if not libc.mallopt(M_ARENA_MAX, 1):
        log.debug("mallopt(M_ARENA_MAX) refused: threads keep arenas of their own")


def give_back_free_memory() -> None:
    """Return the heap's free pages to the system (malloc_trim). Takes the arena's lock: a
    few milliseconds for tens of MiB free."""
    started = time.perf_counter()
    libc.malloc_trim(0)
    log.debug("free heap memory given back in %.1f ms", (time.perf_counter() - started) * 1e3)


class IdleTrim:
    """When to give free memory back: at the first quiet tick after busy ones. A tick is quiet
    when the daemon's activity (anything that changes while users do I/O or hydration
    copies) is what it was at the tick before."""

    def __init__(self) -> None:
        self._last: object = None
        self._busy = False

    def tick(self, activity: object) -> bool:
        """Whether to trim now, given this tick's activity."""
        quiet = activity == self._last
        self._last = activity
        if not quiet:
            self._busy = True
            return False
        trim, self._busy = self._busy, False
        return trim
