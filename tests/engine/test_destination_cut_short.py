"""A DST file truncated under a live clone is refused before a write could extend it again (its
hole would read as zeros where hydrated data was), without an fstat before every write and
flush: that halved a database's synced writes on the image (docs/benchmark/cut-short-cost.md)."""

import errno
import mmap
import os

import pytest

from fuseclone import destination
from fuseclone.destination import Destination

IMAGE = 1 << 20
SIZE_LOOK_LASTS = getattr(destination, "SIZE_LOOK_LASTS", 0.01)  # (absent before it was kept)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def dst(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(destination, "time", clock, raising=False)
    opened = Destination.open(str(tmp_path / "dst.img"), IMAGE, create=True)
    opened.clock = clock
    opened.looks = 0
    fstat = os.fstat

    def counting_fstat(fd):
        if fd == opened.fd:
            opened.looks += 1
        return fstat(fd)

    monkeypatch.setattr(destination.os, "fstat", counting_fstat)
    yield opened
    opened.close()


def _block(byte: bytes) -> mmap.mmap:
    block = mmap.mmap(-1, 4096)
    block.write(byte * 4096)
    return block


def test_writes_and_flushes_within_a_window_look_at_dsts_size_once(dst):
    block = _block(b"a")
    for i in range(50):
        dst.write(i * 4096, block)
        dst.write_through((50 + i) * 4096, block)
        dst.write_direct((100 + i) * 4096, block)
        dst.datasync()
    assert dst.looks == 1
    dst.clock.now += 2 * SIZE_LOOK_LASTS
    dst.write(0, block)
    assert dst.looks == 2


def test_a_write_reaching_the_images_end_always_looks_first(dst):
    cut = []
    dst.on_cut_short = cut.append
    block = _block(b"b")
    dst.write(0, block)  # a look: DST whole
    os.truncate(dst.path, IMAGE // 2)
    with pytest.raises(OSError) as refused:
        dst.write_through(IMAGE - 4096, block)
    assert refused.value.errno == errno.EIO
    assert os.path.getsize(dst.path) == IMAGE // 2  # not extended again
    assert cut and "truncated" in cut[0]


def test_a_truncation_is_refused_once_the_window_has_passed(dst):
    block = _block(b"c")
    dst.write(0, block)
    os.truncate(dst.path, IMAGE // 2)
    dst.clock.now += 2 * SIZE_LOOK_LASTS
    with pytest.raises(OSError) as refused:
        dst.write(IMAGE * 3 // 4, block)
    assert refused.value.errno == errno.EIO
    with pytest.raises(OSError):
        dst.datasync()
    assert os.path.getsize(dst.path) == IMAGE // 2
