"""The clone engine: dm-clone's I/O semantics over a source, a destination and the metadata.

Per-region coordination rests on *claims*. A claim is taken synchronously (no await between
looking at a region and claiming it) by whoever is about to fill an unhydrated region in the
destination: a hydration copy, a copy-on-read store, or a user write or discard that replaces the
region whole. Anyone else who needs that region to be stable waits for the claim's release. A
region's hydrated bit is set in core only after its destination write returned, and reaches the
metadata file only after the destination was made durable (see `commit`).

Written bits (changed-block tracking) go the other way round: a user write, discard or zeroing
reaches DST only once the written bits of its chunks are durable in META (`_record_written`),
so that no crash can leave user data in DST that looks like a corrupt copy of the source. A
write replacing unhydrated regions whole need not wait: a commit writes written bits before
hydrated ones, and until their hydrated bits are durable those regions are not compared.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Awaitable, Callable, Iterable, Iterator

import trio

from . import heap
from .copier import Copier
from .destination import Destination
from .errors import MetadataFailedError, SettingError, describe
from .fuse.backend import Continue, Permissions, ReadFrom
from .hydrator import READAHEAD_MAX_WINDOW, Hydrator
from .markahead import MarkAhead
from .metadata import (FEATURE_NO_COPY_ON_READ, FEATURE_NO_DISCARD_PASSDOWN,
                       FEATURE_NO_HYDRATION, MAX_HYDRATION_SETTING, CommitBatch, Metadata,
                       MetadataMode, feature_names)
from .readahead import ReadaheadDetector
from .regions import Geometry
from .sources.base import Source
from .status import Status
from .threads import in_thread
from .trace import TraceRecorder
from .units import parse_size

log = logging.getLogger(__name__)

SEEK_SCAN_LIMIT = 1 << 30
USER_ACTIVE_SECONDS = 0.05  # users who did I/O this recently are active (hydration yields)
# 4 MiB copies: per-copy overhead (claims, tasks, thread hops) made 1 MiB copies from NBD ~25%
# slower. While the image is in use they shrink (hydrator.BUSY_BATCH_BYTES).
DEFAULT_BATCH_BYTES = 4 << 20
INLINE_WRITE_MAX = 1 << 20  # up to one FUSE request: written to DST's page cache on the event loop
# From this size, a write to hydrated regions is copied into the page cache by the FUSE session's
# job thread instead: the copy then overlaps the loop's next reads of /dev/fuse.
HANDED_OVER_WRITE_MIN = 256 << 10
# Direct writes go through to DST's disk while FSYNCs come this often (seconds since the last):
# a database commits. Without flushes, 4 KiB direct writes at iodepth 16 stay in DST's page
# cache (25-36k IOPS through a dio loop device; one by one through to the disk: 8-9k).
COMMITTING_WINDOW = 0.1
# A database's commit is a chain of requests, each waiting for the one before (the kernel holds
# the image's inode lock for each FSYNC, and a loop device waits for each flush). The hop to the
# job thread and back cost each link 60-130 us, so the short ones stay on the event loop: a
# write-through write up to this size (one disk write, ~0.1 ms)...
LOOP_WRITE_THROUGH_MAX = 64 << 10
# ... and the fdatasync of an FSYNC with nothing to commit, while DST has at most this much
# written since the last one began (a flush of the disk's cache and a few pages). Row 7's fio
# (4 jobs, dio=on, three alternating rounds): 1,351 -> 1,755 IOPS (raw loop 4,256).
LOOP_FLUSH_MAX = 64 << 10
# A sequential writer's partial write into unhydrated regions hydrates this much after it too.
WRITE_AHEAD_BYTES = 256 << 10
# A write with both ends in unhydrated regions reads what lies around it in one source read
# (the write's own bytes too, read for nothing) up to this size, else (or when it fails) in two.
MERGED_READ_MAX = 256 << 10
# The bitmap (counted at 3.25x: the bitmap itself plus the rest of a 1 TiB clone's RSS) plus the
# default copies in flight (their buffers) stay within this. A 1 TiB clone at 4 KiB regions (a
# 32 MiB bitmap) hydrating from NBD peaked at 98 MiB of RSS with 32 MiB in flight, too close to
# SPEC's 100 MiB; it gets 24 MiB (84 MiB peak), while a small clone gets 128 MiB.
HYDRATION_MEMORY = 128 << 20
MIN_DEFAULT_DEPTH = 16 << 20
# A read of hydrated data first tries DST's page cache (RWF_NOWAIT). When that misses, its kernel
# time is spent again by the read that follows (cold 4 KiB reads, iodepth 16: 42 us of daemon CPU
# per request with the probe, 28 without; warm reads at iodepth 1 lost a third without it). So
# after this many misses in a row only one read in PROBE_EVERY_WHEN_COLD probes, until one hits.
COLD_AFTER_MISSES = 4
PROBE_EVERY_WHEN_COLD = 32


class _CacheProbes:
    """Whether the next read of hydrated data should probe DST's page cache first."""

    def __init__(self) -> None:
        self.misses = 0  # in a row
        self._skipped = 0

    def wanted(self) -> bool:
        if self.misses < COLD_AFTER_MISSES:
            return True
        self._skipped += 1
        if self._skipped < PROBE_EVERY_WHEN_COLD:
            return False
        self._skipped = 0
        return True

    def found(self, hit: bool) -> None:
        self.misses = 0 if hit else self.misses + 1


@dataclass
class Settings:
    """Run-time switches and tunables (dm-clone's features and core arguments)."""

    hydration: bool = True
    discard_passdown: bool = True
    copy_on_read: bool = True
    hydration_threshold: int = 0  # regions in flight; 0 = the source's hydration_depth worth
    hydration_batch_size: int = 0  # contiguous regions per copy; 0 = the source's hydration_batch worth
    max_rate: int = 0  # bytes/s of hydration, 0 = unlimited
    commit_interval: float = 1.0
    user_io_pause: float = 0.005  # seconds between hydration batches while user I/O is active
    max_failures: int = 8
    backoff_initial: float = 0.1
    backoff_max: float = 10.0
    retry_stopped: float = 60.0  # seconds between single tries once failures stopped hydration

    def resolved(self, geometry: Geometry, source_depth: int,
                 source_batch: int = DEFAULT_BATCH_BYTES) -> Settings:
        """Zero tunables replaced by defaults: as many copies in flight as `default_depth`
        allows, each of `default_batch` bytes."""
        region_size = geometry.region_size
        depth = default_depth(source_depth, geometry)
        batch = default_batch(source_batch, depth)
        return replace(
            self,
            hydration_batch_size=self.hydration_batch_size or max(1, batch // region_size),
            hydration_threshold=self.hydration_threshold or max(1, depth // region_size),
        )

    @property
    def features(self) -> int:
        return ((0 if self.hydration else FEATURE_NO_HYDRATION)
                | (0 if self.discard_passdown else FEATURE_NO_DISCARD_PASSDOWN)
                | (0 if self.copy_on_read else FEATURE_NO_COPY_ON_READ))


def check_hydration_setting(name: str, value: int) -> int:
    """VALUE for hydration_threshold or hydration_batch_size (NAME, as the user spelled it): a
    number of regions that META's header can hold. Raises SettingError otherwise."""
    if not 1 <= value <= MAX_HYDRATION_SETTING:
        raise SettingError(f"{name} must be a number of regions from 1 to {MAX_HYDRATION_SETTING}, "
                           f"not {value}")
    return value


def default_depth(source_depth: int, geometry: Geometry) -> int:
    """Bytes of hydration copies in flight by default: what the source asks for, within what
    the bitmap (x3.25, in whole MiB) leaves of HYDRATION_MEMORY, never under MIN_DEFAULT_DEPTH.
    The factor keeps a 1 TiB clone at 4 KiB regions (32 MiB of bitmap) at 24 MiB in flight,
    under 100 MiB of RSS, while small clones get the whole 128 MiB."""
    bitmap_share = (geometry.nr_regions // 8 * 13 // 4) >> 20 << 20
    return max(MIN_DEFAULT_DEPTH, min(source_depth, HYDRATION_MEMORY - bitmap_share))


def default_batch(source_batch: int, depth: int) -> int:
    """Bytes per hydration copy by default: what the source asks for, but more than
    DEFAULT_BATCH_BYTES only while at least 16 copies stay in flight."""
    return min(source_batch, max(DEFAULT_BATCH_BYTES, depth // 16))


class _Claim:
    """Regions someone is filling in the destination right now."""

    __slots__ = ("regions", "done", "ahead", "prefetch")

    def __init__(self, regions: range, ahead: bool = False, prefetch: bool = False) -> None:
        self.regions = regions
        self.done = trio.Event()
        # A copy asked for ahead of readers (readahead, prefetch): a reader that reaches it
        # waits for it rather than ask the source again.
        self.ahead = ahead
        # A copy of a prefetch trace: regions users read, so data they will read again soon
        # (see Copier.copy).
        self.prefetch = prefetch


@dataclass
class _Progress:
    samples: deque = field(default_factory=lambda: deque(maxlen=30))  # (time, hydrated)

    def record(self, now: float, hydrated: int) -> None:
        self.samples.append((now, hydrated))

    def regions_per_second(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, h0), (t1, h1) = self.samples[0], self.samples[-1]
        return (h1 - h0) / (t1 - t0) if t1 > t0 else 0.0


class CloneEngine:
    """Serves the image (the FUSE ImageBackend interface) and hydrates it in the background.

    Use `async with engine.running():` to run the hydrator and the periodic committer; leaving
    it commits and marks the metadata clean.
    """

    def __init__(self, source: Source, dst: Destination, meta: Metadata, settings: Settings) -> None:
        self.source = source
        self.dst = dst
        self.meta = meta
        dst.on_cut_short = meta.fail  # no commit may mark what the cut took as there
        # What open_clone made for this clone (a new one): a mount that fails removes these,
        # never what another mount made meanwhile.
        self.created_meta = self.created_dst = False
        self.geometry: Geometry = meta.geometry
        self.settings = settings.resolved(self.geometry, source.hydration_depth,
                                          source.hydration_batch)
        self.complete = trio.Event()
        self._claims: dict[int, _Claim] = {}
        self.changed = trio.lowlevel.ParkingLot()  # claims released, settings changed
        self._commit_lock = trio.Lock()
        # Written-bit commits (META only) have their own lock: a user write never waits behind
        # a hydration commit's DST fdatasync.
        self._written_lock = trio.Lock()
        self._header_lock = trio.Lock()  # one header write at a time (record_settings)
        self._commits_started = self._commits_done = 0
        # The first commit whose done makes every user write so far safe to flush with an
        # fdatasync of DST alone (see _note_user_write).
        self._user_commit_needed = 0
        self._last_user_io = -1e9
        self._idle_trim = heap.IdleTrim()
        # User reads waiting for the source right now (their own read, or a copy ahead of
        # them), and when one last waited or read what the prefetch fetched: a prefetch goes
        # at full depth meanwhile (users_need_fetching).
        self._reads_waiting = 0
        self._last_fetched_read = -1e9
        self._last_flush = -1e9
        self._cache_probes = _CacheProbes()
        self.write_frontier = -1  # the region after the latest user write that filled regions
        self._hydration_error: str | None = None
        # Replaced each time it is set: wakes `wait_until_settled` when hydration completes,
        # stops, or the metadata fails (which may happen in a worker thread).
        self._settled_changed = trio.Event()
        self._progress = _Progress()
        self._nursery: trio.Nursery | None = None
        self.copier = Copier(source, dst, self.geometry, users_active=self.user_active)
        self.hydration_errors = 0  # failed copies and copy-on-read stores (metrics)
        self.written_commits = 0  # META commits that user writes waited for (metrics)
        self.written_wait_seconds = 0.0  # time user writes spent waiting for them, summed
        self._hydrated_bytes_at_start = meta.hydrated_bytes()
        self._readahead = ReadaheadDetector(READAHEAD_MAX_WINDOW, self.geometry.image_size)
        self._mark_ahead = MarkAhead(self.geometry.image_size)  # what else a write-ahead marks
        self.recorder: TraceRecorder | None = None  # the access trace (--record-access)
        self.hydrator = Hydrator(self)  # background hydration's order, depth, pace and retries

    def prefetch(self, runs: list[range], first_burst: int = 0) -> None:
        """Call before `run`: hydrate these runs of regions first, in this order, the first
        `first_burst` of them at once."""
        self.hydrator.prefetch(runs, first_burst)

    @property
    def source_reads(self) -> int:
        """Bytes read from the source, for status and tests."""
        return self.copier.source_reads

    def source_waited(self) -> float:
        """Seconds the oldest request to the source in flight (a read, block status) has
        waited so far; 0 when none is."""
        return self.copier.source_waited()

    # ---- ImageBackend ---------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.geometry.image_size

    def permissions(self) -> Permissions:
        st = self.dst.attributes()  # an fstat: microseconds, on the event loop
        return Permissions(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)

    async def set_permissions(self, mode: int | None, uid: int, gid: int) -> None:
        if mode is not None:
            await in_thread(self.dst.chmod, mode)
        if uid != -1 or gid != -1:
            await in_thread(self.dst.chown, uid, gid)

    def read_now(self, offset: int, length: int, *, kernel_keeps: bool
                 ) -> bytes | bytearray | ReadFrom | Continue:
        """Hydrated data: the bytes at once if DST's page cache has them (unless reads are
        cold: see COLD_AFTER_MISSES), else the range of DST to read them from (`ReadFrom`:
        nothing in the engine changes while it is read: hydrated regions stay hydrated, and no
        copy touches them). Anything else: a `Continue` whose answer reads it, knowing it is
        not all hydrated (no second bitmap check; DST's page cache was not probed). Lets the
        FUSE session answer without a task, and a cold read without a hop back."""
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        span = self.geometry.region_span(offset, length)
        if not self.meta.all_hydrated(span):
            return Continue(functools.partial(self._read_missed, offset, length, span))
        self._last_user_io = trio.current_time()
        order = self.hydrator.order
        if order.prefetching and order.prefetched(span):  # the user follows the prefetch
            self._last_fetched_read = self._last_user_io
        if len(self._readahead):  # a stream reading what readahead fetched reads on
            self._follow_stream(offset, length, may_start=False)
        if self.recorder is not None:
            self.recorder.read(span)
        if self._cache_probes.wanted():
            data = self.dst.read_cached(offset, length)
            self._cache_probes.found(data is not None)
            if data is not None:
                return data
        # kernel_keeps: the image's page cache keeps what DST's would: one copy is enough
        read = self.dst.read_uncached if kernel_keeps else self.dst.read
        return ReadFrom(self.dst.fd, offset, length, kernel_keeps,
                        functools.partial(read, offset, length))

    def write_now(self, offset: int, data: bytes | memoryview, *, direct: bool = False
                  ) -> bool | Callable[[], None] | Continue:
        """Write at once (True) if the write is small and needs no copy from the source, else
        return a `Continue` whose answer does the rest from where this attempt stopped. Such a
        write is a page-cache copy of a few microseconds: cheaper on the event loop than a hop
        to a worker thread and back (80-130 us here), which held 4 KiB writes to unhydrated
        regions at ~5k IOPS. A large write to
        hydrated regions comes back as the blocking call that does it, for any thread: nothing
        in the engine changes with it (bits never go back to 0, and no copy touches hydrated
        regions), and its acknowledgement comes after it, before any FSYNC that must cover it.
        So does a `direct` write to hydrated regions, written through to DST's disk (see
        `_write_through`), if larger than LOOP_WRITE_THROUGH_MAX; a smaller one is written
        through at once."""
        if self.meta.mode is not MetadataMode.RW or len(data) > INLINE_WRITE_MAX:
            return Continue(functools.partial(self._write_later, offset, data, direct=direct))
        span = self.geometry.region_span(offset, len(data))
        if not self.meta.written_durable(offset, len(data)):
            # Its written bits must reach META first (`_write_later` waits for them), unless it
            # replaces unhydrated regions whole: until their hydrated bits are committed, which
            # `_commit_once` does only after their written bits, a crash leaves them
            # unhydrated, to be copied again. That spared a META fdatasync per 64 KiB chunk
            # (64 KiB direct writes into a fresh clone: 3.6x the time of rewrites).
            if self.meta.all_unhydrated(span):
                if self._fill(offset, data, span, mark=True):
                    return True
                if self._extension(offset, len(data), span) is not None:
                    return Continue(functools.partial(self._write_unhydrated, offset, data))
            return Continue(functools.partial(self._write_later, offset, data, direct=direct))
        hydrated = self.meta.all_hydrated(span)
        if hydrated:
            self._note_user_write(span)
        if hydrated and direct and self._write_through(offset, len(data)):
            if len(data) <= LOOP_WRITE_THROUGH_MAX:
                self.dst.write_through(offset, data)
                return True
            return functools.partial(self.dst.write_through, offset, data)
        if hydrated and len(data) >= HANDED_OVER_WRITE_MIN:
            return functools.partial(self.dst.write, offset, data)
        if hydrated:
            self.dst.write(offset, data)
            return True
        if self._fill(offset, data, span, mark=False):
            return True
        # Its written bits are durable: straight to the copy or claim of its regions.
        return Continue(functools.partial(self._write_unhydrated, offset, data))

    def _note_user_write(self, span: range) -> None:
        """A user write, discard or zeroing of the regions in `span`, whose bits are set in
        core. If META may not hold those bits yet (a user write filled them, or a copy, and
        no commit has finished since), a flush must commit first: after a crash an
        unhydrated region would be copied again, over the flushed write. Else an fdatasync
        of DST is enough, even while hydration's own bits wait for their commit."""
        self._last_user_io = trio.current_time()
        if not self.meta.hydrated_settled(span):
            # Bits set before the next commit starts are in its batch (prepare_commit comes
            # first, with no await, once _commits_started has counted it).
            self._user_commit_needed = self._commits_started + 1

    def _write_through(self, offset: int, length: int) -> bool:
        """Whether a direct write to hydrated regions goes past DST's page cache to its disk
        (by the job thread), which it does while the image is flushed often (a database
        commits). A commit is a few small direct writes and a flush, and the kernel holds the
        image's inode lock for the whole FSYNC: a write left in the page cache made that
        fdatasync write it back and wait for it, inside the lock. Written through, the
        fdatasync only flushes the disk's cache, as a raw loop device's does."""
        return (length < HANDED_OVER_WRITE_MIN
                and trio.current_time() - self._last_flush < COMMITTING_WINDOW
                and self.dst.can_write_through(offset, length))

    def _fill(self, offset: int, data: bytes | memoryview, span: range, *, mark: bool) -> bool:
        """Write `data` into the regions of `span` and mark them hydrated, if it covers every
        unhydrated one whole and no copy is filling any: like _replace, but nothing can claim
        them between the write and the mark, as neither awaits. `mark`: mark its chunks
        written first (in core; the next commit makes them durable before the hydrated bits)."""
        if (self.geometry.covered_span(offset, len(data)) != span
                or any(r in self._claims for r in span)):
            return False
        if mark:
            self.meta.mark_written(offset, len(data))
        self.dst.write(offset, data)
        # Marked after the data is in DST; the commit makes DST durable before the bit.
        self.meta.set_hydrated(span)
        self.write_frontier = span.stop
        self._note_user_write(span)
        self.changed.unpark_all()  # a parked hydrator may be waiting for the last regions
        return True

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        got = self.read_now(offset, length, kernel_keeps=False)
        if isinstance(got, Continue):
            return await got.answer()
        if isinstance(got, ReadFrom):
            return await in_thread(got.read)
        await trio.lowlevel.checkpoint()
        return got

    async def _read_missed(self, offset: int, length: int, span: range) -> bytes | bytearray:
        """The rest of a read that `read_now` found not all hydrated."""
        self._last_user_io = trio.current_time()
        self._follow_stream(offset, length, may_start=True)
        if self.recorder is not None:
            self.recorder.read(span)
        return await self._read_runs(offset, length, span)

    async def _read_range(self, offset: int, length: int) -> bytes | bytearray:
        span = self.geometry.region_span(offset, length)
        if self.meta.all_hydrated(span):
            return await self._dst_read(offset, length)
        return await self._read_runs(offset, length, span)

    async def _read_runs(self, offset: int, length: int, span: range) -> bytes:
        """A read of regions not all hydrated: each run from DST or from the source."""
        parts = []
        for hydrated, run in self.meta.runs(span):
            lo = max(offset, self.geometry.region_start(run.start))
            hi = min(offset + length, self.geometry.region_end(run.stop - 1))
            if hydrated:
                parts.append(await self._dst_read(lo, hi - lo))
            else:
                parts.append(await self._read_unhydrated(run, lo, hi))
        return b"".join(parts)

    async def write(self, offset: int, data: bytes | memoryview, *, direct: bool = False) -> None:
        self._check_writable()
        done = self.write_now(offset, data, direct=direct)
        if isinstance(done, Continue):
            await done.answer()
        elif done is True:
            await trio.lowlevel.checkpoint()
        else:
            await in_thread(done)

    async def _write_later(self, offset: int, data: bytes | memoryview, *, direct: bool = False
                           ) -> None:
        """The rest of a write that needs its written bits durable first (or is too large for
        the loop): the bits, then the write as `write_now` finds it after that wait (still a
        direct writer's: left in DST's page cache, the next FSYNC would write it back)."""
        self._check_writable()
        await self._record_written(offset, len(data))
        done = self.write_now(offset, data, direct=direct)
        if isinstance(done, Continue):  # its bits are durable now: the copy or claim is left
            await self._write_unhydrated(offset, data)
        elif done is not True:
            await in_thread(done)

    async def _write_unhydrated(self, offset: int, data: bytes | memoryview) -> None:
        """A write to regions not all hydrated, whose written bits are durable, or which finds
        all its regions unhydrated (see `_write_extended`; else they are made durable first):
        it fills its unhydrated partial regions with the source's data around it, or waits
        for the copies it needs (`_replace`), claiming the regions it replaces whole."""
        span = self.geometry.region_span(offset, len(data))
        durable = self.meta.written_durable(offset, len(data))
        extended = (self._extension(offset, len(data), span)
                    if durable or self.meta.all_unhydrated(span) else None)
        if extended is None and not durable:
            return await self._write_later(offset, data)  # filled or claimed meanwhile
        self._last_user_io = trio.current_time()
        if extended is None:
            await self._replace(offset, len(data), lambda: self.dst.write(offset, data))
        else:
            await self._write_extended(offset, data, span, *extended)

    def _extension(self, offset: int, length: int, span: range) -> tuple[int, int] | None:
        """[start, stop): the write extended to the bounds of its partial regions that are
        unhydrated, or None if one of its regions is claimed (it waits for the copy,
        `_replace`). A write that ends in an unhydrated region and continues hydrated data
        (a sequential writer's; also the last part of any unaligned write, which the kernel
        sends as a request of its own) extends over the unhydrated regions after it too, up
        to WRITE_AHEAD_BYTES: the writer's next writes find them hydrated."""
        if any(r in self._claims for r in span):
            return None
        g, meta = self.geometry, self.meta
        first, last = span.start, span.stop - 1
        end = offset + length
        start = g.region_start(first) if not meta.is_hydrated(first) else offset
        stop = end
        if end < g.region_end(last) and not meta.is_hydrated(last):
            stop_region = last + 1
            if self._continues_hydrated(first):
                ahead = stop_region + WRITE_AHEAD_BYTES // g.region_size
                stop_region = self._unhydrated_run_end(stop_region, ahead)
            stop = g.region_end(stop_region - 1)
        return start, stop

    async def _write_extended(self, offset: int, data: bytes | memoryview, span: range,
                              start: int, stop: int) -> None:
        """Write `data` with the source's bytes [start, offset) and [offset+len, stop) around
        it, so that it covers its unhydrated regions whole, and mark them hydrated: one source
        read and one DST write, where a copy of the partial regions and then the write took
        four thread hops, a wait for the copy's writeback and, into untouched chunks, a META
        commit of the written bits first (2,000 random 1-64 KiB writes into a fresh clone:
        3.0-3.4 s). Like `_fill` it needs no durable written bits when all its regions are
        unhydrated: the commit writes them before these hydrated bits, and until then a crash
        leaves the regions unhydrated, to be copied again."""
        regions = self.geometry.region_span(start, stop - start)  # span, and what it copies along
        claims = [self.claim(run) for hydrated, run in self.meta.runs(regions) if not hydrated]

        async def fill() -> None:
            head, tail = await self._source_around(start, offset, offset + len(data), stop)
            extended = b"".join((head, data, tail))
            self.meta.mark_written(offset, len(data))  # before the hydrated bits (_commit_once)
            if regions.stop > span.stop:  # copied along: all-zero regions become holes
                await in_thread(self.copier.write_or_punch, start, extended)
            elif len(extended) <= INLINE_WRITE_MAX:
                self.dst.write(start, extended)
            else:
                await in_thread(self.dst.write, start, extended)

        await self._fill_claimed(claims, fill())
        self.write_frontier = regions.stop
        self._note_user_write(span)

    async def _source_around(self, start: int, offset: int, end: int, stop: int
                             ) -> tuple[bytes | memoryview, bytes | memoryview]:
        """The source's bytes [start, offset) and [end, stop): one read when both are wanted
        and the write between them is short. If that read fails, the two: the write's own
        bytes, read along for nothing, may be what the source cannot read (a bad sector, or a
        region the write replaces whole), which must not fail the write."""
        if start < offset and end < stop and stop - start <= MERGED_READ_MAX:
            try:
                whole = memoryview(await self.copier.source_read(start, stop - start))
            except OSError as exc:
                log.debug("merged source read [%d, %d) failed (%s): reading around the write",
                          start, stop, exc)
            else:
                return whole[: offset - start], whole[end - start :]
        head = await self.copier.source_read(start, offset - start) if start < offset else b""
        tail = await self.copier.source_read(end, stop - end) if end < stop else b""
        return head, tail

    async def discard(self, offset: int, length: int) -> None:
        """Fully covered unhydrated regions are marked hydrated without copying; the range then
        reads as zeros (punched in DST, or zeroed in place with passdown off)."""
        self._check_writable()
        length = max(0, min(length, self.size - offset))
        await self._record_written(offset, length)
        if self.settings.discard_passdown:
            op = lambda: self.dst.punch_hole(offset, length)  # noqa: E731
        else:
            op = lambda: self.dst.zero_range(offset, length)  # noqa: E731
        await self._replace(offset, length, op)

    async def write_zeroes(self, offset: int, length: int) -> None:
        self._check_writable()
        length = max(0, min(length, self.size - offset))
        await self._record_written(offset, length)
        await self._replace(offset, length, lambda: self.dst.zero_range(offset, length))

    async def flush(self) -> None:
        self._check_writable()
        self._last_flush = trio.current_time()
        await self.commit()

    async def expose_to_direct_writes(self) -> None:
        """Changed-block tracking cannot see writes that reach DST without us (FUSE
        passthrough): mark every chunk written, durably, before any can. `diff` then lists
        the whole image, which is true of what may have changed. Free once done."""
        self._check_writable()
        await self._record_written(0, self.size)

    def refuse_direct_writes_past_the_end(self) -> None:
        """See ImageBackend: DST's growth is cut back (an fstat when there is none)."""
        cut = self.dst.cut_back_growth()
        if cut:
            log.warning("writes past the end of the image reached the destination directly "
                        "(passthrough): %d bytes cut back, the writer gets ENOSPC", cut)
            raise OSError(errno.ENOSPC, "write past the end of the image")

    def flush_now(self) -> Callable[[], None] | None:
        """The flush as one blocking fdatasync of DST, for any thread, when no user write
        needs a commit: the hydrated bits of every region a user wrote are durable in META
        (`_note_user_write`; hydration's own bits may wait for the committer, even while its
        commit runs: a lost copy is copied again), and so is every written bit (written ahead
        of their data, or, for whole-region writes, committed with their hydrated bits, which
        such a write leaves unsettled). Else None (then `flush` is the way). A thread that
        answers the FSYNC itself saves the hop back to the event loop: the kernel holds the
        image's inode lock for the whole FSYNC, so every write of a database waits for it."""
        self._last_flush = trio.current_time()
        if (self.meta.mode is not MetadataMode.RW
                or self._commits_done < self._user_commit_needed):
            return None
        return self._flush_dst

    def flush_is_short(self) -> bool:
        """Whether `flush_now`'s call is short enough for the event loop: DST holds little
        that its fdatasync must write back (see LOOP_FLUSH_MAX)."""
        return self.dst.unsynced_bytes() <= LOOP_FLUSH_MAX

    def _flush_dst(self) -> None:
        try:
            self._datasync_dst()
        except OSError as exc:
            raise OSError(errno.EIO, f"commit failed: {describe(exc)}") from exc

    async def seek(self, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE over the image: DST's holes where hydrated, the source's zero
        extents where not. Scans at most SEEK_SCAN_LIMIT bytes; past that it answers what is
        always allowed (data for SEEK_DATA, the end of the image for SEEK_HOLE)."""
        if offset >= self.size:
            raise OSError(errno.ENXIO, "past the end of the image")
        want_zero = whence == os.SEEK_HOLE
        limit = min(self.size, offset + SEEK_SCAN_LIMIT)
        async for ext_offset, ext_length, zero in self._extents(offset, limit):
            if zero == want_zero:
                return max(ext_offset, offset)
        if limit < self.size:
            return limit if not want_zero else self.size
        if want_zero:
            return self.size
        raise OSError(errno.ENXIO, "no data after this offset")

    async def _extents(self, start: int, stop: int):
        g = self.geometry
        for hydrated, run in self.meta.runs(g.region_span(start, stop - start)):
            lo = max(start, g.region_start(run.start))
            hi = min(stop, g.region_end(run.stop - 1))
            if hydrated:
                found = await in_thread(self.dst.extents, lo, hi - lo)
            else:
                found = [(e.offset, e.length, e.zero) for e in await self.source.extents(lo, hi - lo)]
            for extent in found:
                yield extent

    # ---- the write path -------------------------------------------------------------------

    async def _fill_claimed(self, claims: Iterable[_Claim], fill: Awaitable[None]) -> None:
        """Await `fill`, which writes the claimed regions in DST, then mark them hydrated and
        release them; if it fails, release them unmarked."""
        try:
            await fill
        except BaseException:
            for claim in claims:
                self._release(claim)
            raise
        # Marked after the data is in DST; the commit makes DST durable before the bits.
        for claim in claims:
            self.meta.set_hydrated(claim.regions)
            self._release(claim)

    async def _replace(self, offset: int, length: int, dst_op: Callable[[], None]) -> None:
        """Run `dst_op` (which overwrites [offset, offset+length) in DST) once every region it
        touches is hydrated, or claimed by us when the op replaces it whole (no copy needed)."""
        if length <= 0:
            return
        claims = await self._acquire(offset, length)
        await self._fill_claimed(claims, in_thread(dst_op))
        for claim in claims:
            self.write_frontier = claim.regions.stop
        self._note_user_write(self.geometry.region_span(offset, length))

    async def _acquire(self, offset: int, length: int) -> list[_Claim]:
        span = self.geometry.region_span(offset, length)
        covered = self.geometry.covered_span(offset, length)
        while True:
            busy: set[_Claim] = set()
            partial: list[int] = []
            free: list[int] = []
            for hydrated, run in self.meta.runs(span):
                if hydrated:
                    continue
                for region in run:
                    claim = self._claims.get(region)
                    if claim is not None:
                        busy.add(claim)
                    elif region in covered:
                        free.append(region)
                    else:
                        partial.append(region)
            if busy:
                await self._wait_for(busy)
            elif partial:
                await self._hydrate_for_write(partial, span)
            else:
                return [self.claim(run) for run in _runs_of(free)]

    async def _hydrate_for_write(self, partial: list[int], span: range) -> None:
        """A write to part of an unhydrated region waits for its hydration, which starts now,
        in this task, ahead of the background hydrator: each run of such regions in one copy,
        the runs side by side. A write that continues hydrated data (a sequential writer) gets
        the unhydrated regions after it copied along, up to WRITE_AHEAD_BYTES in the same
        source read, so that its next writes find them hydrated and need no copy of their own
        (4000-byte writes went one source round trip and three thread hops each: 4.5 MB/s)."""
        runs = []
        for run in _runs_of([r for r in partial
                             if not self.meta.is_hydrated(r) and r not in self._claims]):
            if run.stop == span.stop and self._continues_hydrated(span.start):
                ahead = run.stop + WRITE_AHEAD_BYTES // self.geometry.region_size
                run = range(run.start, self._unhydrated_run_end(run.stop, ahead))
            runs.append(self.claim(run))
        failures: list[OSError] = []

        async def copy(claim: _Claim) -> None:
            try:
                await self.copy(claim)
            except OSError as exc:  # one error for the writer, not a group
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            for claim in runs:
                nursery.start_soon(copy, claim)
        if failures:
            raise failures[0]

    def _continues_hydrated(self, region: int) -> bool:
        """Whether the region before `region` holds hydrated data (or it is the first)."""
        meta = self.meta
        return meta.is_hydrated(region) or (region > 0 and meta.is_hydrated(region - 1))

    def _unhydrated_run_end(self, start: int, limit: int) -> int:
        """End of the run of unhydrated, unclaimed regions from `start`, at most `limit`."""
        limit = min(self.meta.nr_regions, limit)
        hydrated = self.meta.next_hydrated(start, limit)
        if hydrated >= 0:
            limit = hydrated
        stop = start
        while stop < limit and stop not in self._claims:
            stop += 1
        return stop

    async def _wait_for(self, claims: set[_Claim]) -> None:
        """Until these claims are released. A failed copy fails none of its waiters: they look
        at its regions again, and one that replaces them whole needs nothing from the source;
        one that needs the source's data copies it itself, and fails with its own copy."""
        for claim in claims:
            await claim.done.wait()

    # ---- the read path --------------------------------------------------------------------

    async def _read_unhydrated(self, run: range, lo: int, hi: int) -> bytes:
        if not self.meta.all_unhydrated(run):
            # Hydrated (and maybe written) while this read awaited an earlier part: start over,
            # or a copy-on-read store would put source data over a completed write.
            return await self._read_range(lo, hi - lo)
        with self._waiting_for_source():
            return await self._fetch_unhydrated(run, lo, hi)

    async def _fetch_unhydrated(self, run: range, lo: int, hi: int) -> bytes:
        ahead = {self._claims[r] for r in run if r in self._claims and self._claims[r].ahead}
        if ahead:  # readahead or prefetch is fetching it: wait rather than ask the source again
            for claim in ahead:
                await claim.done.wait()
            return await self._read_range(lo, hi - lo)
        self._note_source_read(run)
        if not (self.settings.copy_on_read and self.meta.mode is MetadataMode.RW
                and not any(r in self._claims for r in run) and self.hydrator.stores_allowed()):
            return await self.copier.source_read(lo, hi - lo)
        # Copy-on-read: fetch whole regions once, answer the user, store them in the background.
        claim = self.claim(run)
        start, nbytes = self.geometry.byte_range(run)
        began = trio.current_time()
        try:
            data = await self.copier.source_read(start, nbytes)
        except BaseException:
            self._release(claim)
            raise
        assert self._nursery is not None
        self._nursery.start_soon(self._store, claim, data, began)
        return data[lo - start : hi - start]

    async def _store(self, claim: _Claim, data: bytes, began: float) -> None:
        start, _ = self.geometry.byte_range(claim.regions)
        try:
            await in_thread(self.copier.write_or_punch, start, data)
        except OSError as exc:
            self.hydrator.note_failure("copy-on-read store", claim.regions, exc)
            self._release(claim)
            return
        self.hydrator.note_success(began)
        self.meta.set_hydrated(claim.regions)
        self._release(claim)

    # ---- readahead and hot spots ----------------------------------------------------------

    def _note_source_read(self, run: range) -> None:
        """A user read `run` from the source: its neighbourhood is a hot spot, and the access
        trace records it."""
        self.hydrator.order.note_source_read(run)
        if self.recorder is not None:
            self.recorder.source_read(run)
        self.changed.unpark_all()  # a parked hydrator may take the hot spot

    def _follow_stream(self, offset: int, length: int, *, may_start: bool) -> None:
        """Tell the stream detector about a user read; fetch what it says lies ahead. Only
        where copy-on-read would store what it read: readahead is copy-on-read done early."""
        if (not self.settings.copy_on_read or self.hydration_error is not None
                or self.meta.mode is not MetadataMode.RW or self._nursery is None
                or self.meta.complete):
            return
        ahead = self._readahead.observe(offset, length, may_start=may_start)
        if ahead is not None:
            self.hydrator.read_ahead(*ahead, self._nursery)

    def free_run(self, start: int, stop: int, limit: int) -> range | None:
        """The first run of unhydrated, unclaimed regions in [start, stop), at most `limit`
        long, or None."""
        meta = self.meta
        region = meta.next_unhydrated(start, stop)
        while region >= 0 and region in self._claims:
            # Past the whole claim at once: stepping region by region through 128 MiB of
            # copies in flight took half the loop's time at the end of a hydration.
            region = meta.next_unhydrated(self._claims[region].regions.stop, stop)
        if region < 0:
            return None
        return range(region, self._unhydrated_run_end(region + 1, min(stop, region + limit)))

    # ---- hydration copies -----------------------------------------------------------------

    async def copy(self, claim: _Claim) -> None:
        """Copy the claimed regions from the source into DST (copier.py), then mark them."""
        if self.recorder is not None:  # users' reads of them, even waiting for this copy, are
            self.recorder.fetched_ahead(claim.regions)  # the workload's: as if from the source
        released = False

        def readable() -> None:  # in DST (maybe on its way to DST's disk still): bits in memory
            nonlocal released
            self.meta.set_hydrated(claim.regions)
            self._release(claim)
            released = True

        try:
            await self.copier.copy(claim.regions, prefetch=claim.prefetch, readable=readable)
        finally:
            if not released:
                self._release(claim)

    async def _dst_read(self, offset: int, length: int) -> bytes | bytearray:
        data = self.dst.read_cached(offset, length)
        if data is None:
            data = await in_thread(self.dst.read, offset, length)
        return data

    # ---- claims -------------------------------------------------------------------------

    def claim(self, regions: range, *, ahead: bool = False, prefetch: bool = False) -> _Claim:
        claim = _Claim(regions, ahead, prefetch)
        for region in regions:
            self._claims[region] = claim
        return claim

    def _release(self, claim: _Claim) -> None:
        """The claimed regions are filled (their bits set) or not (the copy failed, or was
        cancelled): either way its waiters look at them again."""
        for region in claim.regions:
            if self._claims.get(region) is claim:
                del self._claims[region]
        claim.done.set()
        self.changed.unpark_all()

    def _check_writable(self) -> None:
        self.meta.refuse_if_failed()
        if self.meta.mode is not MetadataMode.RW:
            raise OSError(errno.EIO, f"metadata is in {self.meta.mode} mode: writes are refused")

    # ---- commits ------------------------------------------------------------------------

    async def commit(self) -> None:
        """Make DST durable, then commit changed metadata. Concurrent callers share one commit
        that starts after they called, so a flush never returns on an older commit."""
        target = self._commits_started + 1
        async with self._commit_lock:
            if self._commits_done >= target:
                return
            self._commits_started += 1
            await self._commit_once()
            self._commits_done = self._commits_started

    async def _commit_once(self) -> None:
        self.meta.refuse_if_failed()
        # The batch is copied out *before* DST is synced: every bit in it belongs to a DST write
        # that had already returned, so the fdatasync below covers its data (invariant 1).
        batch = self.meta.prepare_commit()
        try:
            # Shielded: a commit cancelled between copying its blocks out and writing them
            # would drop their dirty marks, and the shutdown commit would miss those bits.
            with trio.CancelScope(shield=True):
                # A written commit in flight (a writer's, holding the lock) has taken its bits
                # out of the dirty ones: the hydrated bits wait for it too.
                if batch is not None and (self.meta.written_dirty or self._written_lock.locked()):
                    # Written bits first: whole-region writes to unhydrated regions mark them
                    # without waiting for META (write_now), and META must never hold such a
                    # region's hydrated bit without its written bit. They were marked before
                    # their regions' hydrated bits were set, so before the batch was copied.
                    # Their commit needs nothing of DST's fdatasync: the two run at once.
                    await self._datasync_dst_beside_written_commit()
                    await in_thread(self.meta.write_commit, batch)
                else:
                    # One thread hop for both: a user's FSYNC after first writes into
                    # unhydrated regions (a fresh clone's journal) waits for this whole commit.
                    await in_thread(self._datasync_dst_then_write, batch)
        except OSError as exc:
            if batch is not None:
                self.meta.abort_commit(batch)
            raise OSError(errno.EIO, f"commit failed: {describe(exc)}") from exc
        if batch is not None:
            self.meta.finish_commit(batch)

    async def _datasync_dst_beside_written_commit(self) -> None:
        """DST's fdatasync and the commit of the written bits, at once (each in a thread):
        a user's FSYNC after a fresh clone's first writes waited for one, then the other."""
        failures: list[OSError] = []

        async def commit_written() -> None:
            try:
                async with self._written_lock:
                    await self._commit_written()
            except OSError as exc:  # one error for the commit, not a group
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit_written)
            try:
                await in_thread(self._datasync_dst)
            except OSError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]

    def _datasync_dst_then_write(self, batch: CommitBatch | None) -> None:
        """Blocking: DST durable, then the batch in META (invariant 1: bits after their data).
        Either failure puts the metadata in fail mode."""
        self._datasync_dst()
        if batch is not None:
            self.meta.write_commit(batch)

    def _datasync_dst(self) -> None:
        """Blocking. After a failed fdatasync the kernel may have dropped DST's dirty data: no
        bit may be committed any more (fail mode, like dm-clone's), and the bits set since the
        last commit are not to be trusted for reads either."""
        try:
            self.dst.datasync()
        except OSError as exc:
            failing_now = self.meta.mode is not MetadataMode.FAIL
            self.meta.fail(f"a failed fdatasync of {self.dst.path} ({describe(exc)})")
            if failing_now:
                self.meta.fall_back_to_last_commit()
            raise

    async def _record_written(self, offset: int, length: int) -> None:
        """Write-ahead of changed-block tracking: return once the written bits of the chunks
        [offset, offset+length) touches are durable in META. Free when they already are;
        otherwise writers share one META-only commit (pwrite + fdatasync, no DST sync), which
        also marks the chunks around the write and ahead of a sequential writer (`MarkAhead`):
        `diff` may list more than was written, never less."""
        if self.meta.written_durable(offset, length):
            return
        started = trio.current_time()
        start, stop = self._mark_ahead.span(offset, length)
        self.meta.mark_written(start, stop - start)
        async with self._written_lock:
            if not self.meta.written_durable(offset, length):  # else an earlier commit had ours
                self._check_writable()
                if await self._commit_written():
                    self.written_commits += 1
        self.written_wait_seconds += trio.current_time() - started

    async def _commit_written(self) -> bool:
        """Commit the changed written-bitmap blocks; whether there were any. Call with
        `_written_lock` held: a block may be in one commit at a time, or two could write the
        same slot."""
        batch = self.meta.prepare_written_commit()
        if batch is None:
            return False
        try:
            with trio.CancelScope(shield=True):  # like _commit_once: never drop dirty marks
                await in_thread(self.meta.write_commit, batch)
        except OSError as exc:
            self.meta.abort_commit(batch)
            raise OSError(errno.EIO, f"commit failed: {describe(exc)}") from exc
        self.meta.finish_commit(batch)
        return True

    async def _committer(self) -> None:
        while True:
            await trio.sleep(self.settings.commit_interval)
            self._progress.record(trio.current_time(), self.meta.hydrated_count)
            if self._idle_trim.tick((self._last_user_io, self.meta.hydrated_count)):
                heap.give_back_free_memory()  # a burst of I/O or hydration just ended
            if self.meta.mode is not MetadataMode.RW:
                continue
            try:
                # A DST truncated while idle is found within a second too (an fstat)
                self.dst.refuse_if_cut_short()
                if self.meta.dirty:
                    await self.commit()
                else:  # a META deleted while idle is found (and saved) within a second too
                    await in_thread(self.meta.check_named)
            except OSError:
                return  # fail mode; status says so

    # ---- the hydrator ---------------------------------------------------------------------

    async def _hydrator(self) -> None:
        await self.hydrator.run()
        await self._finish_hydration()

    def user_active(self) -> bool:
        """Whether users did I/O in the last 50 ms (hydration then yields to them)."""
        return trio.current_time() - self._last_user_io < USER_ACTIVE_SECONDS

    def users_need_fetching(self) -> bool:
        """Whether a user read waits for the source (its own read, or a copy ahead of it), or
        did, or read what the prefetch fetched, in the last 50 ms (a prefetch then goes at
        full depth: users wait for it, or it is ahead of them and must stay so)."""
        return (self._reads_waiting > 0
                or trio.current_time() - self._last_fetched_read < USER_ACTIVE_SECONDS)

    @contextlib.contextmanager
    def _waiting_for_source(self) -> Iterator[None]:
        self._reads_waiting += 1
        self.changed.unpark_all()  # a prefetch yielding to users goes to full depth
        try:
            yield
        finally:
            self._reads_waiting -= 1
            self._last_fetched_read = trio.current_time()

    async def _finish_hydration(self) -> None:
        try:
            await self.commit()
        except OSError:
            return  # fail mode: status and wait say why
        self.complete.set()
        self._wake_settle_waiters()
        log.info("hydration complete: %d regions", self.meta.nr_regions)

    async def wait_until_settled(self) -> None:
        """Return once hydration is complete (and committed), has stopped after failures, or
        cannot go on (metadata in fail mode)."""
        while (not self.complete.is_set() and self.hydration_error is None
               and self.meta.mode is MetadataMode.RW):
            await self._settled_changed.wait()

    def _wake_settle_waiters(self) -> None:
        self._settled_changed.set()
        self._settled_changed = trio.Event()

    @property
    def hydration_error(self) -> str | None:
        """Why background hydration stopped (failures, or a source that is another image)."""
        return self._hydration_error

    @hydration_error.setter
    def hydration_error(self, reason: str | None) -> None:
        self._hydration_error = reason
        self._wake_settle_waiters()

    # ---- control ------------------------------------------------------------------------

    def hold_hydration(self) -> None:
        """Call before `run`: background copies wait until `release_hydration()`."""
        self.hydrator.hold()

    def release_hydration(self) -> None:
        self.hydrator.release()

    def message(self, text: str) -> None:
        """dm-clone's messages: enable_hydration, disable_hydration, hydration_threshold N,
        hydration_batch_size N; and max_rate RATE (this mount's --max-rate, not recorded: like
        the option, each mount sets its own). Raises ValueError on a bad message, and
        MetadataFailedError in fail mode: every message is recorded in META's header, in
        core here, on disk by `record_settings`."""
        if self.meta.failure is not None:
            raise MetadataFailedError(self.meta.failure)
        words = text.split()
        s = self.settings
        if words == ["enable_hydration"]:
            s.hydration = True
            self.hydrator.resume()
        elif words == ["disable_hydration"]:
            s.hydration = False
        elif len(words) == 2 and words[0] in ("hydration_threshold", "hydration_batch_size"):
            try:
                value = int(words[1])
            except ValueError:
                raise ValueError(f"{words[0]} needs a whole number, not {words[1]!r}") from None
            setattr(s, words[0], check_hydration_setting(words[0], value))
            self.hydrator.threshold_changed()
        elif len(words) == 2 and words[0] == "max_rate":
            s.max_rate = parse_size(words[1])
            self.hydrator.rate_changed()
        else:
            raise ValueError(f"unknown message {text!r} (enable_hydration, disable_hydration, "
                             "hydration_threshold N, hydration_batch_size N, max_rate RATE)")
        if self.meta.mode is MetadataMode.RW:
            self.meta.set_settings(features=s.features, hydration_threshold=s.hydration_threshold,
                                   hydration_batch_size=s.hydration_batch_size)
        self.changed.unpark_all()

    async def record_settings(self) -> None:
        """Write the header with the settings as they are now (after `message`), in a worker
        thread: written and fdatasynced on the event loop, it held every request of the mount
        for as long as META's filesystem took, until its thaw when frozen. Raises
        MetadataFailedError when the write fails (fail mode)."""
        async with self._header_lock:
            if self.meta.mode is not MetadataMode.RW:
                return
            try:
                await in_thread(self.meta.write_settings)
            except OSError as exc:
                raise MetadataFailedError(self.meta.failure or describe(exc)) from None

    def status(self) -> Status:
        g = self.geometry
        rate = self._progress.regions_per_second()
        remaining = self.meta.nr_regions - self.meta.hydrated_count
        used_blocks, total_blocks = self.meta.block_usage()
        return Status(
            hydrated_regions=self.meta.hydrated_count,
            total_regions=self.meta.nr_regions,
            hydrating_regions=len(self._claims),
            region_size=g.region_size,
            image_size=g.image_size,
            features=feature_names(self.settings.features),
            hydration_threshold=self.settings.hydration_threshold,
            hydration_batch_size=self.settings.hydration_batch_size,
            max_rate=self.settings.max_rate,
            hydration_enabled=self.settings.hydration,
            hydration_error=self.hydration_error,
            hydration_retry=self.hydrator.retry_note(),
            metadata_mode=self.meta.mode.value,
            metadata_error=self.meta.failure,
            written_regions=self.meta.written_regions(),
            written_bytes=self.meta.written_bytes(),
            written_unknown=self.meta.header.written_unknown,
            hydrated_image_bytes=self.meta.hydrated_bytes(),
            bytes_per_second=rate * g.region_size,
            eta_seconds=(remaining / rate) if rate > 0 else None,
            source=self.source.description,
            destination=self.dst.path,
            metadata=self.meta.path,
            live=True,
            source_bytes_read=self.source_reads,
            prefetch_regions=sum(len(run) for run in self.hydrator.order.trace),
            prefetch_hydrated=sum(self.meta.hydrated_in(run) for run in self.hydrator.order.trace),
            prefetching=self.hydrator.order.prefetching,
            fetched=dict(self.hydrator.fetched),
            hydrated_bytes=self.meta.hydrated_bytes() - self._hydrated_bytes_at_start,
            hydration_errors=self.hydration_errors,
            written_commits=self.written_commits,
            written_wait_seconds=self.written_wait_seconds,
            metadata_used_blocks=used_blocks,
            metadata_total_blocks=total_blocks,
            servers=[asdict(server) for server in self.source.servers()],
        )

    # ---- lifecycle ----------------------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run background work (hydrator, committer, copy-on-read stores) until cancelled; then
        commit what is left and mark the metadata clean."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                token = trio.lowlevel.current_trio_token()
                # Metadata.fail may run in a commit's worker thread: wake the waiters from the loop.
                self.meta.on_fail = lambda: token.run_sync_soon(self._wake_settle_waiters)
                nursery.start_soon(self._committer)
                if self.meta.complete:
                    self.complete.set()
                    self._wake_settle_waiters()
                else:
                    nursery.start_soon(self._hydrator)
                task_status.started()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self._shutdown_commit()
            self.meta.on_fail = None  # this run's loop is what it wakes

    async def _shutdown_commit(self) -> None:
        if self.meta.mode is not MetadataMode.RW:
            return  # in fail mode META stays as its last good commit, not marked clean
        try:
            await self.commit()
            async with self._written_lock:  # marks of writers cancelled before their commit
                await self._commit_written()
            async with self._header_lock:  # after a message's header write, never beside it
                self.meta.mark_clean()
        except OSError as exc:
            log.error("final commit failed: %s", exc)


def _runs_of(regions: list[int]) -> list[range]:
    runs: list[range] = []
    for region in regions:
        if runs and runs[-1].stop == region:
            runs[-1] = range(runs[-1].start, region + 1)
        else:
            runs.append(range(region, region + 1))
    return runs
