"""The engine takes hot spots ahead of its in-order sweep (the order itself: test_ordering)."""

import trio

from tests.engine.conftest import KiB, MiB, clone, source_file  # noqa: F401  (fixtures)


async def test_regions_near_a_read_from_the_source_hydrate_before_the_rest(clone):  # noqa: F811
    # 64 KiB copies at 512 KiB/s: the 1 MiB around the read takes about 2 s, and the in-order
    # sweep waits until it is done.
    engine = await clone.open(hydration_batch_size=16, hydration_threshold=16, max_rate=512 * KiB)
    async with clone.running(engine, hold_hydration=True):
        assert await engine.read(3 * MiB + 8 * KiB, 4096) == clone.source_bytes(3 * MiB + 8 * KiB, 4096)
        engine.release_hydration()
        await trio.sleep(0.5)
        hot = range(3 * MiB // 4096, 4 * MiB // 4096)
        assert engine.meta.hydrated_in(hot) > 16
        assert engine.meta.hydrated_in(range(0, hot.start)) == 0
        assert engine.status().fetched["hot_spots"] > 0
