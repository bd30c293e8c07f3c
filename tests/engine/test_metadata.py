import os
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fuseclone.errors import (DestinationError, MetadataError, MetadataInUseError,
                              RegionSizeError)
from fuseclone.cli import offline_status
from fuseclone.metadata import _HEADER, _SLOT, BITS_PER_BLOCK, BLOCK, Metadata, _slot_offset
from fuseclone.regions import Geometry
from tests.engine.conftest import make_source_file

TiB = 1 << 40


def snapshot(*paths):
    """What is on disk for these paths: (exists, size, bytes-digest)."""
    import hashlib

    out = []
    for p in paths:
        if os.path.exists(p):
            with open(p, "rb") as f:
                out.append((True, os.path.getsize(p), hashlib.sha256(f.read()).hexdigest()))
        else:
            out.append((False,))
    return out


class CountingFile:
    """Counts the bytes os.pwrite sends to one fd."""

    def __init__(self, monkeypatch, fd):
        self.bytes = 0
        real = os.pwrite

        def pwrite(f, data, offset):
            if f == fd:
                self.bytes += len(data)
            return real(f, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)


def test_commit_of_one_region_of_a_1tib_image_writes_a_few_kib(tmp_path, monkeypatch):
    g = Geometry(TiB, 4096)
    meta = Metadata.create(str(tmp_path / "meta"), g, {"source": {}, "destination": {}})
    try:
        counter = CountingFile(monkeypatch, meta._fd)
        meta.set_hydrated(range(123_456_789, 123_456_790))
        batch = meta.prepare_commit()
        meta.write_commit(batch)
        meta.finish_commit(batch)
        assert 0 < counter.bytes <= 64 * 1024
        assert counter.bytes == meta.bytes_written == BLOCK
    finally:
        meta.close()
    with Metadata.open(str(tmp_path / "meta"), writable=False) as again:
        assert again.hydrated_count == 1 and again.is_hydrated(123_456_789)


def test_settled_is_per_bit_and_only_what_a_finished_commit_wrote(tmp_path, monkeypatch):
    """hydrated_settled(r): META holds r's bits for sure. A neighbour's change in the same
    block does not unsettle r; a bit set after a commit's images were taken is not settled by
    that commit; past DURABLE_IMAGES_MAX changed blocks a changed block is not known bit by bit."""
    import fuseclone.metadata as metadata_module

    meta = Metadata.create(str(tmp_path / "meta"), Geometry(TiB, 4096), {"source": {}, "destination": {}})
    try:
        def commit():
            batch = meta.prepare_commit()
            meta.write_commit(batch)
            return batch

        meta.set_hydrated(range(10, 11))
        assert not meta.hydrated_settled(range(10, 11))
        meta.finish_commit(commit())
        meta.set_hydrated(range(20, 30))  # same block
        assert meta.hydrated_settled(range(10, 11)) and not meta.hydrated_settled(range(20, 21))
        assert meta.hydrated_settled(range(40, 50))  # unhydrated in core and in META
        batch = commit()
        meta.set_hydrated(range(30, 31))  # after the images were taken
        meta.finish_commit(batch)
        assert meta.hydrated_settled(range(5, 30)) and not meta.hydrated_settled(range(29, 31))
        meta.finish_commit(commit())
        assert meta.hydrated_settled(range(0, BITS_PER_BLOCK * 3))
        monkeypatch.setattr(metadata_module, "DURABLE_IMAGES_MAX", 1)
        meta.set_hydrated(range(BITS_PER_BLOCK * 5, BITS_PER_BLOCK * 5 + 1))
        meta.set_hydrated(range(BITS_PER_BLOCK * 7, BITS_PER_BLOCK * 7 + 1))  # one too many
        assert meta.hydrated_settled(range(BITS_PER_BLOCK * 5 + 1, BITS_PER_BLOCK * 5 + 2))
        assert not meta.hydrated_settled(range(BITS_PER_BLOCK * 7 + 1, BITS_PER_BLOCK * 7 + 2))
        meta.finish_commit(commit())
        assert meta.hydrated_settled(range(BITS_PER_BLOCK * 7, BITS_PER_BLOCK * 7 + 1))
    finally:
        meta.close()


def test_second_opener_is_refused(tmp_path):
    path = str(tmp_path / "meta")
    with Metadata.create(path, Geometry(1 << 20, 4096), {}):
        with pytest.raises(MetadataInUseError, match="in use by another fuseclone process"):
            Metadata.open(path)
        with pytest.raises(MetadataInUseError):
            Metadata.open(path, writable=False)


def test_torn_slot_falls_back_to_the_other_copy(tmp_path):
    path = str(tmp_path / "meta")
    with Metadata.create(path, Geometry(1 << 30, 4096), {}) as meta:
        meta.set_hydrated(range(0, 10))
        b = meta.prepare_commit(); meta.write_commit(b); meta.finish_commit(b)
        meta.set_hydrated(range(10, 20))
        meta.set_hydrated(range(30_000, 30_001))  # a bit in the half that never lands
        b = meta.prepare_commit()
        block, slot, image = b.writes[0].block, b.writes[0].slot, b.writes[0].image
        # a torn write: only the first half of the new slot image reaches the disk
        os.pwrite(meta._fd, image[: BLOCK // 2], _slot_offset(block, slot))
    with Metadata.open(path) as meta:
        assert meta.hydrated_count == 10  # lost only the interrupted commit's bits
        meta.set_hydrated(range(10, 30))
        b = meta.prepare_commit(); meta.write_commit(b); meta.finish_commit(b)
    with Metadata.open(path) as meta:
        assert meta.hydrated_count == 30


def test_many_commits_alternate_slots_and_keep_every_bit(tmp_path):
    path = str(tmp_path / "meta")
    g = Geometry(3 * BITS_PER_BLOCK * 4096 + 4096, 4096)  # 4 bitmap blocks, last one nearly empty
    with Metadata.create(path, g, {}) as meta:
        for i in range(0, g.nr_regions, 7919):
            meta.set_hydrated(range(i, i + 1))
            b = meta.prepare_commit(); meta.write_commit(b); meta.finish_commit(b)
        expected = meta.hydrated_count
    with Metadata.open(path) as meta:
        assert meta.hydrated_count == expected
        assert meta.is_hydrated(g.nr_regions - 1 - (g.nr_regions - 1) % 7919)


def test_corrupt_header_is_refused(tmp_path):
    path = str(tmp_path / "meta")
    Metadata.create(path, Geometry(1 << 20, 4096), {}).close()
    with open(path, "r+b") as f:
        for slot in (0, 1):
            f.seek(slot * BLOCK + 40)
            f.write(b"garbage")
    before = snapshot(path)
    with pytest.raises(MetadataError, match="corrupt|not a fuseclone metadata file"):
        Metadata.open(path)
    assert snapshot(path) == before


def test_corrupt_bitmap_in_both_copies_is_refused(tmp_path):
    path = str(tmp_path / "meta")
    with Metadata.create(path, Geometry(1 << 20, 4096), {}) as meta:
        meta.set_hydrated(range(0, 3))
        b = meta.prepare_commit(); meta.write_commit(b); meta.finish_commit(b)
    with open(path, "r+b") as f:
        for slot in (0, 1):
            f.seek(_slot_offset(0, slot) + 100)
            f.write(b"\xff" * 8)
    with pytest.raises(MetadataError, match="bitmap block 0"):
        Metadata.open(path)


def test_not_a_metadata_file_is_refused(tmp_path):
    path = tmp_path / "meta"
    path.write_bytes(b"hello" * 5000)
    with pytest.raises(MetadataError, match="not a fuseclone metadata file"):
        Metadata.open(str(path))


# ---- bad input through open_clone: clear error, nothing changed on disk -------------------


async def test_destination_smaller_than_source(clone):
    with open(clone.dst, "wb") as f:
        f.truncate(1 << 20)
    before = snapshot(clone.dst, clone.meta)
    with pytest.raises(DestinationError, match="smaller than the source"):
        await clone.open()
    assert snapshot(clone.dst, clone.meta) == before


@pytest.mark.parametrize("size", [1000, 4096 * 3, 2 << 30, 2048])
async def test_bad_region_size(clone, size):
    with pytest.raises(RegionSizeError, match="power of two"):
        await clone.open(region_size=size)
    assert snapshot(clone.dst, clone.meta) == [(False,), (False,)]


async def test_metadata_of_another_clone(clone, tmp_path):
    engine = await clone.open()
    async with clone.running(engine):
        pass
    other = str(make_source_file(tmp_path / "other.img", os.path.getsize(clone.src), seed=9))
    before = snapshot(clone.dst, clone.meta)
    clone.src = other
    with pytest.raises(MetadataError, match="belongs to another clone: its source was"):
        await clone.open()
    assert snapshot(clone.dst, clone.meta) == before


async def test_metadata_of_another_destination(clone, tmp_path):
    engine = await clone.open()
    async with clone.running(engine):
        pass
    os.rename(clone.dst, clone.dst + ".old")
    with open(clone.dst, "wb") as f:
        f.truncate(os.path.getsize(clone.src))
    before = snapshot(clone.dst, clone.meta)
    with pytest.raises(MetadataError, match="its destination was"):
        await clone.open()
    assert snapshot(clone.dst, clone.meta) == before


async def test_metadata_in_use(clone):
    engine = await clone.open()
    async with clone.running(engine):
        before = snapshot(clone.meta)
        with pytest.raises(MetadataInUseError):
            await clone.open()
        assert snapshot(clone.meta) == before


async def test_corrupt_metadata_through_open_clone(clone):
    with open(clone.meta, "wb") as f:
        f.write(os.urandom(3 * 4096))
    before = snapshot(clone.dst, clone.meta)
    with pytest.raises(MetadataError):
        await clone.open()
    assert snapshot(clone.dst, clone.meta) == before


async def test_missing_source():
    from fuseclone.errors import SourceError
    from fuseclone.sources.local import LocalSource

    with pytest.raises(SourceError, match="does not exist"):
        await LocalSource.open("/nonexistent/source.img")


@pytest.mark.parametrize("identity", [
    b"[1, 2]", b'"x"', b'{"source": [1], "destination": 3}',  # not objects where they must be
    b'{"source": {"path": "\xff"}}',  # not UTF-8
    b"[" * 3000,  # nested deeper than the JSON parser recurses
    b'{"source": ',  # cut short
])
def test_a_header_whose_identity_is_no_object_is_refused_in_one_line(tmp_path, identity):
    """A header slot with a good CRC and an identity this release did not write (another
    writer's, or crafted) is refused as corrupt, never a traceback (`status` read
    identity.get(...) of a list)."""
    path = str(tmp_path / "meta")
    Metadata.create(path, Geometry(1 << 20, 4096), {"source": {"path": "/x"}}).close()
    with open(path, "r+b") as f:
        for slot in (0, 1):
            f.seek(slot * BLOCK)
            fields = list(_HEADER.unpack_from(f.read(BLOCK)))
            fields[11] = len(identity)
            body = (_HEADER.pack(*fields) + identity).ljust(BLOCK - 4, b"\0")
            f.seek(slot * BLOCK)
            f.write(body + struct.pack("<I", zlib.crc32(body)))
    for read in (lambda: Metadata.open(path, writable=False).close(), lambda: offline_status(path)):
        with pytest.raises(MetadataError, match=r"meta: corrupt header \(its identity") as raised:
            read()
        assert "\n" not in str(raised.value)


def _refold_slot(image: bytes) -> bytes:
    """A bitmap slot image with its CRC made good again (a writer that set padding bits)."""
    magic, index, cid, seq, _, _ = _SLOT.unpack_from(image)
    payload = image[_SLOT.size:]
    crc = zlib.crc32(payload, zlib.crc32(_SLOT.pack(magic, index, cid, seq, 0, 0)))
    return _SLOT.pack(magic, index, cid, seq, crc, 0) + payload


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(region_shift=st.sampled_from([12, 13, 15, 16, 20]),
       regions=st.sampled_from([1, 7, 63, 65, 1000, BITS_PER_BLOCK - 1, BITS_PER_BLOCK + 1]),
       tail=st.sampled_from([0, 1, 511, 4095]), commits=st.lists(
           st.lists(st.tuples(st.integers(0, 2**32), st.integers(1, 40)), min_size=1, max_size=4),
           max_size=4),
       mangle=st.sampled_from(["flip", "truncate", "torn", "zero", "padding"]),
       where=st.integers(0, 2**40), bits=st.binary(min_size=1, max_size=8))
def test_a_mangled_meta_is_refused_in_one_line_or_holds_only_committed_bits(
        tmp_path, region_shift, regions, tail, commits, mangle, where, bits):
    """Odd geometries (region counts not a multiple of 8 or 64, partial last regions, bitmap
    block boundaries), then META's bytes mangled: a bit flipped, cut at a length, a block torn
    or zeroed, padding bits past the last region set under a good CRC. Every one is refused as
    a MetadataError of one line, or opens with no region hydrated that no commit made so."""
    region = 1 << region_shift
    geometry = Geometry(max(1, (regions - 1) * region + (tail or region)), region)
    path = str(tmp_path / f"meta-{os.getpid()}")
    if os.path.exists(path):
        os.unlink(path)
    committed: set[int] = set()
    with Metadata.create(path, geometry, {"source": {"path": "/s"}}) as meta:
        meta.mark_open()
        for runs in commits:
            for start, length in runs:
                first = start % geometry.nr_regions
                span = range(first, min(geometry.nr_regions, first + length))
                meta.set_hydrated(span)
                committed.update(span)
            batch = meta.prepare_commit()
            if batch is not None:  # None: nothing new to commit
                meta.write_commit(batch)
                meta.finish_commit(batch)
        meta.mark_clean()
    data = bytearray(open(path, "rb").read())
    block = where % (len(data) // BLOCK)
    if mangle == "flip":
        data[where % len(data)] ^= bits[0] or 1
    elif mangle == "truncate":
        del data[where % len(data):]
    elif mangle == "torn":  # the start of a block written, the rest not (or garbage)
        cut = block * BLOCK + (where >> 20) % BLOCK
        data[cut:(block + 1) * BLOCK] = (bits * BLOCK)[: (block + 1) * BLOCK - cut]
    elif mangle == "zero":
        data[block * BLOCK:(block + 1) * BLOCK] = bytes(BLOCK)
    else:  # padding: a bit of the last hydrated bitmap block past the last region
        last = (geometry.nr_regions - 1) // BITS_PER_BLOCK
        used = geometry.nr_regions - last * BITS_PER_BLOCK
        at = _slot_offset(last, (where >> 20) & 1)
        image = bytearray(data[at:at + BLOCK])
        if used < BITS_PER_BLOCK and any(image):  # a slot that was written
            bit = used + where % (BITS_PER_BLOCK - used)
            image[_SLOT.size + bit // 8] |= 1 << (bit % 8)  # little-endian bit order
            data[at:at + BLOCK] = _refold_slot(bytes(image))
    with open(path, "wb") as f:
        f.write(data)
    try:
        with Metadata.open(path, writable=False) as meta:
            assert meta.nr_regions == geometry.nr_regions
            hydrated = {r for hydrated, run in meta.runs(range(meta.nr_regions)) if hydrated
                        for r in run}
            hydrated_bytes = meta.hydrated_bytes()
    except MetadataError as exc:
        assert "\n" not in str(exc)
        return
    assert hydrated <= committed, f"regions {sorted(hydrated - committed)[:5]} never committed"
    assert hydrated_bytes <= geometry.image_size


def test_a_torn_header_write_falls_back_to_the_newest_header_before_it(tmp_path, monkeypatch):
    """Header writes alternate strictly between the two slots: a bitmap commit between two of
    them (commits share the seq counter) must not send the second to the first one's slot,
    where tearing it left a header two writes old: here the last mount's clean one, so a
    mount killed while closing read as cleanly closed."""
    path = str(tmp_path / "meta")
    with Metadata.create(path, Geometry(1 << 20, 4096), {}) as meta:
        meta.mark_clean()
    with Metadata.open(path) as meta:
        meta.mark_open()
        meta.set_hydrated(range(0, 1))
        b = meta.prepare_commit(); meta.write_commit(b); meta.finish_commit(b)
        real = os.pwrite

        def torn(fd, data, offset):  # power lost half-way through a header write
            if fd == meta._fd and offset < 2 * BLOCK:
                real(fd, data[: BLOCK // 2], offset)
                raise OSError(5, "power lost")
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", torn)
        with pytest.raises(OSError):
            meta.mark_clean()
        monkeypatch.setattr(os, "pwrite", real)
    header = Metadata.read_header(path)
    assert not header.clean  # mark_open's header, not the one before it
    with Metadata.open(path) as meta:
        assert meta.hydrated_count == 1


def test_header_writes_beside_the_looks_for_an_overwritten_meta_are_never_taken_for_one(
        tmp_path):
    """check_named (before each commit, every idle second) compares the header slots with what
    this writer last wrote there; a header write in another thread (a message's settings) is
    changing one of them meanwhile, which must not look like META written over in place."""
    import threading

    path = str(tmp_path / "meta")
    with Metadata.create(path, Geometry(64 << 20, 4096), {}) as meta:
        done = threading.Event()

        def look() -> None:
            while not done.is_set():
                meta.check_named()

        looker = threading.Thread(target=look)
        looker.start()
        try:
            for threshold in range(1, 301):
                meta.set_settings(hydration_threshold=threshold)
                meta.write_settings()
        finally:
            done.set()
            looker.join()
        assert meta.failure is None
        meta.check_named()  # both slots as last written
        with open(path, "r+b") as f:
            f.write(bytes(2 * BLOCK))
        with pytest.raises(OSError):
            meta.check_named()
        assert "overwritten" in meta.failure
