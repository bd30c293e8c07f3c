"""A cold sample after writes must start with those writes done: the benchmark's settle_writes
(what drop_caches does first) waits for the writes that a buffered loop device left in the
image's page cache, which sync(2) alone does not wait for on a FUSE mount."""

import contextlib
import mmap
import os
import random

from benchmarks import system
from fuseclone import control
from tests.engine.conftest import make_source_file

MiB = 1 << 20
PAGE = 4096


def write_every_other_page(device: str, size: int) -> int:
    """4 KiB direct writes to every other page of `device`, in random order (each its own
    WRITE when the image's cache is written back); returns the bytes written."""
    offsets = list(range(0, size, 2 * PAGE))
    random.Random(5).shuffle(offsets)
    buf = mmap.mmap(-1, PAGE)
    buf.write(os.urandom(PAGE))
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        for offset in offsets:
            assert os.pwrite(fd, buf, offset) == PAGE
    finally:
        os.close(fd)
    return len(offsets) * PAGE


def written_through(mnt: str) -> int:
    """The bytes the daemon has accepted from WRITEs, asked in-process (a `fuseclone status`
    run would take longer to start than the writeback left to do)."""
    return control.request(control.resolve_target(mnt), {"op": "status"})["status"]["user_write_bytes"]


def test_settle_writes_waits_for_the_images_cached_writes(rig):
    size = 32 * MiB
    make_source_file(rig.src, size, hole_every=0, zero_every=0)
    # The write cache is on by default. Each page written back is a partial write of an
    # unhydrated region, hydrated first: that writeback takes seconds, sync(2) less than one.
    rig.mount("--no-hydration", "--region-size", "64K")
    with contextlib.ExitStack() as loops:
        loop = system.losetup(loops, rig.image, direct_io=False)
        assert not loop.dio
        written = write_every_other_page(loop.device, size)
        system.settle_writes()
        # Every page written reached the daemon before settle_writes returned (sync(2) alone
        # returned in 20-70 ms with most of them still in the image's page cache).
        assert written_through(rig.mnt) >= written
