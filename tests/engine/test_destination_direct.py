"""Direct writes of hydration copies: only aligned, writable memory at aligned offsets."""

import mmap
import os

import pytest

from fuseclone.destination import Destination
from tests.page_cache import cached_pages


def test_direct_writes_need_alignment_everywhere(tmp_path):
    path = str(tmp_path / "dst.img")
    dst = Destination.open(path, 1 << 20, create=True)
    try:
        aligned = mmap.mmap(-1, 64 * 1024)
        aligned.write(os.urandom(len(aligned)))
        assert dst.can_write_direct(8192, aligned)
        assert dst.can_write_direct(0, memoryview(aligned)[4096:8192])
        assert not dst.can_write_direct(100, aligned)  # offset
        assert not dst.can_write_direct(0, memoryview(aligned)[:1000])  # length
        assert not dst.can_write_direct(0, memoryview(aligned)[512:4608])  # address
        assert not dst.can_write_direct(0, bytes(aligned))  # read-only: address unknown
        dst.write_direct(8192, aligned)
        dst.datasync()
        assert dst.direct_bytes == len(aligned)
        with open(path, "rb") as f:
            f.seek(8192)
            assert f.read(len(aligned)) == aligned[:]
    finally:
        dst.close()
    readonly = Destination.open(path, 1 << 20, create=False, readonly=True)
    try:
        assert not readonly.can_write_direct(0, mmap.mmap(-1, 4096))  # no direct descriptor
    finally:
        readonly.close()



def test_destination_reads_do_not_read_ahead(tmp_path):
    """DST is read in scattered pieces (cache misses, copy-on-read): readahead would fill its
    page cache with large folios, and every 4 KiB write into one then walks all its buffer
    heads (ext4; 4 KiB direct-I/O writes to a hydrated image fell from 48k to 12k IOPS)."""
    path = str(tmp_path / "dst.img")
    with open(path, "wb") as f:
        f.write(os.urandom(8 << 20))
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if cached_pages(path) != 0:
        pytest.skip("this filesystem keeps a file's pages after POSIX_FADV_DONTNEED (tmpfs?)")
    dst = Destination.open(path, 8 << 20, create=False)
    try:
        for offset in (0, 64 << 10, 1 << 20):  # sequential enough to start readahead
            dst.read(offset, 64 << 10)
    finally:
        dst.close()
    assert cached_pages(path) <= 3 * 16  # the pages read, no more
