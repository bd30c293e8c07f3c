"""The engine takes hot spots ahead of its in-order sweep (the order itself: test_ordering)."""

import mmap

import trio

from tests.engine.conftest import KiB, MiB, clone, source_file, user_reading_hydrated  # noqa: F401  (fixtures)


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


async def test_prefetch_copies_skip_block_status_and_stay_in_dst_page_cache(clone, monkeypatch):  # noqa: F811
    # A trace lists what users read: data, read again soon. Block status only delayed the
    # first copies (a round trip per window, cold), and copies written past the page cache
    # sent the user's reads to DST's disk.
    engine = await clone.open(hydration=False)
    asked = []
    extents = engine.source.extents
    monkeypatch.setattr(engine.source, "extents", lambda o, n: asked.append((o, n)) or extents(o, n))

    async def aligned_read(offset, length):  # what the NBD source hands out: page-aligned memory
        data = mmap.mmap(-1, length)
        data[:] = clone.source_bytes(offset, length)
        return data

    monkeypatch.setattr(engine.source, "read_for_copy", aligned_read)
    run = range(256, 512)  # 1 MiB at 1 MiB
    engine.prefetch([run])
    async with clone.running(engine):
        with trio.fail_after(10):
            while not engine.meta.all_hydrated(run):
                await trio.sleep(0.01)
        assert asked == []
        assert engine.dst.read_cached(MiB, MiB) == clone.source_bytes(MiB, MiB)


async def test_copies_reach_dst_disk_a_bounded_piece_at_a_time_while_users_read(clone, monkeypatch):  # noqa: F811
    # A prefetch claims its whole trace at once; with every copy's writeback merely started,
    # DST's disk queued megabytes of writes and users' reads of DST waited behind them (row 9:
    # 5-33 ms). While users are active, a copy's bytes must be on the disk before more follow.
    import threading

    from fuseclone import copier, destination

    engine = await clone.open(hydration=False)
    lock = threading.Lock()
    unwaited = {"now": 0, "most": 0}  # bytes written to DST's page cache, writeback not waited for

    def note(offset, delta):
        if not MiB <= offset < 3 * MiB:  # the prefetch's, not the copy-on-read store's
            return
        with lock:
            unwaited["now"] = max(0, unwaited["now"] + delta)
            unwaited["most"] = max(unwaited["most"], unwaited["now"])

    write, sync_file_range = engine.dst.write, destination._sync_file_range
    monkeypatch.setattr(engine.dst, "write", lambda offset, data: (note(offset, len(data)), write(offset, data)))

    def waited_sync(fd, offset, length, flags):
        sync_file_range(fd, offset, length, flags)
        if flags & destination.SYNC_FILE_RANGE_WAIT_AFTER:
            note(offset, -length)

    monkeypatch.setattr(destination, "_sync_file_range", waited_sync)
    run = range(256, 768)  # 2 MiB at 1 MiB, in one copy
    engine.prefetch([run])
    async with clone.running(engine, hold_hydration=True), user_reading_hydrated(engine, clone):
        await trio.sleep(0.01)
        engine.release_hydration()
        with trio.fail_after(10):
            while not engine.meta.all_hydrated(run):
                await trio.sleep(0.01)
    assert 0 < unwaited["most"] <= copier.BOUNDED_WRITE_BYTES
    with open(clone.dst, "rb") as f:
        f.seek(MiB)
        assert f.read(2 * MiB) == clone.source_bytes(MiB, 2 * MiB)
