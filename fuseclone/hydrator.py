"""Background hydration's scheduling: what to copy next, how much at once, and when to wait.

The hydrator decides; the engine acts. It asks the engine for free runs of regions, claims
them and has the engine copy them (the engine's `copy` writes DST through the copier, then
sets the regions' bits and releases the claim: the I/O rules stay in engine.py). What the
hydrator owns is the order (`HydrationOrder`: the prefetch trace, hot spots, then in order),
how much is in flight (the pacer under `hydration_threshold`, one small copy at a time while
the image is in use; a prefetch's own pacer), the rate limit, retries with exponential backoff
and the stop after `max_failures` (then one try each `retry_stopped`), the hold until the
image is mounted, and readahead's copies for the engine's stream detector, under the same
threshold.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import trio

from .errors import describe
from .metadata import Metadata, MetadataMode
from .ordering import HydrationOrder
from .pacing import HydrationPacer, PrefetchPacer
from .sources.base import Source
from .trace import TraceRecorder

if TYPE_CHECKING:
    from .engine import Settings, _Claim

log = logging.getLogger(__name__)

# While the image is in use, copies shrink to 256 KiB with a 5 ms pause between them
# (Settings.user_io_pause): a user read that reaches the disk waits behind whatever copy I/O the
# device is busy with, so small copies keep its tail short. At the same ~50 MB/s of hydration,
# p99 of 4 KiB QD1 reads of a cold hydrated range was 2.2-2.5x idle with 1 MiB / 20 ms, and
# 1.7-1.8x with 256 KiB / 5 ms (128 KiB / 2.5 ms: 1.4-1.6x, for 14% more daemon CPU).
BUSY_BATCH_BYTES = 256 << 10
# Hydration in order skips this far past a writer filling unhydrated regions in order: copying
# what it is about to replace made it wait for each copy (256 MiB of 1 MiB writes behind a 5 ms
# source: 77 MB/s, against 424 without hydration).
WRITER_LEAD_BYTES = 64 << 20
# Hydration's depth starts here and follows the copies' latency (pacing.py), never under the floor.
PACED_START = 8 << 20
PACED_FLOOR = 512 << 10
# A prefetch claims its trace's first burst at mount, at full depth: what the first clone read
# before its reads first paused for PREFETCH_BURST_PAUSE (a start-up, which the prefetch must
# finish before the clone's own start-up reads it: row 9's start-up trace, 32.7 MiB in 0.67 s,
# pauses 19 ms at most). Row 9's latency trace pauses 67-238 ms (1,500 reads of hydrated data)
# between its first 32 MiB and the 128 MiB streamed beside users' reads, which must not be
# claimed at once (p99 beside the prefetch 6-16 ms when it is). Then at least
# PREFETCH_START_BYTES in flight, growing as copies finish, and one copy of at most
# PREFETCH_YIELD_BYTES while users only read other hydrated data (PrefetchPacer).
PREFETCH_BURST_PAUSE = 0.05  # seconds
PREFETCH_START_BYTES = 4 << 20
PREFETCH_YIELD_BYTES = 256 << 10
# Readahead for sequential readers (readahead.py): at most this far ahead of a stream, in copies
# of a quarter of its window within these bounds (a reader waits for the copy it reaches).
READAHEAD_MAX_WINDOW = 8 << 20
READAHEAD_MIN_COPY = 64 << 10
READAHEAD_MAX_COPY = 1 << 20


class HydrationTarget(Protocol):
    """What the hydrator uses of the engine: its claims, its copies, user activity, state."""

    meta: Metadata
    settings: Settings
    source: Source
    changed: trio.lowlevel.ParkingLot  # unparked when claims are released or settings change
    recorder: TraceRecorder | None
    hydration_error: str | None  # setting it wakes whoever waits for hydration to settle
    hydration_errors: int
    write_frontier: int  # the region after the latest user write that filled unhydrated regions

    def claim(self, regions: range, *, ahead: bool = False) -> _Claim: ...

    def free_run(self, start: int, stop: int, limit: int) -> range | None: ...

    async def copy(self, claim: _Claim) -> None: ...

    def user_active(self) -> bool: ...

    def users_need_fetching(self) -> bool: ...


class Hydrator:
    """Schedules background hydration copies for an engine (see the module's docstring)."""

    def __init__(self, engine: HydrationTarget) -> None:
        self._engine = engine
        self.meta = engine.meta
        self.settings = engine.settings  # the engine's, changed in place by messages
        self.geometry = engine.meta.geometry
        self._changed = engine.changed
        self._claim = engine.claim
        self._free_run = engine.free_run
        self._copy = engine.copy
        self._user_active = engine.user_active
        self._users_need_fetching = engine.users_need_fetching
        self._inflight_regions = 0
        self._pacer = HydrationPacer(self._threshold_bytes(), PACED_FLOOR, PACED_START)
        self._prefetch_pacer = PrefetchPacer(self._threshold_bytes(), PREFETCH_START_BYTES,
                                             PREFETCH_YIELD_BYTES)
        self._failures = 0
        self._resume_at = 0.0
        self._stopped_by_failures = False  # hydration_error is ours: a try now and then may end it
        self._stopped_at = 0.0  # when failures last stopped it: copies begun before prove nothing
        self._last_failure = ""  # why the latest copy failed, while failures are being retried
        self._rate_tokens = 0.0
        self._rate_stamp = -1e9
        self._rate_change = trio.Event()  # ends a wait under the old max_rate
        self._hydration_hold: trio.Event | None = None
        # Hydration that follows the user: prefetch trace, readahead, hot spots (ordering.py).
        self.order = HydrationOrder(self.meta.nr_regions, self.geometry.region_size)
        self._readahead_inflight = 0  # bytes
        self.fetched = {"prefetch": 0, "readahead": 0, "hot_spots": 0}  # bytes claimed, for status

    def prefetch(self, runs: list[range], first_burst: int = 0) -> None:
        """Call before `run`: hydrate these runs of regions first, in this order, the first
        `first_burst` of them at full depth (PrefetchPacer)."""
        self.order = HydrationOrder(self.meta.nr_regions, self.geometry.region_size, runs,
                                    first_burst)

    def hold(self) -> None:
        """Call before `run`: background copies wait until `release()`."""
        self._hydration_hold = trio.Event()

    def release(self) -> None:
        if self._hydration_hold is not None:
            self._hydration_hold.set()

    def copies_in_flight(self) -> bool:
        """Whether copies (a prefetch's, hydration's, readahead's) are under way."""
        return self._inflight_regions > 0

    def resume(self) -> None:
        """Forget past failures, any backoff and the stop (enable_hydration)."""
        self._failures = 0
        self._resume_at = 0.0
        self._stopped_by_failures = False
        self._engine.hydration_error = None

    def threshold_changed(self) -> None:
        self._pacer.set_cap(self._threshold_bytes())
        self._prefetch_pacer.set_cap(self._threshold_bytes())

    # ---- the hydrator ---------------------------------------------------------------------

    async def run(self) -> None:
        """Copy regions until every one is hydrated (the engine then commits)."""
        if self._hydration_hold is not None:
            await self._hydration_hold.wait()
        await self._wait_for_source()
        cursor = 0
        async with trio.open_nursery() as copies:
            while not self.meta.complete:
                if trio.current_time() < self._resume_at:
                    # Backing off after a failure; enable_hydration (which clears the deadline)
                    # or any other change ends the wait early.
                    with trio.move_on_at(self._resume_at):
                        await self._changed.park()
                    continue
                if not self._may_start_batch():
                    await self._changed.park()
                    continue
                prefetching = self.order.prefetching
                claim, in_order = self._next_batch(cursor)
                if claim is None:
                    if cursor:
                        cursor = 0
                    else:
                        await self._changed.park()  # the rest is claimed by others
                    continue
                if in_order:
                    cursor = claim.regions.stop
                if self._stopped_by_failures:
                    self._note_try()
                self._inflight_regions += len(claim.regions)
                copies.start_soon(self._hydrate_batch, claim)
                await self._throttle(len(claim.regions) * self.geometry.region_size)
                if self._user_active() and not prefetching:
                    # Yield to user I/O: one batch at a time (see _may_start_batch) with a pause
                    # between batches, or on two cores p99 user latency grew 6x while hydrating.
                    await trio.sleep(self.settings.user_io_pause)

    async def _wait_for_source(self) -> None:
        """A clone resumed while its source was down hydrates once the source answers (and
        matches META); if it answers with another image, hydration stops with the reason."""
        refusal = await self._engine.source.wait_usable()
        if refusal is not None:
            self._engine.hydration_error = refusal
            log.error("hydration stopped: %s", refusal)

    def _may_start_batch(self) -> bool:
        s = self.settings
        if self.meta.mode is not MetadataMode.RW:
            return False
        if self._engine.hydration_error is not None:
            # Stopped after failures: one copy now and then tries whether the cause is gone.
            return ((s.hydration or self.order.prefetching) and self._inflight_regions == 0
                    and self._try_due())
        if self.order.prefetching:  # even with background hydration disabled
            depth = self._prefetch_depth()
            return self._inflight_regions + self._prefetch_batch(depth) <= depth
        if not s.hydration:
            return False
        batch = self._batch_regions()
        limit = min(s.hydration_threshold, max(1, self._pacer.depth // self.geometry.region_size))
        if self._user_active():
            limit = min(limit, batch)  # yield to user I/O: one batch at a time
        return self._inflight_regions + batch <= max(limit, batch)

    def stores_allowed(self) -> bool:
        """Whether copy-on-read may store what users read: unless hydration stopped; after a
        stop by failures, one store in each `retry_stopped` tries whether the cause is gone
        (its success resumes hydration, as a background copy's does)."""
        if self._engine.hydration_error is None:
            return True
        if not self._try_due():
            return False
        self._note_try()
        return True

    def _try_due(self) -> bool:
        """After a stop by failures: whether it is time to try a copy."""
        return self._stopped_by_failures and trio.current_time() >= self._resume_at

    def _note_try(self) -> None:
        """A try is made: the next one is retry_stopped from now, whatever this one does."""
        self._resume_at = trio.current_time() + self.settings.retry_stopped

    def _batch_regions(self) -> int:
        """Regions per copy: the configured batch; smaller while the user is active, and while
        the paced depth is small (a copy is then a quarter of it), so a user read does not
        wait behind one large copy on a slow link."""
        region_size = self.geometry.region_size
        busy = max(1, BUSY_BATCH_BYTES // region_size)
        if self._user_active():
            return min(self.settings.hydration_batch_size, busy)
        paced = max(busy, self._pacer.depth // 4 // region_size)
        paced = 1 << (paced.bit_length() - 1)  # few distinct sizes: the source reuses buffers by size
        return min(self.settings.hydration_batch_size, paced)

    def _prefetch_depth(self) -> int:
        """Regions a prefetch may have in flight now (see PrefetchPacer)."""
        depth = self._prefetch_pacer.depth(users_need_it=self._users_need_fetching(),
                                           user_active=self._user_active(),
                                           first_burst=self.order.in_first_burst)
        return max(1, depth // self.geometry.region_size)

    def _prefetch_batch(self, depth: int) -> int:
        """Regions per prefetch copy at `depth`: a quarter of it (copies finish, and the
        depth grows, a piece at a time), the whole of it while yielding to users."""
        yielding = max(1, PREFETCH_YIELD_BYTES // self.geometry.region_size)
        return min(self.settings.hydration_batch_size, depth, max(yielding, depth // 4))

    def _threshold_bytes(self) -> int:
        return self.settings.hydration_threshold * self.geometry.region_size

    def _next_batch(self, cursor: int) -> tuple[_Claim | None, bool]:
        """Claim the next copy, in hydration's order: the prefetch trace, hot spots, then in
        order from `cursor`. Also says whether it was the in-order one."""
        if self.order.prefetching:
            run = self.order.next_prefetch(self._free_run,
                                           self._prefetch_batch(self._prefetch_depth()))
            if run is not None or not self.settings.hydration:
                return self._claim_for("prefetch", run, ahead=True, prefetch=True), False
        run = self.order.next_hot(self._free_run, self._batch_regions())
        if run is not None:
            return self._claim_for("hot_spots", run), False
        run = self._free_run(cursor, self.meta.nr_regions, self._batch_regions())
        if run is not None and run.start == self._engine.write_frontier and self._user_active():
            # A writer is filling these regions: a copy would make it wait, then be overwritten.
            lead = run.start + WRITER_LEAD_BYTES // self.geometry.region_size
            run = self._free_run(lead, self.meta.nr_regions, self._batch_regions()) or run
        return (None if run is None else self._claim(run)), True

    def _claim_for(self, kind: str, run: range | None, *, ahead: bool = False,
                   prefetch: bool = False) -> _Claim | None:
        if run is None:
            return None
        self.fetched[kind] += len(run) * self.geometry.region_size
        return self._claim(run, ahead=ahead, prefetch=prefetch)

    async def _hydrate_batch(self, claim: _Claim) -> None:
        started = trio.current_time()
        try:
            await self._copy(claim)
            self.note_success(started)
            now = trio.current_time()
            nbytes = len(claim.regions) * self.geometry.region_size
            self._pacer.copied(nbytes, now - started, now)
            if claim.prefetch:
                self.order.note_prefetched(claim.regions)
                self._prefetch_pacer.copied(nbytes, user_active=self._user_active())
        except OSError as exc:
            self.note_failure("hydration", claim.regions, exc)
        finally:
            self._inflight_regions -= len(claim.regions)
            self._changed.unpark_all()

    def note_success(self, began: float) -> None:
        """A copy into DST, begun at `began`, worked: failures are no longer in a row, and a
        stop they caused ends (copy-on-read and readahead come back with it). Not a copy begun
        before the stop: its source read (a range away from the failing one, say) says nothing
        of whether the cause is gone, and resuming for it started another round of failures."""
        if self._stopped_by_failures and began < self._stopped_at:
            return
        self._failures = 0
        if self._stopped_by_failures:
            self.resume()
            log.warning("hydration resumed: a copy worked again after the stop")

    def note_failure(self, kind: str, regions: range, exc: OSError) -> None:
        """A copy into DST failed (hydration's, readahead's, or a copy-on-read store): back off
        exponentially; after max_failures in a row, stop, then try one copy each retry_stopped
        seconds until one works (or enable_hydration). Copy-on-read and readahead stop with
        it, so a DST that is full says why once, not once per read."""
        engine = self._engine
        self._failures += 1
        engine.hydration_errors += 1
        self._last_failure = describe(exc)
        s = self.settings
        if engine.hydration_error is None:  # copies in flight when it stopped fail quietly
            log.warning("%s of regions %d..%d failed (%d in a row): %s", kind, regions.start,
                        regions.stop - 1, self._failures, self._last_failure)
        if self._failures >= s.max_failures and engine.hydration_error is None:
            engine.hydration_error = f"stopped after {self._failures} failures: {self._last_failure}"
            self._stopped_by_failures = True
            self._stopped_at = trio.current_time()
            log.error("hydration %s; trying one copy every %g s", engine.hydration_error,
                      s.retry_stopped)
        if self._stopped_by_failures:
            delay = s.retry_stopped
        else:
            delay = min(s.backoff_max, s.backoff_initial * 2 ** (self._failures - 1))
        self._resume_at = max(self._resume_at, trio.current_time() + delay)

    async def _throttle(self, nbytes: int) -> None:
        rate = self.settings.max_rate
        if rate <= 0:
            return
        now = trio.current_time()
        burst = rate * 0.1  # a token bucket holding a tenth of a second's worth
        self._rate_tokens = min(burst, self._rate_tokens + (now - self._rate_stamp) * rate) - nbytes
        self._rate_stamp = now
        if self._rate_tokens < 0:
            with trio.move_on_after(-self._rate_tokens / rate):
                await self._rate_change.wait()

    def rate_changed(self) -> None:
        """max_rate was changed (a message): a wait under the old rate ends, and the new one
        starts with an empty bucket."""
        self._rate_tokens = 0.0
        self._rate_stamp = trio.current_time()
        self._rate_change.set()
        self._rate_change = trio.Event()

    def retry_note(self) -> str | None:
        """While hydration backs off after failures, or has stopped after them: how it stands."""
        wait = max(0.0, self._resume_at - trio.current_time())
        if self._stopped_by_failures:
            return f"one copy every {self.settings.retry_stopped:g} s, next try in {wait:.0f} s"
        if not self._failures or self._engine.hydration_error is not None:
            return None
        return (f"{self._failures} failed in a row (stops at {self.settings.max_failures}), "
                f"next try in {wait:.1f} s: {self._last_failure}")

    # ---- readahead ------------------------------------------------------------------------

    def read_ahead(self, start: int, stop: int, nursery: trio.Nursery) -> None:
        """Start copies of the free regions of [start, stop) into DST, claimed as readahead
        (a reader that reaches one waits for it), in `nursery`, while readahead's copies in
        flight stay within the hydration threshold. Copies are a quarter of the window, so the
        reader's next read waits for a small one."""
        g = self.geometry
        span = g.region_span(start, stop - start)
        copy_bytes = max(READAHEAD_MIN_COPY, min(READAHEAD_MAX_COPY, (stop - start) // 4))
        copy_regions = 1 << (max(1, copy_bytes // g.region_size).bit_length() - 1)
        budget = min(self._threshold_bytes(), READAHEAD_MAX_WINDOW)
        recorder = self._engine.recorder
        pos = span.start
        while (run := self._free_run(pos, span.stop, copy_regions)) is not None:
            nbytes = len(run) * g.region_size
            if self._readahead_inflight + nbytes > budget:
                break
            self._readahead_inflight += nbytes
            self._inflight_regions += len(run)
            self.fetched["readahead"] += nbytes
            if recorder is not None:
                recorder.fetched_ahead(run)
            nursery.start_soon(self._fetch_ahead, self._claim(run, ahead=True))
            pos = run.stop

    async def _fetch_ahead(self, claim: _Claim) -> None:
        nbytes = len(claim.regions) * self.geometry.region_size
        began = trio.current_time()
        try:
            await self._copy(claim)
            self.note_success(began)
        except OSError as exc:  # the reader reads the source itself
            self.note_failure("readahead", claim.regions, exc)
        finally:
            self._readahead_inflight -= nbytes
            self._inflight_regions -= len(claim.regions)
            self._changed.unpark_all()
