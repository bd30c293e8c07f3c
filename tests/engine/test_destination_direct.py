"""Direct writes of hydration copies: only aligned, writable memory at aligned offsets."""

import mmap
import os

from fuseclone.destination import Destination


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
