"""How much background hydration may have in flight: enough to keep the source busy, not so
much that a user read waits long behind it.

A user read of an unhydrated region goes to the source behind every hydration copy already
asked for. On a fast source that queue is what keeps the source busy (nbdkit reading its disk
gave 720 MB/s with 16 MiB in flight and 820 with 128 MiB); on a slow link it is only delay: at
50 MB/s, 128 MiB in flight kept each user read waiting 0.3-1 s. So the depth follows the copies'
latency, like TCP Vegas. While a copy takes little longer than the quickest one did, nothing is
queueing: the depth grows by the bytes the copy completed (doubling per round trip). A copy that
took QUEUE_TIME longer than the quickest shows a queue: the depth drops to what the copies
delivered over the last RATE_WINDOW would move in the quickest copy's time plus QUEUE_TIME. A
user read then waits about QUEUE_TIME behind hydration on any link, while a fast source keeps
the configured depth.

Sans-IO: the engine reports each finished copy and asks for the depth.
"""

from __future__ import annotations

from collections import deque

QUEUE_TIME = 0.2  # seconds a copy may take beyond the quickest one before the depth shrinks
RATE_WINDOW = 1.0  # seconds of finished copies the delivery rate is measured over


class HydrationPacer:
    """Bytes of hydration copies to keep in flight, between FLOOR and the configured CAP."""

    def __init__(self, cap: int, floor: int, start: int) -> None:
        self._wanted_floor = floor
        self.cap = cap
        self.floor = min(floor, cap)
        self._depth = max(self.floor, min(start, cap))
        self.quickest = float("inf")  # seconds: the fastest copy so far, queued behind nothing
        self._finished: deque[tuple[float, int]] = deque()  # (when, bytes) within RATE_WINDOW
        self._finished_bytes = 0

    @property
    def depth(self) -> int:
        return self._depth

    def set_cap(self, cap: int) -> None:
        self.cap = cap
        self.floor = min(self._wanted_floor, cap)
        self._depth = max(self.floor, min(self._depth, cap))

    def copied(self, nbytes: int, seconds: float, now: float) -> None:
        """A copy of NBYTES finished at NOW, SECONDS after it started."""
        self._note_finished(nbytes, now)
        self.quickest = min(self.quickest, seconds)
        if seconds <= self.quickest + QUEUE_TIME:
            self._depth = min(self.cap, self._depth + nbytes)
        else:
            affordable = int(self.delivery_rate(now) * (self.quickest + QUEUE_TIME))
            self._depth = max(self.floor, min(self._depth, affordable))

    def delivery_rate(self, now: float) -> float:
        """Bytes per second the copies that finished in the last RATE_WINDOW delivered."""
        if len(self._finished) < 2:
            return 0.0
        span = max(now - self._finished[0][0], 1e-3)
        return (self._finished_bytes - self._finished[0][1]) / span

    def _note_finished(self, nbytes: int, now: float) -> None:
        self._finished.append((now, nbytes))
        self._finished_bytes += nbytes
        while len(self._finished) > 2 and now - self._finished[0][0] > RATE_WINDOW:
            self._finished_bytes -= self._finished.popleft()[1]


class PrefetchPacer:
    """Bytes a prefetch keeps in flight. A prefetch fetches what users read before, so it goes
    at full depth (CAP) through its trace's first burst (claimed at mount: a start-up must find
    it fetched, and no user read has told it apart yet) and while users need it: a user waits
    for data it (or copy-on-read) must fetch, or reads what it fetched (it is ahead of them).
    While users only read other hydrated data, receiving it competes with them for the
    daemon's CPU on the same cores (row 9: p99 of their reads 30-60x idle), so it keeps YIELD
    in flight. Otherwise (users idle, or not there yet) it starts at FIRST and grows by each
    finished copy, doubling per round trip, up to CAP; it starts from FIRST again after
    yielding, so that a user who comes back finds little claimed ahead."""

    def __init__(self, cap: int, first: int, yielding: int) -> None:
        self.cap = cap
        self._first = first
        self._yielding = yielding
        self._window = min(first, cap)

    def set_cap(self, cap: int) -> None:
        self.cap = cap
        self._window = min(self._window, cap)

    def depth(self, *, users_need_it: bool, user_active: bool, first_burst: bool = False) -> int:
        if first_burst:
            return self.cap  # the window stays: after the burst, the rules below
        if users_need_it:
            self._window = self.cap
        elif user_active:
            self._window = min(self._first, self.cap)
            return min(self._yielding, self.cap)
        return self._window

    def copied(self, nbytes: int, *, user_active: bool) -> None:
        """A prefetch copy of NBYTES finished."""
        if not user_active:
            self._window = min(self.cap, self._window + nbytes)
