import contextlib
import errno
import hashlib
import mmap
import os
import threading
import time

import pytest
import trio

from benchmarks.system import evict
from fuseclone import hydrator as hydrator_module
from fuseclone.engine import (COLD_AFTER_MISSES, HANDED_OVER_WRITE_MIN, LOOP_FLUSH_MAX,
                              LOOP_WRITE_THROUGH_MAX, PROBE_EVERY_WHEN_COLD)
from fuseclone.fuse import codec
from fuseclone.fuse.backend import Continue, ReadFrom
from fuseclone.fuse.fs import ImageFilesystem
from fuseclone.metadata import Metadata
from tests.engine.conftest import KiB, MiB
from tests.page_cache import cached_pages


def file_bytes(path, size=None):
    with open(path, "rb") as f:
        return f.read(size)


async def test_background_hydration_copies_everything_and_keeps_holes(clone):
    engine = await clone.open(hydration_batch_size=64)
    async with clone.running(engine):
        with trio.fail_after(30):
            await engine.complete.wait()
        status = engine.status()
        assert status.hydrated_regions == status.total_regions == (4 * MiB + 5 * KiB + 4095) // 4096
    size = os.path.getsize(clone.src)
    assert file_bytes(clone.dst, size) == clone.source_bytes()
    # zeros and holes of the source are holes in the destination
    # the source has allocated zero chunks; the destination must not
    assert os.stat(clone.dst).st_blocks < os.stat(clone.src).st_blocks * 0.85
    with Metadata.open(clone.meta, writable=False) as meta:
        assert meta.complete and meta.header.clean


def dst_cached(dst, offset, length):
    """Whether all of DST's pages in the range are in the page cache."""
    return cached_pages(dst, offset, length) == -(-length // mmap.PAGESIZE)


def drop_cache(path):
    """Write back and drop `path`'s page cache; again while mincore still finds some: under load
    (the whole suite, other work beside it) the kernel sometimes keeps a page a moment longer."""
    for _ in range(20):
        evict(path)
        if cached_pages(path) == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path}: {cached_pages(path)} pages stay in the page cache")


def spy_on_write_through(monkeypatch, engine) -> list[tuple[int, int]]:
    """The (offset, length) of each write the engine writes through to DST's disk. Asked of the
    engine, not of DST's page cache: on a loaded host the kernel sometimes could not invalidate
    a page and made the direct write a buffered one, which is only slower, never wrong."""
    written_through = []
    write_through = engine.dst.write_through
    monkeypatch.setattr(engine.dst, "write_through",
                        lambda offset, data: (written_through.append((offset, len(data))),
                                              write_through(offset, data)))
    return written_through


class ProbesOfDstCache:
    """Counts the engine's probes of DST's page cache (`calls`); while `missing`, each misses.
    A real probe of dropped pages misses too, except that the read its miss starts sometimes
    finishes before it looks again on a loaded host (1 to 16 in 300 here), and it hits."""

    def __init__(self, monkeypatch, engine) -> None:
        self.calls, self.missing = 0, True
        read_cached = engine.dst.read_cached

        def probe(offset, length):
            self.calls += 1
            return None if self.missing else read_cached(offset, length)
        monkeypatch.setattr(engine.dst, "read_cached", probe)


def read_now_of_uncached(engine, dst, offset, length, kernel_keeps) -> ReadFrom:
    """`engine.read_now` of the range with DST's page cache dropped, asked again (dropped
    again) while its probe hits because the read that probe started finished first."""
    for _ in range(20):
        drop_cache(dst)
        got = engine.read_now(offset, length, kernel_keeps=kernel_keeps)
        if isinstance(got, ReadFrom):
            return got
    raise AssertionError(f"the probe of DST's page cache at {offset} hit 20 times of 20")


async def hydrated_and_uncached(clone, engine):
    """Wait until the clone is hydrated and committed, then drop DST's page cache."""
    with trio.fail_after(30):
        await engine.complete.wait()
    await engine.commit()
    drop_cache(clone.dst)


async def test_read_now_of_hydrated_data_on_disk_names_dst_range_and_its_blocking_read(clone):
    """No hop back to the event loop: the FUSE session reads the range on its io_uring, or runs
    the blocking read on a job thread, while DST's disk is already reading it (the page-cache
    probe that missed started the read). Unless the kernel keeps no copy of what it reads
    (O_DIRECT), DST's copy is dropped after it: one is enough."""
    engine = await clone.open()
    async with clone.running(engine):
        await hydrated_and_uncached(clone, engine)
        for offset, kernel_keeps in ((0, True), (MiB, False)):
            got = read_now_of_uncached(engine, clone.dst, offset, 64 * KiB, kernel_keeps)
            assert (got.offset, got.length, got.drop_cached) == (offset, 64 * KiB, kernel_keeps)
            assert os.path.samestat(os.fstat(got.fd), os.stat(clone.dst))
            with trio.fail_after(5):  # the disk is already reading them: the job only waits
                while not dst_cached(clone.dst, offset, 64 * KiB):
                    await trio.sleep(0.01)
            assert await trio.to_thread.run_sync(got.read) == clone.source_bytes(offset, 64 * KiB)
            assert dst_cached(clone.dst, offset, 64 * KiB) is not kernel_keeps
        assert engine.read_now(MiB, 64 * KiB, kernel_keeps=True) == clone.source_bytes(MiB, 64 * KiB)


def count_calls(monkeypatch, owner, name):
    """Count the calls of `owner.name` (a list that grows by one per call)."""
    calls, real = [], getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, counted)
    return calls


async def test_a_missed_read_is_decided_once(clone, monkeypatch):
    """One dispatch decision per READ: the continuation of a read of unhydrated data carries
    what the quick attempt learned (not all hydrated), so nothing asks the bitmap again or
    probes DST's page cache; a cold read of hydrated data probes it once."""
    engine = await clone.open(hydration=False, copy_on_read=False)
    quick_read = ImageFilesystem(engine).quick_handlers()[codec.Read]
    async with clone.running(engine):
        engine.write_now(MiB, b"h" * 8192)  # two regions hydrated
        queries = count_calls(monkeypatch, engine.meta, "all_hydrated")
        probes = ProbesOfDstCache(monkeypatch, engine)  # each misses
        answer = quick_read(codec.Read(1, 2, 0, 0, 0, 1, 0, 8192))
        assert isinstance(answer, Continue)
        assert await answer.answer() == codec.DataReply(clone.source_bytes(0, 8192))
        assert (len(queries), probes.calls) == (1, 0)
        await engine.commit()
        read = quick_read(codec.Read(2, 2, 0, 0, 0, 1, MiB, 8192)).read
        assert await trio.to_thread.run_sync(read) == b"h" * 8192
        assert (len(queries), probes.calls) == (2, 1)


async def test_cold_reads_stop_probing_dst_page_cache_until_one_hits(clone, monkeypatch):
    """A probe that misses costs the kernel time of the read that follows: in a cold spell only
    one read in PROBE_EVERY_WHEN_COLD probes, and the first hit ends it."""
    engine = await clone.open()
    async with clone.running(engine):
        await hydrated_and_uncached(clone, engine)
        probes = ProbesOfDstCache(monkeypatch, engine)
        for block in range(COLD_AFTER_MISSES + PROBE_EVERY_WHEN_COLD):
            got = engine.read_now(block * 64 * KiB, 4096, kernel_keeps=False)
            assert isinstance(got, ReadFrom), block
        assert probes.calls == COLD_AFTER_MISSES + 1
        probes.missing = False
        await trio.to_thread.run_sync(engine.dst.read, 0, 4096)  # cached now
        for _ in range(PROBE_EVERY_WHEN_COLD):
            got = engine.read_now(0, 4096, kernel_keeps=False)
        assert got == clone.source_bytes(0, 4096)  # the probe that hit: warm again
        assert engine.read_now(0, 4096, kernel_keeps=False) == clone.source_bytes(0, 4096)


async def test_a_write_that_needs_a_copy_is_decided_once(clone, monkeypatch):
    """The continuation of a partial write to an unhydrated region, whose written bits are
    durable, goes straight to the copy: `write_now` is not asked again."""
    engine = await clone.open(hydration=False, copy_on_read=False)
    quick_write = ImageFilesystem(engine).quick_handlers()[codec.Write]
    async with clone.running(engine):
        await engine._record_written(0, MiB)
        attempts = count_calls(monkeypatch, engine, "write_now")
        answer = quick_write(codec.Write(1, 2, 0, 0, 0, 1, 100, memoryview(b"p" * 100), 0))
        assert isinstance(answer, Continue)
        assert await answer.answer() == codec.WriteReply(100)
        assert len(attempts) == 1
        assert await engine.read(0, 4096) == clone.source_bytes(0, 100) + b"p" * 100 + clone.source_bytes(200, 3896)


async def test_hydration_in_order_skips_ahead_of_a_writer_filling_regions(clone, monkeypatch):
    """A writer filling unhydrated regions in order would otherwise wait for the copy of the
    regions it is about to replace, batch after batch."""
    monkeypatch.setattr(hydrator_module, "WRITER_LEAD_BYTES", MiB)
    engine = await clone.open()
    async with clone.running(engine, hold_hydration=True):
        assert engine.write_now(0, b"w" * (64 * KiB)) is True
        claim, in_order = engine.hydrator._next_batch(0)
        assert in_order and claim.regions.start == (64 * KiB + MiB) // 4096
        engine._release(claim)
        await trio.sleep(0.1)  # the writer stopped: hydration goes on where it left off
        claim, _ = engine.hydrator._next_batch(0)
        assert claim.regions.start == 64 * KiB // 4096
        engine._release(claim)


async def test_held_hydration_starts_only_when_released(clone):
    # The daemon holds hydration until the image is mounted; user I/O works meanwhile.
    engine = await clone.open()
    async with clone.running(engine, hold_hydration=True):
        assert await engine.read(0, 4096) == clone.source_bytes(0, 4096)
        await trio.sleep(0.2)
        assert engine.status().hydrated_regions <= 1  # at most the copy-on-read region
        engine.release_hydration()
        with trio.fail_after(30):
            await engine.complete.wait()
    assert file_bytes(clone.dst, os.path.getsize(clone.src)) == clone.source_bytes()


async def test_inline_writes_replace_whole_unhydrated_regions_only(clone):
    engine = await clone.open(hydration=False, copy_on_read=False)
    async with clone.running(engine):
        # Part of a region in a chunk never written waits for its written bit in META first.
        assert isinstance(engine.write_now(8192 + 1, b"w" * 100), Continue)
        await engine._record_written(0, 1 << 20)
        # Whole regions, not hydrated: written at once and marked hydrated, no source read.
        assert engine.write_now(8192, b"w" * 8192)
        assert [engine.meta.is_hydrated(r) for r in (1, 2, 3, 4)] == [False, True, True, False]
        # Part of an unhydrated region needs the source's rest: the async path's job.
        assert isinstance(engine.write_now(4096 * 5 + 100, b"p" * 100), Continue)
        # Regions a copy is filling are left to the async path, which waits for the copy.
        claim = engine.claim(range(6, 7))
        assert isinstance(engine.write_now(4096 * 6, b"c" * 4096), Continue)
        engine._release(claim)
        await engine.write(4096 * 5 + 100, b"p" * 100)
        assert engine.source_reads == 4096  # only region 5's rest was read
        assert await engine.read(4096, 5 * 4096) == (
            clone.source_bytes(4096, 4096) + b"w" * 8192 + clone.source_bytes(4 * 4096, 4096)
            + clone.source_bytes(5 * 4096, 100) + b"p" * 100 + clone.source_bytes(5 * 4096 + 200, 4096 - 200))
        await engine.commit()
    with Metadata.open(clone.meta, writable=False) as meta:
        assert meta.is_hydrated(2) and meta.is_hydrated(3) and not meta.is_hydrated(6)
    assert file_bytes(clone.dst, 3 * 4096)[8192:] == b"w" * 4096


async def test_large_writes_to_hydrated_regions_are_handed_over(clone):
    """The FUSE session runs them on its job thread: write_now gives back the blocking write."""
    engine = await clone.open(hydration=False, copy_on_read=False)
    size = HANDED_OVER_WRITE_MIN
    async with clone.running(engine):
        await engine._record_written(0, size)  # written bits first (write-ahead)
        assert engine.write_now(0, b"a" * size) is True  # unhydrated: written and marked at once
        handed_over = engine.write_now(0, b"b" * size)
        assert callable(handed_over)
        assert file_bytes(clone.dst, size) == b"a" * size  # nothing written until it runs
        handed_over()
        assert file_bytes(clone.dst, size) == b"b" * size
        assert engine.write_now(0, b"s" * (size - 4096)) is True  # smaller: on the loop
        await engine.write(0, b"c" * size)  # the async path runs it in a worker thread
        assert await engine.read(0, size) == b"c" * size
        assert engine.source_reads == 0


async def test_direct_writes_to_hydrated_regions_go_past_dst_page_cache(clone, monkeypatch):
    """A writer with O_DIRECT that flushes often (a database on a direct-I/O loop device): its
    small aligned writes to hydrated regions are written through to DST's disk (on the loop up
    to LOOP_WRITE_THROUGH_MAX, larger ones by the job thread), so the flush's fdatasync has
    nothing of them to write back inside the kernel's lock. Without flushes they stay in the
    page cache (many small writes, quicker there)."""
    engine = await clone.open(hydration=False, copy_on_read=False)
    written_through = spy_on_write_through(monkeypatch, engine)
    async with clone.running(engine):
        await engine._record_written(0, MiB)
        assert engine.write_now(0, b"a" * (256 * KiB)) is True  # unhydrated: filled and marked
        assert engine.write_now(0, b"b" * 4096, direct=False) is True  # buffered: at once
        assert engine.write_now(8192, memoryview(b"c" * 8192), direct=True) is True  # no flush yet
        assert written_through == []
        engine.flush_now()  # the writer commits
        assert engine.write_now(8192, memoryview(b"d" * 8192), direct=True) is True  # on the loop
        assert written_through == [(8192, 8192)]
        large = LOOP_WRITE_THROUGH_MAX + 4096
        through = engine.write_now(64 * KiB, memoryview(b"e" * large), direct=True)
        assert callable(through)
        await trio.to_thread.run_sync(through)
        assert written_through == [(8192, 8192), (64 * KiB, large)]
        drop_cache(clone.dst)
        assert file_bytes(clone.dst, 64 * KiB + large) == (
            b"b" * 4096 + b"a" * 4096 + b"d" * 8192 + b"a" * (48 * KiB) + b"e" * large)


async def test_a_direct_write_waiting_for_its_written_bits_still_goes_past_dst_page_cache(clone, monkeypatch):
    """The first write to a chunk waits for its written bit to reach META; then it is still a
    direct writer's, written through, not left in DST's page cache for the next FSYNC."""
    engine = await clone.open()
    written_through = spy_on_write_through(monkeypatch, engine)
    async with clone.running(engine):
        await hydrated_and_uncached(clone, engine)
        assert not engine.meta.written_durable(64 * KiB, 4096)
        engine.flush_now()  # the writer commits
        await engine.write(64 * KiB, memoryview(b"w" * 4096), direct=True)
        assert engine.meta.written_durable(64 * KiB, 4096)
        assert written_through == [(64 * KiB, 4096)]
        assert await engine.read(64 * KiB, 4096) == b"w" * 4096


async def test_a_flush_is_short_while_dst_has_little_to_write_back(clone):
    """An FSYNC with nothing to commit runs its fdatasync on the event loop only while DST
    holds little written since the last one began: else it could stall the loop for long."""
    engine = await clone.open(hydration=False, copy_on_read=False)
    async with clone.running(engine):
        await engine._record_written(0, MiB)
        await engine.commit()
        assert engine.flush_is_short()
        engine.write_now(0, b"a" * LOOP_FLUSH_MAX)  # unhydrated, whole regions: filled
        assert engine.flush_is_short()
        engine.write_now(LOOP_FLUSH_MAX, b"b" * 4096)
        assert not engine.flush_is_short()
        await engine.commit()  # its fdatasync began after those writes
        assert engine.flush_is_short()
        engine.flush_now()
        assert engine.write_now(0, memoryview(b"c" * 8192), direct=True) is True  # through
        assert engine.flush_is_short()  # on the disk already
        await engine.discard(256 * KiB, 256 * KiB)
        assert not engine.flush_is_short()


async def test_reads_come_from_source_until_hydrated(clone):
    engine = await clone.open(hydration=False, copy_on_read=False)
    async with clone.running(engine):
        data = await engine.read(12345, 100_000)
        assert data == clone.source_bytes(12345, 100_000)
        assert engine.status().hydrated_regions == 0
        assert engine.source_reads == 100_000


async def test_copy_on_read_hydrates_what_was_read(clone):
    engine = await clone.open(hydration=False)
    async with clone.running(engine):
        data = await engine.read(8192 + 10, 5000)
        assert data == clone.source_bytes(8192 + 10, 5000)
        await trio.sleep(0.2)  # the store runs in the background
        assert engine.meta.is_hydrated(2) and engine.meta.is_hydrated(3)
        reads = engine.source_reads
        assert await engine.read(8192, 8192) == clone.source_bytes(8192, 8192)
        assert engine.source_reads == reads  # now served from DST


async def test_partial_write_to_unhydrated_region_hydrates_it_first(clone):
    engine = await clone.open(hydration=False, copy_on_read=False)
    async with clone.running(engine):
        await engine.write(4096 * 5 + 100, b"x" * 50)
        assert engine.meta.is_hydrated(5)
        expected = bytearray(clone.source_bytes(4096 * 5, 4096))
        expected[100:150] = b"x" * 50
        assert await engine.read(4096 * 5, 4096) == bytes(expected)


async def test_whole_region_write_skips_the_copy(clone):
    engine = await clone.open(hydration=False, copy_on_read=False)
    async with clone.running(engine):
        await engine.write(4096 * 10, b"y" * 4096 * 3)
        assert engine.source_reads == 0
        assert engine.status().hydrated_regions == 3
        await engine.flush()
    with Metadata.open(clone.meta, writable=False) as meta:
        assert meta.hydrated_count == 3 and meta.is_hydrated(11)


async def test_discard_marks_covered_regions_without_reading_the_source(clone):
    engine = await clone.open(hydration=False, copy_on_read=False)
    async with clone.running(engine):
        await engine.discard(4096 * 4, 4096 * 8)
        assert engine.source_reads == 0
        assert engine.status().hydrated_regions == 8
        assert await engine.read(4096 * 4, 4096 * 8) == bytes(4096 * 8)
        # a partial discard of an unhydrated region hydrates it, then zeros just that part
        await engine.discard(4096 * 20 + 1000, 1000)
        expected = bytearray(clone.source_bytes(4096 * 20, 4096))
        expected[1000:2000] = bytes(1000)
        assert await engine.read(4096 * 20, 4096) == bytes(expected)


async def test_no_discard_passdown_still_reads_zeros(clone):
    engine = await clone.open(hydration=False, copy_on_read=False, discard_passdown=False)
    async with clone.running(engine):
        await engine.write(0, b"z" * 8192)
        await engine.discard(0, 8192)
        assert await engine.read(0, 8192) == bytes(8192)


async def test_flush_commits_metadata(clone):
    engine = await clone.open(hydration=False, commit_interval=3600)
    async with clone.running(engine):
        await engine.write(0, b"a" * 4096)
        assert engine.meta.dirty
        await engine.flush()
        assert not engine.meta.dirty


async def test_periodic_commit_without_flush(clone):
    engine = await clone.open(hydration=False, commit_interval=0.05)
    async with clone.running(engine):
        await engine.write(0, b"a" * 4096)
        # `dirty` clears when a commit takes the bits, before it has written them: wait for both.
        with trio.fail_after(5):
            while engine.meta.dirty or engine.meta.bytes_written == 0:
                await trio.sleep(0.02)


async def test_reopen_resumes_and_keeps_writes(clone):
    engine = await clone.open(hydration=False)
    async with clone.running(engine):
        await engine.write(4096 * 3, b"k" * 4096)
    engine = await clone.open()
    async with clone.running(engine):
        with trio.fail_after(30):
            await engine.complete.wait()
        assert await engine.read(4096 * 3, 4096) == b"k" * 4096
    expected = bytearray(clone.source_bytes())
    expected[4096 * 3 : 4096 * 4] = b"k" * 4096
    assert hashlib.sha256(file_bytes(clone.dst, len(expected))).digest() == hashlib.sha256(expected).digest()


async def test_messages_and_status(clone):
    engine = await clone.open(hydration=False)
    async with clone.running(engine):
        engine.message("hydration_threshold 32")
        engine.message("hydration_batch_size 8")
        with pytest.raises(ValueError, match="unknown message"):
            engine.message("frobnicate")
        with pytest.raises(ValueError, match="whole number"):
            engine.message("hydration_threshold many")
        s = engine.status()
        assert (s.hydration_threshold, s.hydration_batch_size, s.hydration_enabled) == (32, 8, False)
        assert "no_hydration" in s.features
        assert s.dmsetup_line().endswith("4 hydration_threshold 32 hydration_batch_size 8 rw")
        engine.message("enable_hydration")
        with trio.fail_after(30):
            await engine.complete.wait()
    with Metadata.open(clone.meta, writable=False) as meta:
        assert meta.header.hydration_threshold == 32 and meta.header.hydration_batch_size == 8


async def test_max_rate_limits_hydration(clone):
    engine = await clone.open(max_rate=4 * MiB, hydration_batch_size=64)
    async with clone.running(engine):
        await trio.sleep(0.5)
        hydrated = engine.status().hydrated_regions * 4096
    assert 0 < hydrated <= 4 * MiB * 0.5 + 1 * MiB  # a tenth of a second of burst, one batch


async def test_a_max_rate_message_changes_the_rate_at_once(clone):
    """`message max_rate RATE` on a live mount: a copy waiting under the old rate (here a
    minute's worth: 256 KiB at 4 KiB/s) goes on at the new one without finishing that wait."""
    engine = await clone.open(max_rate=4 * KiB, hydration_batch_size=64)
    async with clone.running(engine):
        await trio.sleep(0.3)
        assert not engine.complete.is_set() and engine.status().max_rate == 4 * KiB
        with pytest.raises(ValueError, match="not a size"):
            engine.message("max_rate fast")
        engine.message("max_rate 0")  # unlimited
        assert engine.status().max_rate == 0
        with trio.fail_after(10):
            await engine.complete.wait()
        engine.message("max_rate 10M/s")
        assert engine.status().max_rate == 10 * MiB


async def test_seek_data_and_hole_follow_source_and_destination(clone):
    # the source: 64 KiB chunks, every 7th a hole (chunk 6 = [384K, 448K)), every 5th zeros
    engine = await clone.open(hydration=False, copy_on_read=False)
    async with clone.running(engine):
        assert await engine.seek(0, os.SEEK_DATA) == 0
        assert await engine.seek(0, os.SEEK_HOLE) == 384 * KiB
        assert await engine.seek(384 * KiB, os.SEEK_DATA) == 448 * KiB
        await engine.write(400 * KiB, b"d" * 4096)  # data inside the source's hole
        assert await engine.seek(384 * KiB, os.SEEK_DATA) == 400 * KiB
        await engine.discard(0, 64 * KiB)  # a hole punched in DST
        assert await engine.seek(0, os.SEEK_HOLE) == 0
        assert await engine.seek(0, os.SEEK_DATA) == 64 * KiB
        with pytest.raises(OSError) as info:
            await engine.seek(engine.size, os.SEEK_DATA)
        assert info.value.errno == errno.ENXIO


def test_default_depth_leaves_room_for_the_bitmap():
    from fuseclone.engine import default_depth
    from fuseclone.regions import Geometry

    assert default_depth(64 * MiB, Geometry(16 << 30, 4096)) == 64 * MiB  # 512 KiB bitmap
    assert default_depth(64 * MiB, Geometry(256 << 30, 4096)) == 64 * MiB  # 8 MiB bitmap
    assert default_depth(128 * MiB, Geometry(256 << 30, 4096)) == 102 * MiB  # less 3.25x it
    assert default_depth(128 * MiB, Geometry(16 << 30, 4096)) == 127 * MiB
    assert default_depth(128 * MiB, Geometry(1 << 40, 4096)) == 24 * MiB
    assert default_depth(64 * MiB, Geometry(1 << 40, 4096)) == 24 * MiB  # 1 TiB: 32 MiB bitmap
    assert default_depth(64 * MiB, Geometry(4 << 40, 4096)) == 16 * MiB  # never under 16 MiB
    assert default_depth(64 * MiB, Geometry(1 << 40, 1 << 20)) == 64 * MiB
    assert default_depth(16 * MiB, Geometry(1 << 30, 4096)) == 16 * MiB  # a file asks for less


def test_default_batch_grows_only_with_enough_copies_in_flight():
    from fuseclone.engine import Settings, default_batch
    from fuseclone.regions import Geometry

    assert default_batch(8 * MiB, 128 * MiB) == 8 * MiB  # NBD, small clone: 16 copies of 8 MiB
    assert default_batch(8 * MiB, 24 * MiB) == 4 * MiB  # NBD, 1 TiB clone: 6 copies of 4 MiB
    assert default_batch(4 * MiB, 128 * MiB) == 4 * MiB  # a source that asks for 4 MiB
    resolved = Settings().resolved(Geometry(1 << 30, 4096), 128 * MiB, 8 * MiB)
    assert resolved.hydration_batch_size == 2048 and resolved.hydration_threshold == 32768
    assert Settings(hydration_batch_size=16).resolved(Geometry(1 << 30, 4096), 128 * MiB,
                                                      8 * MiB).hydration_batch_size == 16


async def test_flush_now_is_one_fdatasync_only_when_nothing_waits_to_be_committed(clone):
    """An FSYNC with nothing to commit is a bare fdatasync of DST that any thread may run; with
    bits to commit, or a commit under way (its bits may not be in META yet), it is not."""
    engine = await clone.open(hydration=False, commit_interval=3600)
    syncs = []
    real_datasync = engine.dst.datasync
    held = threading.Event()  # set: DST's fdatasync waits until it is cleared

    def counted_datasync():
        syncs.append(1)
        while held.is_set():
            time.sleep(0.001)
        real_datasync()

    engine.dst.datasync = counted_datasync
    async with clone.running(engine):
        await engine.write(0, b"a" * 4096)  # hydrates region 0: a bit to commit
        assert engine.flush_now() is None
        held.set()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(engine.flush)
                with trio.fail_after(5):
                    while not syncs:  # the commit took its blocks and waits in DST's fdatasync
                        await trio.sleep(0.001)
                assert not engine.meta.dirty and engine.flush_now() is None
                held.clear()
        finally:
            held.clear()
        flush = engine.flush_now()
        assert callable(flush)
        before = len(syncs)
        await trio.to_thread.run_sync(flush)
        assert len(syncs) == before + 1
        assert engine._commits_done == 1  # no commit of its own


@contextlib.asynccontextmanager
async def commit_held_in_dst_datasync(engine):
    """Start a commit (the committer's) and hold it in DST's fdatasync for the duration of the
    block: its bitmap blocks are taken, and not in META yet."""
    held = threading.Event()
    real_datasync = engine.dst.datasync
    syncs = []

    def held_datasync():
        syncs.append(1)
        while held.is_set():
            time.sleep(0.001)
        real_datasync()

    engine.dst.datasync = held_datasync
    held.set()
    async with trio.open_nursery() as nursery:
        try:  # cleared before the nursery waits for the commit, whatever fails here
            nursery.start_soon(engine.commit)
            with trio.fail_after(5):
                while not syncs:
                    await trio.sleep(0.001)
            yield
        finally:
            held.clear()


async def test_flush_now_does_not_wait_for_hydrations_bits(clone):
    """A flush needs the bits of the regions users wrote in META, not the bits hydration set
    since (a lost copy is copied again): it stays one fdatasync while they wait for the
    committer, and while their commit runs. A user write near unsettled bits needs a commit."""
    engine = await clone.open(hydration=False, commit_interval=3600)
    async with clone.running(engine):
        await engine.write(0, b"a" * 4096)
        await engine.flush()
        await engine.copy(engine.claim(range(64, 66)))  # hydration: bits to commit
        assert engine.meta.dirty
        assert callable(engine.flush_now())
        async with commit_held_in_dst_datasync(engine):
            assert engine._commit_lock.locked() and callable(engine.flush_now())
            # A user write whose bitmap block is in that commit: its flush waits for one.
            await engine.write(64 * 4096, b"w" * 4096)
            assert engine.flush_now() is None
        assert engine.flush_now() is None  # the commit that ran began before the write
        await engine.flush()
        assert callable(engine.flush_now())


async def test_a_user_write_near_hydrations_unsettled_bits_needs_no_commit(clone):
    """A bitmap block covers ~128 MiB of 4 KiB regions, so while hydrating the block of a
    user's region nearly always holds bits that hydration set since the last commit. The
    user's flush needs only its own region's bit in META: if that one is durable, the flush
    stays one fdatasync of DST, before, during and after the commit of hydration's bits."""
    engine = await clone.open(hydration=False, commit_interval=3600)
    async with clone.running(engine):
        await engine.write(0, b"a" * 4096)
        await engine.flush()  # region 0's bit is durable
        await engine.copy(engine.claim(range(64, 66)))  # hydration: bits of the same block
        await engine.write(0, b"b" * 4096)
        assert callable(engine.flush_now())
        async with commit_held_in_dst_datasync(engine):
            await engine.copy(engine.claim(range(80, 82)))  # more, after the batch
            await engine.write(0, b"c" * 4096)
            assert callable(engine.flush_now())
        await engine.write(81 * 4096, b"d" * 4096)  # its bit is not durable yet
        assert engine.flush_now() is None
        await engine.flush()
        await engine.write(65 * 4096, b"e" * 4096)  # committed by the held commit
        assert callable(engine.flush_now())


async def test_a_commit_is_one_thread_hop(clone, monkeypatch):
    """A user's FSYNC after first writes into unhydrated regions waits for a whole commit:
    DST's fdatasync and META's write run in one worker-thread call, in that order."""
    engine = await clone.open(hydration=False, commit_interval=3600)
    async with clone.running(engine):
        await engine.write(0, b"a" * 4096)  # hydrates region 0: a bit to commit
        await engine._record_written(0, 4096)  # no written bits left for the commit
        calls = []
        run_sync = trio.to_thread.run_sync

        async def counted(fn, *args, **kwargs):
            calls.append(fn)
            return await run_sync(fn, *args, **kwargs)

        order = []
        monkeypatch.setattr(trio.to_thread, "run_sync", counted)
        monkeypatch.setattr(engine.dst, "datasync", lambda: order.append("dst"))
        write_commit = engine.meta.write_commit
        monkeypatch.setattr(engine.meta, "write_commit",
                            lambda batch: (order.append("meta"), write_commit(batch)))
        await engine.commit()
        assert len(calls) == 1 and order == ["dst", "meta"]
        assert engine.meta.hydrated_settled(range(0, 1))


async def test_flush_now_failure_is_eio_and_fail_mode(clone):
    engine = await clone.open(hydration=False, commit_interval=3600)

    def failing_datasync():
        raise OSError(errno.EIO, "device gone")

    async with clone.running(engine):
        await engine.write(0, b"a" * 4096)
        await engine.flush()
        engine.dst.datasync = failing_datasync
        flush = engine.flush_now()
        with pytest.raises(OSError) as raised:
            await trio.to_thread.run_sync(flush)
        assert raised.value.errno == errno.EIO
        assert engine.meta.failure is not None
        assert engine.flush_now() is None


def count_source_reads(engine):
    """The source reads of copies and of partial writes' regions, (offset, length) each, as
    they happen."""
    reads = []
    for name in ("read", "read_for_copy"):
        real = getattr(engine.source, name)

        async def counted(offset, length, real=real):
            reads.append((offset, length))
            return await real(offset, length)

        setattr(engine.source, name, counted)
    return reads


async def test_sequential_partial_writes_share_one_source_read(clone):
    """A writer going on from hydrated data gets the regions after its partial write copied
    along (WRITE_AHEAD_BYTES): 32 sequential 4000-byte writes need two source reads, not 32."""
    engine = await clone.open(hydration=False, copy_on_read=False)
    copies = count_source_reads(engine)
    async with clone.running(engine):
        for i in range(32):
            await engine.write(i * 4000, bytes([i + 1]) * 4000)
        assert len(copies) == 2
        expected = b"".join(bytes([i + 1]) * 4000 for i in range(32))
        assert await engine.read(0, 32 * 4000) == expected
        tail = 32 * 4000
        assert await engine.read(tail, 4096) == clone.source_bytes(tail, 4096)


async def test_random_partial_writes_copy_only_their_regions(clone):
    """No copy ahead for a write into unhydrated surroundings; its two partial regions are
    one source read."""
    engine = await clone.open(hydration=False, copy_on_read=False)
    copies = count_source_reads(engine)
    async with clone.running(engine):
        await engine.write(4096 * 40 + 4000, b"r" * 200)  # regions 40 and 41, in part
        assert copies == [(4096 * 40, 2 * 4096)]
        assert engine.status().hydrated_regions == 2


async def test_a_partial_write_into_untouched_regions_waits_for_no_commit(clone, monkeypatch):
    """The source's data around it is read once and written with it, its regions marked
    hydrated as a whole-region write's are: no copy through DST first, and no META commit of
    its written bits before it (they reach META with the regions' hydrated bits, first). An
    unaligned write reaches the daemon as up to three requests (the kernel sends a partial
    page on its own), each of which paid a thread hop per step and the first two a META
    commit: 2,000 random 1-64 KiB writes into a fresh clone took 3.0-3.4 s."""
    engine = await clone.open(hydration=False, copy_on_read=False)
    reads = count_source_reads(engine)
    commits = count_calls(monkeypatch, engine.meta, "write_commit")
    dst_writes = count_calls(monkeypatch, engine.dst, "write")
    async with clone.running(engine):
        await engine.write(4096 * 40 + 4000, b"r" * 5000)  # regions 40-42: both ends in part
        assert reads == [(4096 * 40, 3 * 4096)]
        assert commits == [] and len(dst_writes) == 1
        assert engine.written_commits == 0 and engine.status().hydrated_regions == 3
        expected = bytearray(clone.source_bytes(4096 * 40, 3 * 4096))
        expected[4000:9000] = b"r" * 5000
        assert await engine.read(4096 * 40, 3 * 4096) == bytes(expected)
        await engine.flush()
    with Metadata.open(clone.meta, writable=False) as meta:
        assert meta.hydrated_count == 3 and meta.is_written((4096 * 40 + 4000) // (64 * KiB))


async def test_a_partial_write_over_hydrated_data_still_waits_for_its_written_bits(clone):
    """Only a write whose regions are all unhydrated goes without its written bits durable:
    one that also changes hydrated data may reach DST only after them."""
    engine = await clone.open(hydration=False, copy_on_read=False)
    async with clone.running(engine):
        await engine.copy(engine.claim(range(40, 41)))
        await engine.write(4096 * 40 + 4000, b"r" * 200)  # hydrated 40, unhydrated 41
        assert engine.written_commits == 1
        assert engine.meta.written_durable(4096 * 40 + 4000, 200)


async def test_next_batch_skips_claimed_runs_whole(clone):
    """Finding the next batch steps over a claim in one go: at the end of a hydration, with
    128 MiB of copies in flight (32768 claimed regions), a region-by-region walk of the claims
    took half the event loop's time after every copy that finished."""
    engine = await clone.open(hydration=False)
    meta = engine.meta
    lookups = []
    real_next_unhydrated = meta.next_unhydrated

    def counted(start, stop=None):
        lookups.append(start)
        return real_next_unhydrated(start, stop)

    meta.next_unhydrated = counted
    total = meta.nr_regions
    claimed = engine.claim(range(0, total - 3))
    batch, _ = engine.hydrator._next_batch(0)  # (claim, whether it is the in-order one)
    assert batch.regions.start == total - 3
    assert len(lookups) <= 3
    lookups.clear()
    engine._release(batch)
    assert engine.hydrator._next_batch(total - 1)[0].regions == range(total - 1, total)
    engine._release(claimed)


def dst_holes(path, start, stop):
    """Whether DST's bytes [start, stop) hold no data (SEEK_DATA finds none there)."""
    with open(path, "rb") as f:
        try:
            return os.lseek(f.fileno(), start, os.SEEK_DATA) >= stop
        except OSError:  # ENXIO: no data after start
            return True


async def test_regions_copied_along_a_partial_write_keep_the_sources_zeros_as_holes(clone):
    """What a sequential writer's partial write copies along of the source is stored as
    hydration copies are: all-zero regions become holes (the source's 64 KiB chunk 4 is
    zeros, chunk 6 a hole)."""
    engine = await clone.open(hydration=False, copy_on_read=False)
    async with clone.running(engine):
        await engine.copy(engine.claim(range(63, 64)))
        await engine.write(256 * KiB, b"s" * 100)  # continues region 63: copies 256 KiB along
        assert engine.meta.all_hydrated(range(64, 64 + 65))
        assert await engine.read(256 * KiB, 260 * KiB) == b"s" * 100 + clone.source_bytes(256 * KiB + 100, 260 * KiB - 100)
    assert dst_holes(clone.dst, 260 * KiB, 320 * KiB) and dst_holes(clone.dst, 384 * KiB, 448 * KiB)
    assert not dst_holes(clone.dst, 256 * KiB, 260 * KiB)
