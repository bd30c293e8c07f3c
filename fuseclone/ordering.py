"""The order in which background hydration takes regions, before its in-order sweep (sans-IO).

1. the regions of a prefetch trace (`--prefetch`), in the trace's order, at the depth users need
   (pacing.PrefetchPacer), even with background hydration disabled;
2. hot spots: the HOT_SPOT_BYTES-aligned neighbourhood of a region a user just read from the
   source, most recent first (a filesystem keeps related blocks together: the rest of a file, its
   inode table block, its directory);
3. everything else, in order (the engine's cursor).
It also knows which regions the prefetch's finished copies hold: users reading them follow the
prefetch, which must then stay ahead of them (the hydrator paces it, pacing.PrefetchPacer).
Readahead for sequential readers does not queue here: the engine fetches it from the read path
at once (readahead.py).

The engine asks for the next run with `free_run(start, stop, limit)`: the first run of regions
in [start, stop) that are neither hydrated nor claimed, at most `limit` long, or None.
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import Callable

FreeRun = Callable[[int, int, int], "range | None"]

HOT_SPOT_BYTES = 1 << 20
MAX_HOT_SPOTS = 64  # older hot spots are forgotten: they are either done or no longer hot


class HydrationOrder:
    """Prefetch runs, then hot spots; the engine's in-order sweep comes after both."""

    def __init__(self, nr_regions: int, region_size: int, prefetch: list[range] | None = None,
                 first_burst: int = 0) -> None:
        self.nr_regions = nr_regions
        self._hot_regions = max(1, HOT_SPOT_BYTES // region_size)
        self.trace: tuple[range, ...] = tuple(prefetch or ())  # as given, for progress
        self._prefetch: list[range] = list(self.trace)  # what is left of it
        self._prefetch_next = 0  # index of the first trace run not yet fully asked for
        self._first_burst = first_burst  # the trace's first runs, asked for at full depth
        self._prefetched: list[range] = []  # the prefetch's finished copies, sorted by start
        self._hot: deque[range] = deque(maxlen=MAX_HOT_SPOTS)

    @property
    def prefetching(self) -> bool:
        """Whether runs of the trace are left to ask for."""
        return self._prefetch_next < len(self._prefetch)

    @property
    def in_first_burst(self) -> bool:
        """Whether runs of the trace's first burst (what the first clone read before its
        reads first paused) are left to ask for."""
        return self._prefetch_next < min(self._first_burst, len(self._prefetch))

    def next_prefetch(self, free_run: FreeRun, limit: int) -> range | None:
        """The next free run of the trace, at most `limit` regions. Trace runs that are hydrated
        or claimed by someone else are passed over: their data is there or on its way."""
        while self._prefetch_next < len(self._prefetch):
            run = self._prefetch[self._prefetch_next]
            found = free_run(run.start, run.stop, limit)
            if found is not None:
                if found.stop >= run.stop:
                    self._prefetch_next += 1
                else:
                    self._prefetch[self._prefetch_next] = range(found.stop, run.stop)
                return found
            self._prefetch_next += 1
        return None

    def note_prefetched(self, regions: range) -> None:
        """A prefetch copy of `regions` finished (kept merged with its neighbours: copies
        follow each other along the trace, so the list stays short)."""
        runs = self._prefetched
        at = bisect.bisect_left(runs, regions.start, key=_start)
        if at < len(runs) and runs[at].start == regions.stop:
            regions = range(regions.start, runs.pop(at).stop)
        if at > 0 and runs[at - 1].stop == regions.start:
            regions = range(runs.pop(at - 1).start, regions.stop)
            at -= 1
        runs.insert(at, regions)

    def prefetched(self, regions: range) -> bool:
        """Whether a prefetch copy fetched the first of `regions`: a user reading it follows
        the prefetch, which is then ahead of them and should stay so."""
        at = bisect.bisect_right(self._prefetched, regions.start, key=_start) - 1
        return at >= 0 and regions.start < self._prefetched[at].stop

    def note_source_read(self, regions: range) -> None:
        """A user read `regions` from the source: their neighbourhood is hot."""
        size = self._hot_regions
        start = regions.start // size * size
        stop = min(self.nr_regions, -(-regions.stop // size) * size)
        hot = range(start, stop)
        if hot in self._hot:
            self._hot.remove(hot)
        self._hot.append(hot)

    def next_hot(self, free_run: FreeRun, limit: int) -> range | None:
        """A free run in the most recent hot spot that has one, at most `limit` regions."""
        while self._hot:
            spot = self._hot[-1]
            found = free_run(spot.start, spot.stop, limit)
            if found is not None:
                return found
            self._hot.pop()
        return None


def _start(run: range) -> int:
    return run.start
