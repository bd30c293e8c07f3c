"""What one client of a live image sees of another's writes: after a write is acknowledged, every
open of the image reads it, whatever mode each one opened in (the kernel's page cache, direct
I/O, a loop device over the image)."""

import mmap
import os
import threading

import pytest

from tests.integration.conftest import MiB, sh

PAGE = 4096
WRITES = 30
HAMMER_TIMEOUT = 10.0  # seconds a reader may take to read a page it was given


class PageReader:
    """A buffered reader of the image, reading one page over and over in a thread of its own
    (a backup or a checksum tool reading the image while a loop device over it is written):
    `watch(offset)` returns once it has read that page, so the page is cached."""

    def __init__(self, image: str) -> None:
        self.fd = os.open(image, os.O_RDONLY)
        self.offset = 0
        self.reading = threading.Event()
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            offset = self.offset
            os.pread(self.fd, PAGE, offset)
            if offset == self.offset:
                self.reading.set()

    def watch(self, offset: int) -> None:
        self.reading.clear()
        self.offset = offset
        assert self.reading.wait(HAMMER_TIMEOUT), "the reader is stuck"

    def close(self) -> None:
        self.stop = True
        self.thread.join()
        os.close(self.fd)


@pytest.mark.parametrize("direct_io", ["at setup", "switched on"])
def test_a_direct_loop_devices_writes_show_to_buffered_readers_of_the_image(rig, random_source,
                                                                             direct_io):
    """A loop device with direct I/O writes the image asynchronously (an FOPEN_DIRECT_IO open,
    or O_DIRECT set on its buffered one by `losetup --direct-io=on LOOPDEV`). The kernel drops
    the range's cached pages before it sends such a WRITE, not after: a buffered reader's
    READ answered between the two cached the data the write replaced, and with the image's
    page cache kept (FOPEN_KEEP_CACHE) every later buffered read returned it (50 of 60
    writes in a row, and it stayed)."""
    rig.mount()
    if direct_io == "at setup":
        loop = rig.losetup(None, "--direct-io=on")
    else:
        loop = rig.losetup()
        sh("losetup", "--direct-io=on", loop)
    assert open(f"/sys/block/{os.path.basename(loop)}/loop/dio").read().strip() == "1"
    reader = PageReader(rig.image)
    device = os.open(loop, os.O_RDWR | os.O_DIRECT)  # past the loop device's own page cache
    check = os.open(rig.image, os.O_RDONLY)
    buffer = mmap.mmap(-1, PAGE)
    stale = []
    try:
        for i in range(WRITES):
            offset = i * MiB + MiB // 2
            reader.watch(offset)
            data = os.urandom(PAGE)
            buffer[:] = data
            assert os.pwritev(device, [buffer], offset) == PAGE
            if os.pread(check, PAGE, offset) != data:
                stale.append(offset)
    finally:
        reader.close()
        os.close(check)
        os.close(device)
    assert not stale, f"{len(stale)} of {WRITES} acknowledged writes read back stale"
