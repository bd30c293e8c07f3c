"""Source faults: user reads get EIO, hydration backs off and stops after a bounded number of
failures (status says why), nothing hydrated is lost, enable_hydration resumes.

The engine-level fault is injected by wrapping the local source; the same paths against a real
nbdkit `error` filter are tested with the NBD source."""

import errno

import pytest
import trio
import trio.testing

from fuseclone.sources.base import SourceReadError
from tests.engine.conftest import WrappedSource, assert_settle_waiter_woken_by


class BrokenRange(WrappedSource):
    """Wraps a source; reads touching [lo, hi) fail while `broken` is set."""

    def __init__(self, inner, lo, hi):
        super().__init__(inner)
        self.lo, self.hi, self.broken = lo, hi, True
        self.failures = 0

    async def read(self, offset, length):
        if self.broken and offset < self.hi and offset + length > self.lo:
            self.failures += 1
            raise SourceReadError(errno.EIO, "injected source fault")
        return await self.inner.read(offset, length)


async def test_faults_back_off_stop_and_resume(clone):
    engine = await clone.open(hydration=False, copy_on_read=False, hydration_batch_size=4,
                              max_failures=3, backoff_initial=0.01)
    broken = BrokenRange(engine.source, 1 << 20, (1 << 20) + 8192)
    engine.source = engine.copier.source = broken  # what the engine and its copier read
    async with clone.running(engine):
        await engine.write(0, b"w" * 4096)  # hydrated before the trouble starts
        with pytest.raises(OSError) as info:
            await engine.read((1 << 20) + 100, 10)
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            await engine.write((1 << 20) + 100, b"x")  # needs a copy of a broken region
        assert info.value.errno == errno.EIO
        engine.message("enable_hydration")
        with trio.fail_after(10):
            await engine.wait_until_settled()  # a stop ends the wait, not only completion
        status = engine.status()
        assert "stopped after 3 failures" in status.hydration_error
        assert not status.complete and broken.failures >= 3
        while engine.status().hydrating_regions:  # copies already in flight may still fail once
            await trio.sleep(0.01)
        calls = broken.failures
        await trio.sleep(0.3)
        assert broken.failures == calls, "hydration kept retrying after it stopped"
        assert await engine.read(0, 4096) == b"w" * 4096  # nothing hydrated was lost
        broken.broken = False  # the server is back
        engine.message("enable_hydration")
        with trio.fail_after(30):
            await engine.wait_until_settled()
        assert engine.complete.is_set() and engine.status().hydration_error is None
        assert await engine.read(1 << 20, 8192) == clone.source_bytes(1 << 20, 8192)


class HeldThenBroken(BrokenRange):
    """Reads below `lo` wait for `release`; reads touching [lo, hi) fail while broken."""

    def __init__(self, inner, lo, hi):
        super().__init__(inner, lo, hi)
        self.release = trio.Event()

    async def read(self, offset, length):
        if offset < self.lo:
            await self.release.wait()
        return await super().read(offset, length)


async def test_a_copy_begun_before_the_stop_does_not_resume_hydration(clone):
    """The first copy waits while the ones after it fail and stop hydration; when it then
    works, nothing says the failing range is back: hydration stays stopped (it resumed, and
    ran another round of failures, each time a copy in flight at the stop came back)."""
    region = 64 << 10
    engine = await clone.open(hydration=False, copy_on_read=False, hydration_batch_size=4,
                              max_failures=3, backoff_initial=0.01, region_size=region)
    source = HeldThenBroken(engine.source, 4 * region, engine.source.size)
    engine.source = engine.copier.source = source
    async with clone.running(engine):
        engine.message("enable_hydration")
        with trio.fail_after(10):
            await engine.wait_until_settled()
        assert "stopped after 3 failures" in engine.status().hydration_error
        with trio.fail_after(10):
            while engine.status().hydrating_regions > 4:  # the others' copies end in failures
                await trio.sleep(0.01)
        assert engine.status().hydrated_regions == 0  # the first copy still waits
        failures = source.failures
        source.release.set()
        with trio.fail_after(10):
            while engine.status().hydrated_regions < 4:
                await trio.sleep(0.01)
        await trio.sleep(0.3)
        assert "stopped after 3 failures" in engine.status().hydration_error
        assert source.failures == failures, "hydration resumed for a copy begun before the stop"


class FailsOnceHeld(BrokenRange):
    """The first read touching [lo, hi) waits for `release`, then fails; the rest work."""

    def __init__(self, inner, lo, hi):
        super().__init__(inner, lo, hi)
        self.arrived, self.release = trio.Event(), trio.Event()

    async def read(self, offset, length):
        if self.broken and offset < self.hi and offset + length > self.lo:
            self.broken = False
            self.arrived.set()
            await self.release.wait()
            self.failures += 1
            raise SourceReadError(errno.EIO, "injected source fault")
        return await self.inner.read(offset, length)


async def test_a_failed_copy_fails_none_of_the_writes_waiting_for_it(clone):
    """Two writes wait for a readahead copy of regions 0-1, whose source read then fails:
    one replaces region 0 whole (it needs nothing from the source), the other writes part of
    region 1 (whose source data can be read). Both succeed; they got EIO for the copy's
    failure."""
    engine = await clone.open(hydration=False, copy_on_read=False)
    source = FailsOnceHeld(engine.source, 0, 8192)
    engine.source = engine.copier.source = source
    async with clone.running(engine):
        engine.hydrator.read_ahead(0, 8192, engine._nursery)
        with trio.fail_after(10):
            await source.arrived.wait()
            async with trio.open_nursery() as writers:
                writers.start_soon(engine.write, 0, b"w" * 4096)
                writers.start_soon(engine.write, 4096 + 100, b"p" * 100)
                await trio.testing.wait_all_tasks_blocked(0.01)
                assert engine.status().hydrating_regions == 2  # both wait for the copy
                source.release.set()
        assert source.failures == 1
        assert await engine.read(0, 8192) == (b"w" * 4096 + clone.source_bytes(4096, 100)
                                             + b"p" * 100 + clone.source_bytes(4296, 3896))


async def test_status_tells_of_retries_and_enable_hydration_ends_a_backoff(clone):
    engine = await clone.open(hydration=False, copy_on_read=False, hydration_batch_size=4,
                              hydration_threshold=4, max_failures=3, backoff_initial=30.0)
    broken = BrokenRange(engine.source, 0, 1 << 62)  # every copy fails: no success resets the count
    engine.source = engine.copier.source = broken  # what the engine and its copier read
    async with clone.running(engine):
        assert engine.status().hydration_retry is None
        engine.message("enable_hydration")
        with trio.fail_after(10):
            while broken.failures == 0 or engine.status().hydrating_regions:
                await trio.sleep(0.01)
        status = engine.status()
        assert status.hydration_error is None  # one failure: backing off, not stopped
        retry = status.hydration_retry
        assert retry.startswith("1 failed in a row (stops at 3), next try in ")
        assert retry.endswith(": source read failed: injected source fault")
        assert "[Errno" not in retry
        broken.broken = False
        engine.message("hydration_batch_size 256")
        engine.message("hydration_threshold 1024")
        engine.message("enable_hydration")  # retries at once, and clears the count
        assert engine.status().hydration_retry is None
        with trio.fail_after(5):  # not after the 10 s backoff the first failure started
            await engine.wait_until_settled()
        assert engine.complete.is_set() and engine.status().hydration_retry is None


async def test_a_waiter_wakes_when_hydration_stops(clone, monkeypatch):
    """`wait` (wait_until_settled) is woken by the stop itself, not found by polling."""
    engine = await clone.open(hydration=False, copy_on_read=False, hydration_batch_size=4,
                              max_failures=3, backoff_initial=0.01)
    engine.source = engine.copier.source = BrokenRange(engine.source, 0, engine.source.size)

    async def enable_hydration():
        engine.message("enable_hydration")

    async with clone.running(engine):
        await assert_settle_waiter_woken_by(engine, enable_hydration, monkeypatch)
        assert "stopped after 3 failures" in engine.status().hydration_error


async def test_a_stop_after_failures_is_tried_again_slowly_and_hydration_resumes_by_itself(clone):
    """A source down for longer than the backoff (a server restarted overnight, DST's
    filesystem full until someone makes room) must not leave the clone stopped until someone
    sends enable_hydration: after the stop one copy is tried every `retry_stopped` seconds,
    and the first that works resumes hydration (and copy-on-read) by itself."""
    engine = await clone.open(hydration=False, copy_on_read=False, hydration_batch_size=4,
                              max_failures=3, backoff_initial=0.01, retry_stopped=0.5)
    broken = BrokenRange(engine.source, 1 << 20, (1 << 20) + 8192)
    engine.source = engine.copier.source = broken
    async with clone.running(engine):
        engine.message("enable_hydration")
        with trio.fail_after(10):
            await engine.wait_until_settled()  # `wait` still ends at the stop
        status = engine.status()
        assert "stopped after 3 failures" in status.hydration_error
        assert "next try in" in status.hydration_retry
        while engine.status().hydrating_regions:
            await trio.sleep(0.01)
        calls = broken.failures
        await trio.sleep(1.3)
        assert 1 <= broken.failures - calls <= 4, "one try per retry_stopped, no more"
        assert "stopped after" in engine.status().hydration_error
        broken.broken = False  # the server is back; nobody sends a message
        with trio.fail_after(10):
            await engine.complete.wait()
        assert engine.status().hydration_error is None
        assert await engine.read(1 << 20, 8192) == clone.source_bytes(1 << 20, 8192)


async def test_with_hydration_off_a_users_read_is_the_try_that_ends_a_stop(clone, monkeypatch):
    """Copy-on-read stores failing (DST full) stop copy-on-read too; with hydration disabled no
    background copy tries again, so a user's read does, once per retry_stopped, and its store
    ends the stop. Hydration itself stays off, as the user set it."""
    engine = await clone.open(hydration=False, copy_on_read=True, max_failures=3,
                              backoff_initial=0.01, retry_stopped=0.5)
    full = True
    real_write = engine.copier.write_or_punch
    tries = []

    def write_or_punch(offset, data):
        tries.append(offset)
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(offset, data)

    monkeypatch.setattr(engine.copier, "write_or_punch", write_or_punch)
    region = engine.geometry.region_size
    async with clone.running(engine):
        for i in range(3):
            assert await engine.read(i * 16 * region, 10) == clone.source_bytes(i * 16 * region, 10)
        with trio.fail_after(5):
            while engine.status().hydration_error is None:
                await trio.sleep(0.01)
        stopped_at = len(tries)
        for i in range(3, 8):  # served from the source, not stored: no try is due yet
            assert await engine.read(i * 16 * region, 10) == clone.source_bytes(i * 16 * region, 10)
        await trio.sleep(0.1)
        assert len(tries) == stopped_at
        full = False
        await trio.sleep(0.5)
        assert await engine.read(8 * 16 * region, 10) == clone.source_bytes(8 * 16 * region, 10)
        with trio.fail_after(5):
            while engine.status().hydration_error is not None:
                await trio.sleep(0.01)
        assert not engine.settings.hydration and engine.meta.hydrated_count > 0
        await trio.sleep(0.3)
        hydrated = engine.meta.hydrated_count
        await trio.sleep(0.3)
        assert engine.meta.hydrated_count == hydrated  # no background hydration started


async def test_the_first_try_after_a_stop_copies_something(clone):
    """A try that comes when hydration's cursor stands at the end must not be spent finding
    nothing there: the first try after the stop is a copy, and it resumes hydration."""
    engine = await clone.open(hydration=False, copy_on_read=False, max_failures=3,
                              backoff_initial=0.01, retry_stopped=2.0, hydration_batch_size=1,
                              region_size=1 << 20)
    # Five regions, all claimed before the first copy runs: the cursor stands at the end.
    engine.settings.hydration_threshold = engine.meta.nr_regions
    broken = BrokenRange(engine.source, 0, engine.source.size)
    engine.source = engine.copier.source = broken
    async with clone.running(engine):
        engine.message("enable_hydration")
        with trio.fail_after(10):
            await engine.wait_until_settled()
        stopped = trio.current_time()
        while engine.status().hydrating_regions:  # copies in flight at the stop fail too
            await trio.sleep(0.01)
        broken.broken = False
        with trio.fail_after(10):
            while engine.status().hydration_error is not None:
                await trio.sleep(0.01)
        assert trio.current_time() - stopped < 3.2  # the first try, due 2 s after the stop
