"""Changed-block tracking: the written bitmap in META, its crash rules, the format upgrade, and
the engine's write-ahead of written bits."""

import os
import random
import shutil
import threading

import pytest
import trio
import trio.testing

from fuseclone import markahead
from fuseclone.clone import open_clone, running
from fuseclone.engine import Settings
from fuseclone.errors import MetadataError
from fuseclone.fuse.backend import Continue
from fuseclone.markahead import MAX_WINDOW
from fuseclone.metadata import (BLOCK, FLAG_WRITTEN_UNKNOWN, VERSION, Metadata,
                                written_granularity)
from fuseclone.regions import Geometry
from fuseclone.sources.local import LocalSource
from tests.engine.conftest import make_source_file
from tests.engine.test_metadata import CountingFile, snapshot

TiB = 1 << 40
KiB = 1 << 10
MiB = 1 << 20
CHUNK = 64 * KiB
# Made by the format-1 code (commit a393477): a 1 MiB image at 4 KiB regions, regions 0-9 and 100
# hydrated, closed cleanly.
V1_FIXTURE = os.path.join(os.path.dirname(__file__), "data", "meta-v1.bin")


def commit_written(meta):
    batch = meta.prepare_written_commit()
    meta.write_commit(batch)
    meta.finish_commit(batch)
    return batch


def new_meta(path, image_size=1 << 30, region_size=4096):
    return Metadata.create(str(path), Geometry(image_size, region_size), {})


# ---- the written bitmap area ------------------------------------------------------------------


def test_granularity_is_the_region_size_or_64k_and_is_recorded(tmp_path):
    assert written_granularity(4096) == CHUNK and written_granularity(1 << 20) == 1 << 20
    new_meta(tmp_path / "meta", region_size=1 << 20).close()
    with Metadata.open(str(tmp_path / "meta"), writable=False) as meta:
        assert meta.header.written_granularity == 1 << 20
        assert meta.written_geometry.region_size == 1 << 20


def test_a_written_commit_costs_the_changed_blocks_only(tmp_path, monkeypatch):
    meta = new_meta(tmp_path / "meta", image_size=TiB)
    try:
        counter = CountingFile(monkeypatch, meta._fd)
        meta.mark_written(123_456_789_000, 4096)
        assert not meta.written_durable(123_456_789_000, 4096)  # in core only
        batch = commit_written(meta)
        assert counter.bytes == batch.nbytes == BLOCK
        assert meta.written_durable(123_456_789_000, 4096)
        assert meta.prepare_commit() is None  # the hydrated bitmap did not change
    finally:
        meta.close()
    with Metadata.open(str(tmp_path / "meta"), writable=False) as again:
        assert again.written_extents == [(123_456_789_000 // CHUNK * CHUNK, CHUNK)]
        assert again.written_bytes() == CHUNK and again.written_regions() == CHUNK // 4096
        assert again.hydrated_count == 0


def test_a_torn_written_slot_loses_only_its_own_commit(tmp_path):
    path = str(tmp_path / "meta")
    with new_meta(path, image_size=4 << 30) as meta:
        meta.mark_written(0, 10 * CHUNK)
        commit_written(meta)
        meta.mark_written(20 * CHUNK, CHUNK)
        meta.mark_written(30_000 * CHUNK, CHUNK)  # a bit in the half that never lands
        batch = meta.prepare_written_commit()
        (write,) = batch.writes
        os.pwrite(meta._fd, write.image[: BLOCK // 2], write.offset)  # torn
    with Metadata.open(path) as meta:
        assert meta.written_extents == [(0, 10 * CHUNK)]  # the other slot, ORed in
        meta.mark_written(20 * CHUNK, CHUNK)
        commit_written(meta)
        meta.mark_written(30 * CHUNK, CHUNK)
        commit_written(meta)  # alternates slots: both copies valid, ORed on load
    with Metadata.open(path) as meta:
        assert meta.written_extents == [(0, 10 * CHUNK), (20 * CHUNK, CHUNK), (30 * CHUNK, CHUNK)]


def test_both_written_slots_corrupt_is_refused(tmp_path):
    path = str(tmp_path / "meta")
    with new_meta(path, image_size=1 << 20) as meta:
        meta.mark_written(0, 1)
        write = commit_written(meta).writes[0]
        offsets = [write.area.slot_offset(0, slot) for slot in (0, 1)]
    with open(path, "r+b") as f:
        for offset in offsets:
            f.seek(offset + 100)
            f.write(b"\xff" * 8)
    with pytest.raises(MetadataError, match="written bitmap block 0"):
        Metadata.open(path)


def test_hydrated_and_written_bitmaps_do_not_overlap(tmp_path):
    path = str(tmp_path / "meta")
    g = Geometry(TiB, 4096)  # 1029 hydrated bitmap blocks
    with Metadata.create(path, g, {}) as meta:
        meta.set_hydrated(range(g.nr_regions - 1, g.nr_regions))
        meta.mark_written(0, 1)
        for batch in (meta.prepare_commit(), meta.prepare_written_commit()):
            meta.write_commit(batch)
            meta.finish_commit(batch)
    with Metadata.open(path, writable=False) as meta:
        assert meta.hydrated_count == 1 and meta.is_hydrated(g.nr_regions - 1)
        assert meta.written_extents == [(0, CHUNK)]


# ---- format 1 -> 2 -----------------------------------------------------------------------------


def test_format_1_reads_as_written_unknown_and_changes_nothing(tmp_path):
    path = str(tmp_path / "meta")
    shutil.copy(V1_FIXTURE, path)
    before = snapshot(path)
    with Metadata.open(path, writable=False) as meta:
        assert meta.header.version == 1 and meta.header.written_unknown
        assert meta.hydrated_count == 11 and meta.is_hydrated(100)
        assert meta.written_extents == []
    assert snapshot(path) == before


def test_format_1_is_upgraded_on_a_writable_open(tmp_path):
    path = str(tmp_path / "meta")
    shutil.copy(V1_FIXTURE, path)
    with Metadata.open(path) as meta:
        meta.mark_open()
        assert meta.header.version == VERSION and meta.header.flags & FLAG_WRITTEN_UNKNOWN
        meta.mark_written(5 * CHUNK, 1)
        commit_written(meta)
        meta.set_hydrated(range(200, 201))
        batch = meta.prepare_commit()
        meta.write_commit(batch)
        meta.finish_commit(batch)
        meta.mark_clean()
    with Metadata.open(path, writable=False) as meta:
        assert meta.header.version == VERSION and meta.header.written_unknown
        assert meta.header.identity["source"]["path"] == "/v1/src"
        assert meta.header.hydration_threshold == 8 and meta.header.clean
        assert meta.hydrated_count == 12 and meta.is_hydrated(100) and meta.is_hydrated(200)
        assert meta.written_extents == [(5 * CHUNK, CHUNK)]


def test_an_upgrade_cut_before_its_header_leaves_a_valid_format_1_file(tmp_path):
    path = str(tmp_path / "meta")
    shutil.copy(V1_FIXTURE, path)
    with Metadata.open(path) as meta:
        meta._put_header = lambda **kw: (_ for _ in ()).throw(OSError(5, "power cut"))
        with pytest.raises(MetadataError, match="power cut"):
            meta.mark_open()  # extended, then the header write "fails"
    assert os.path.getsize(path) > os.path.getsize(V1_FIXTURE)
    with Metadata.open(path) as meta:
        assert meta.header.version == 1 and meta.hydrated_count == 11
        meta.mark_open()  # the upgrade runs again
    with Metadata.open(path, writable=False) as meta:
        assert meta.header.version == VERSION and meta.header.written_unknown


# ---- the engine ------------------------------------------------------------------------------


async def crash(engine):
    """Stop the engine as a SIGKILL would: nothing more reaches META."""
    engine.meta.close()
    engine.dst.close()


async def no_final_commit():
    return None


async def test_writes_discards_and_zeroing_are_durably_marked_before_they_return(clone):
    engine = await clone.open(hydration=False, copy_on_read=False)
    engine._shutdown_commit = no_final_commit  # nothing is committed on the way out
    async with clone.running(engine):
        await engine.write(3 * CHUNK + 100, b"w" * 10)  # marks the MiB around it (MarkAhead)
        await engine.discard(10 * CHUNK, 2 * CHUNK)  # in that MiB: durable already
        await engine.write_zeroes(48 * CHUNK - 1, 2)  # straddles two chunks and two MiBs
        await engine.read(64 * CHUNK, 4096)  # reads and copy-on-read mark nothing
        status = engine.status()
        assert (status.written_regions, status.written_bytes) == (3 * MiB // 4096, 3 * MiB)
        assert status.written_commits == 2
    with Metadata.open(clone.meta, writable=False) as meta:
        assert meta.written_extents == [(0, MiB), (2 * MiB, 2 * MiB)]


async def test_writers_share_written_commits_and_rewrites_are_free(clone):
    engine = await clone.open(hydration=False, copy_on_read=False)
    async with clone.running(engine):
        commits = []
        real = engine.meta.write_commit
        engine.meta.write_commit = lambda batch: (commits.append(batch), real(batch))
        for i in range(20):  # hydrated: partial writes of them wait for the write-ahead
            await engine.copy(engine.claim(range(i * CHUNK // 4096, i * CHUNK // 4096 + 1)))
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(engine.write, i * CHUNK + 100, b"x" * 4000)
        assert 1 <= len(commits) <= 2  # the first writer's commit, then one for the other 19
        commits.clear()
        for i in range(20):
            assert engine.write_now(i * CHUNK, b"y" * 4096)  # chunks durably written: inline
            await engine.write(i * CHUNK + 8192, b"z" * 4096)
        assert commits == []


async def test_a_written_commit_does_not_wait_for_a_hydration_commit(clone):
    engine = await clone.open(hydration=False, copy_on_read=False)
    async with clone.running(engine):
        release = threading.Event()
        real_sync = engine.dst.datasync
        engine.dst.datasync = lambda: (release.wait(30), real_sync())
        await engine.copy(engine.claim(range(CHUNK // 4096, CHUNK // 4096 + 1)))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.commit)  # stuck in DST's fdatasync
            await trio.sleep(0.05)
            with trio.fail_after(10):
                await engine.write(CHUNK + 100, b"w" * 4000)  # part of a hydrated region
            assert engine.meta.written_durable(CHUNK, 1)
            release.set()


async def hydrated_sparse_clone(tmp_path, size):
    src = str(make_source_file(tmp_path / "src", size, hole_every=1))  # holes: hydrates at once
    engine = open_clone(await LocalSource.open(src), str(tmp_path / "dst"), str(tmp_path / "meta"),
                        settings=Settings())
    return engine


def counting_written_commits(engine):
    commits = []
    real = engine.meta.write_commit
    engine.meta.write_commit = lambda batch: (commits.append(batch), real(batch))
    return commits


async def test_a_sequential_writer_pays_a_few_written_commits_for_many_chunks(tmp_path):
    """The write-ahead marks a window ahead of a sequential writer that doubles up to
    markahead.MAX_WINDOW: 64 MiB of 64 KiB writes (1024 chunks) cost 7 META commits."""
    engine = await hydrated_sparse_clone(tmp_path, 80 * MiB)
    async with running(engine):
        with trio.fail_after(30):
            await engine.complete.wait()
        commits = counting_written_commits(engine)
        for offset in range(0, 64 * MiB, CHUNK):
            await engine.write(offset, b"s" * CHUNK)
        assert len(commits) <= 7
        assert engine.status().written_commits == len(commits)
        assert engine.meta.written_bytes() <= 64 * MiB + MAX_WINDOW


async def test_random_writes_within_a_mib_pay_one_written_commit(tmp_path):
    engine = await hydrated_sparse_clone(tmp_path, 16 * MiB)
    rng = random.Random(3)
    async with running(engine):
        with trio.fail_after(30):
            await engine.complete.wait()
        commits = counting_written_commits(engine)
        for _ in range(32):
            await engine.write(5 * MiB + rng.randrange(MiB // 4096) * 4096, b"r" * 4096)
        assert len(commits) == 1
        assert engine.meta.written_extents == [(5 * MiB, MiB)]
        assert engine.status().written_wait_seconds > 0


@pytest.mark.parametrize("seed", range(15))
async def test_no_crash_leaves_written_data_without_its_written_bit(tmp_path, seed, monkeypatch):
    """Write-ahead: DST's page cache survives a SIGKILL, so any user data that reached DST may
    be there after the crash. Every hydrated region whose DST data differs from the source must
    then be in a written chunk, or check --verify would call the clone corrupt. Odd seeds mark
    no more than the written chunks: around 1 MiB marks would soon cover the whole 8 MiB."""
    if seed % 2:
        monkeypatch.setattr(markahead, "NEIGHBOURHOOD", CHUNK)
        monkeypatch.setattr(markahead, "MAX_WINDOW", CHUNK)
    rng = random.Random(seed)
    size = 8 << 20
    flush_rate = rng.choice([0, 0.02])
    src = str(make_source_file(tmp_path / "src", size, seed=seed, chunk=4096, zero_every=0, hole_every=0))
    dst, meta_path = str(tmp_path / "dst"), str(tmp_path / "meta")
    engine = open_clone(await LocalSource.open(src), dst, meta_path, settings=Settings(
        hydration_batch_size=4, hydration_threshold=16, commit_interval=rng.choice([0.02, 1.0])))
    engine._shutdown_commit = no_final_commit

    async def user(writer):
        while True:
            offset = rng.randrange(size - 8192)
            kind = rng.choice("wwwdz")
            if kind == "w":
                await engine.write(offset, rng.randbytes(rng.choice([512, 4096, 8192])))
            elif kind == "d":
                await engine.discard(offset, 8192)
            else:
                await engine.write_zeroes(offset, 4096)
            if rng.random() < flush_rate:
                await engine.flush()

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        if rng.random() < 0.7:
            await engine.complete.wait()  # every region's hydrated bit durable: all are checked
        with trio.move_on_after(rng.uniform(0.01, 0.2)):
            async with trio.open_nursery() as users:
                for writer in range(4):
                    users.start_soon(user, writer)
        nursery.cancel_scope.cancel()
    await crash(engine)

    with Metadata.open(meta_path, writable=False) as meta, open(src, "rb") as s, open(dst, "rb") as d:
        source, dest = s.read(), d.read()
        g = meta.geometry
        for region in range(g.nr_regions):
            lo, hi = g.region_start(region), g.region_end(region)
            if meta.is_hydrated(region) and dest[lo:hi] != source[lo:hi]:
                assert meta.is_written(meta.written_chunks(lo, 1)[0]), \
                    f"seed {seed}: region {region} holds user data but its chunk is not marked written"


async def test_whole_region_writes_skip_the_write_ahead_and_commit_written_bits_first(clone):
    """A write replacing unhydrated regions whole needs no META commit before it: until their
    hydrated bits are committed a crash leaves them unhydrated, and a commit writes their
    written bits (beside DST's fdatasync, which they do not need), then the hydrated bits."""
    engine = await clone.open(hydration=False, copy_on_read=False)
    async with clone.running(engine):
        events = []
        real_commit, real_sync = engine.meta.write_commit, engine.dst.datasync

        def commit(batch):
            kind = "hydrated" if engine.meta.written_durable(0, 8192) else "written"
            events.append(("start", kind))
            real_commit(batch)
            events.append(("end", kind))

        def sync():
            events.append(("start", "dst"))
            real_sync()
            events.append(("end", "dst"))

        engine.meta.write_commit, engine.dst.datasync = commit, sync
        assert engine.write_now(0, b"w" * 8192) is True
        assert events == [] and not engine.meta.written_durable(0, 8192)
        assert isinstance(engine.write_now(3 * 4096 + 1, b"p" * 100), Continue)  # reads the source
        await engine.commit()
        assert sorted(events[:4]) == [("end", "dst"), ("end", "written"),
                                      ("start", "dst"), ("start", "written")]
        assert events[4:] == [("start", "hydrated"), ("end", "hydrated")]
    with Metadata.open(clone.meta, writable=False) as meta:
        assert meta.written_extents == [(0, CHUNK)] and meta.is_hydrated(1)


async def test_a_commit_syncs_dst_while_it_commits_written_bits(clone):
    """The written bits' META commit and DST's fdatasync run at once, both before the hydrated
    bits: a FSYNC after a fresh clone's first writes waited for one, then the other."""
    engine = await clone.open(hydration=False, copy_on_read=False)
    async with clone.running(engine):
        dst_syncing = threading.Event()
        overlapped = []
        real_commit, real_sync = engine.meta.write_commit, engine.dst.datasync

        def commit(batch):
            if not engine.meta.written_durable(0, 8192):  # the written bits' commit
                overlapped.append(dst_syncing.wait(5))
            real_commit(batch)

        def sync():
            dst_syncing.set()
            real_sync()

        engine.meta.write_commit, engine.dst.datasync = commit, sync
        assert engine.write_now(0, b"w" * 8192) is True
        await engine.commit()
        assert overlapped == [True]
        assert engine.meta.written_durable(0, 8192) and engine.meta.hydrated_settled(range(2))


async def test_hydrated_bits_wait_for_a_written_commit_in_flight(clone):
    """A writer's commit of written bits in flight has taken them out of the dirty ones: a
    commit of hydrated bits that covers the same writes still waits for it, or a crash between
    the two could leave a region hydrated in META without its written bit."""
    engine = await clone.open(hydration=False, copy_on_read=False)
    async with clone.running(engine):
        release, first_called, second_called = threading.Event(), threading.Event(), threading.Event()
        calls, finished, second_started_after_first = [], [], []
        real_commit = engine.meta.write_commit

        def commit(batch):
            n = len(calls)
            calls.append(n)
            if n == 0:
                first_called.set()
                assert release.wait(5)
            else:
                second_started_after_first.append(0 in finished)
                second_called.set()
            real_commit(batch)
            finished.append(n)

        engine.meta.write_commit = commit

        async def written_commit():
            async with engine._written_lock:
                await engine._commit_written()

        assert engine.write_now(0, b"w" * 8192) is True  # written and hydrated bits, both dirty
        async with trio.open_nursery() as nursery:
            nursery.start_soon(written_commit)
            assert await trio.to_thread.run_sync(first_called.wait, 5)  # the written bits', held
            nursery.start_soon(engine.commit)
            await trio.testing.wait_all_tasks_blocked()
            # Without the wait, the hydrated bits' commit starts now; with it, this times out.
            await trio.to_thread.run_sync(second_called.wait, 0.5)
            release.set()
        assert second_started_after_first == [True]
        assert engine.meta.written_durable(0, 8192) and engine.meta.hydrated_settled(range(2))
