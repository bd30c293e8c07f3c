"""Cold reads of a complete clone: answered from reads of DST on the daemon's io_uring, with the
right bytes, one page-cache copy, and nothing left behind when the mount goes away while they
are in flight."""

import mmap
import os
import random
import threading
import time

from tests.integration.conftest import MiB, daemon_pid, fuseclone, sh, status_json
from tests.integration.test_fuse_ops import drop_caches

BLOCK = 4096


def direct_read(fd: int, offset: int, length: int) -> bytes:
    buffer = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT wants
    with memoryview(buffer) as view:
        got = os.preadv(fd, [view], offset)
        return bytes(view[:got])


def cached_bytes(path: str) -> int:
    """Bytes of `path` in the page cache (util-linux's fincore: mincore, which reads none)."""
    return int(sh("fincore", "--bytes", "--noheadings", "--output", "RES", path).stdout)


def test_cold_reads_of_a_complete_clone_come_from_the_ring(rig, random_source):
    rig.mount()
    fuseclone("wait", rig.mnt, "--timeout", "60")
    source = open(rig.src, "rb").read()
    drop_caches()
    fd = os.open(rig.image, os.O_RDONLY | os.O_DIRECT)
    try:
        for offset in random.Random(3).sample(range(0, len(source), BLOCK), 200):
            assert direct_read(fd, offset, BLOCK) == source[offset:offset + BLOCK]
    finally:
        os.close(fd)
    assert status_json(rig.mnt)["reads_on_ring"] > 0  # the others found DST's cache warm
    # Buffered: the image's page cache keeps what is read, DST's drops it (one copy).
    drop_caches()
    with open(rig.image, "rb") as f:
        assert f.read(8 * MiB) == source[:8 * MiB]
    assert cached_bytes(rig.dst) < MiB


def test_unmount_with_reads_in_flight_leaves_nothing(rig, random_source):
    rig.mount()
    fuseclone("wait", rig.mnt, "--timeout", "60")
    pid = daemon_pid(rig.mnt)
    log_file = status_json(rig.mnt)["log_file"]
    source = open(rig.src, "rb").read()
    drop_caches()
    stop = threading.Event()
    wrong = []

    def reader(seed):
        rng = random.Random(seed)
        fd = os.open(rig.image, os.O_RDONLY | os.O_DIRECT)
        try:
            while not stop.is_set():
                offset = rng.randrange(0, len(source), BLOCK)
                try:
                    got = direct_read(fd, offset, BLOCK)
                except OSError:
                    return  # the mount went away
                if got != source[offset:offset + BLOCK]:
                    wrong.append(offset)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass

    readers = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
    for thread in readers:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while status_json(rig.mnt)["reads_on_ring"] < 500:
            assert time.monotonic() < deadline, "no reads went through the ring"
        fuseclone("unmount", rig.mnt, "--lazy")
        rig.wait_unmounted()
    finally:
        stop.set()
        for thread in readers:
            thread.join(10)
    assert not wrong
    for _ in range(100):
        if not os.path.exists(f"/proc/{pid}"):
            break
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}"), "the daemon is still running"
    assert "Traceback" not in open(log_file).read()
