"""A prefetch's depth: full through its trace's first burst, small while users only read other
hydrated data, full while a user waits for data the prefetch (or copy-on-read) must fetch or
reads what it fetched (the pacer itself: tests/engine/test_pacing.py)."""

import pytest
import trio

from fuseclone import hydrator
from tests.engine.conftest import MiB, Clone, make_source_file, user_reading_hydrated

REGION = 4096
PREFETCHED = range(MiB // REGION, 16 * MiB // REGION)  # the trace: 1 MiB to 16 MiB
THRESHOLD = 8 * MiB
SOURCE_DELAY = 0.02  # seconds per copy's source read: copies stay in flight long enough to count


def count_source_reads(monkeypatch, engine, delay):
    """Bytes of copies' source reads in flight, now and at most; each read takes DELAY more."""
    fetching = {"now": 0, "most": 0}
    read_for_copy = engine.source.read_for_copy

    async def slow_read_for_copy(offset, length):
        fetching["now"] += length
        fetching["most"] = max(fetching["most"], fetching["now"])
        try:
            await trio.sleep(delay)
            return await read_for_copy(offset, length)
        finally:
            fetching["now"] -= length

    monkeypatch.setattr(engine.source, "read_for_copy", slow_read_for_copy)
    return fetching


async def test_the_traces_first_burst_is_claimed_at_mount(tmp_path, monkeypatch):
    # Row 9's start-up: a second clone reads what the first read in its first 0.7 s, and
    # reads it sooner when the prefetch has claimed it all at mount (4 MiB first, the rest
    # 50-100 ms later, made it 0.04-0.08 s slower).
    clone = Clone(tmp_path, str(make_source_file(tmp_path / "src.img", 16 * MiB)))
    engine = await clone.open(hydration=False, hydration_threshold=16 * MiB // REGION,
                              hydration_batch_size=MiB // REGION)
    fetching = count_source_reads(monkeypatch, engine, delay=0.2)
    burst = [range(8 * MiB // REGION, 11 * MiB // REGION), range(0, 3 * MiB // REGION)]
    later = [range(3 * MiB // REGION, 8 * MiB // REGION), range(11 * MiB // REGION, 15 * MiB // REGION)]
    engine.prefetch(burst + later, first_burst=2)
    async with clone.running(engine):
        await trio.sleep(0.1)  # no copy has finished: what is in flight was claimed at mount
        at_mount = fetching["most"]
    assert 6 * MiB <= at_mount < 15 * MiB  # the whole burst, not the whole trace


@pytest.mark.parametrize("needing", [
    15 * MiB,  # far ahead in the trace: not fetched yet, the user waits for it
    MiB,  # the trace's start, which the prefetch fetched while yielding: the user follows it
])
async def test_prefetch_yields_to_users_of_hydrated_data_and_goes_full_depth_when_they_need_it(
        tmp_path, monkeypatch, needing):
    # Row 9: the prefetch claimed its whole depth at mount and the users' reads of hydrated
    # data waited for the daemon receiving it (p99 5-7.5 ms against ~0.1-0.2 idle).
    clone = Clone(tmp_path, str(make_source_file(tmp_path / "src.img", 16 * MiB)))
    engine = await clone.open(hydration=False, hydration_threshold=THRESHOLD // REGION,
                              hydration_batch_size=MiB // REGION)
    fetching = count_source_reads(monkeypatch, engine, SOURCE_DELAY)
    engine.prefetch([PREFETCHED])
    async with clone.running(engine, hold_hydration=True), user_reading_hydrated(engine, clone):
        await trio.sleep(0.1)  # the copy-on-read's wait for the source is over
        engine.release_hydration()
        await trio.sleep(0.5)
        yielding = fetching["most"]
        copied = engine.meta.hydrated_in(PREFETCHED) * REGION

        fetching["most"] = 0
        assert await engine.read(needing, 4096) == clone.source_bytes(needing, 4096)
        await trio.sleep(3 * SOURCE_DELAY)
        needed = fetching["most"]
    assert 0 < yielding <= hydrator.PREFETCH_YIELD_BYTES
    assert copied > 0  # it still goes on
    assert needed >= THRESHOLD // 2  # full depth: up to THRESHOLD, less a copy under load
