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
    # 5-33 ms). While users are active, a copy's bytes must be on the disk before more are
    # sent there (they may wait in DST's page cache meanwhile: a disk's queue holds none of them).
    import threading

    from fuseclone import copier, destination

    engine = await clone.open(hydration=False)
    lock = threading.Lock()
    at_disk = {"now": 0, "most": 0, "waited": 0}  # bytes sent to DST's disk, not waited for yet

    def note(offset, delta):
        if not MiB <= offset < 3 * MiB:  # the prefetch's, not the copy-on-read store's
            return
        with lock:
            at_disk["now"] = max(0, at_disk["now"] + delta)
            at_disk["most"] = max(at_disk["most"], at_disk["now"])
            at_disk["waited"] += max(0, -delta)

    sync_file_range = destination._sync_file_range

    def noted_sync(fd, offset, length, flags):
        if flags & destination.SYNC_FILE_RANGE_WRITE:
            note(offset, length)
        sync_file_range(fd, offset, length, flags)
        if flags & destination.SYNC_FILE_RANGE_WAIT_AFTER:
            note(offset, -length)

    monkeypatch.setattr(destination, "_sync_file_range", noted_sync)
    run = range(256, 768)  # 2 MiB at 1 MiB, in one copy
    engine.prefetch([run])
    async with clone.running(engine, hold_hydration=True), user_reading_hydrated(engine, clone):
        await trio.sleep(0.01)
        engine.release_hydration()
        with trio.fail_after(10):
            while not engine.meta.all_hydrated(run):
                await trio.sleep(0.01)
        with trio.fail_after(10):  # the pieces may follow the copy's bits
            while engine.status().prefetching or engine.hydrator.copies_in_flight():
                await trio.sleep(0.01)
    assert 0 < at_disk["most"] <= copier.BOUNDED_WRITE_BYTES
    with open(clone.dst, "rb") as f:
        f.seek(MiB)
        assert f.read(2 * MiB) == clone.source_bytes(MiB, 2 * MiB)


async def test_a_user_waiting_for_a_copy_reads_it_before_its_pieces_reach_dst_disk(clone, monkeypatch):  # noqa: F811
    # Row 9's start-up reads its prefetch's copies as they land, from DST's page cache; they
    # were released only once all of it had reached DST's disk 128 KiB at a time (32 MiB).
    import threading

    engine = await clone.open(hydration=False)
    disk = threading.Event()  # DST's disk takes nothing until set
    write_back = engine.dst.write_back
    monkeypatch.setattr(engine.dst, "write_back",
                        lambda offset, length: (disk.wait(10), write_back(offset, length)))
    copying = trio.Event()
    read_for_copy = engine.source.read_for_copy

    async def slow_read_for_copy(offset, length):
        copying.set()
        await trio.sleep(0.1)
        return await read_for_copy(offset, length)

    monkeypatch.setattr(engine.source, "read_for_copy", slow_read_for_copy)
    run = range(256, 768)  # 2 MiB at 1 MiB, in one copy
    engine.prefetch([run])
    async with clone.running(engine, hold_hydration=True), user_reading_hydrated(engine, clone):
        engine.release_hydration()
        await copying.wait()  # the user's read waits for the copy, as start-ups do
        try:
            with trio.fail_after(5):
                assert await engine.read(2 * MiB, 4096) == clone.source_bytes(2 * MiB, 4096)
        finally:
            disk.set()  # a failure must not leave the copy's pieces waiting
