"""The daemon's memory after a burst of concurrent I/O (docs/benchmark/memory.md)."""

import mmap
import os
import threading
import time

from tests.integration.conftest import MiB, daemon_pid

READERS = 24
READS_EACH = 40


def anonymous_mib(pid: int) -> float:
    """The process's anonymous memory in RAM (its malloc heap, thread stacks, buffers)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no Anonymous line in smaps_rollup")


def read_burst(image: str, size: int) -> None:
    """READERS threads, each READS_EACH direct 1 MiB reads at offsets spread over the image:
    every one reaches the daemon, which answers it from the source."""
    def reader(seed: int) -> None:
        fd = os.open(image, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, MiB)
        try:
            for i in range(READS_EACH):
                offset = (seed * 7 + i * 13) % (size // MiB) * MiB
                assert os.preadv(fd, [buf], offset) == MiB
        finally:
            buf.close()
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(READERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_a_burst_of_readers_leaves_no_heap_behind(rig, random_source):
    """After 24 concurrent readers the daemon held 40-50 MiB of freed buffers in a dozen
    per-thread malloc arenas for as long as it ran (this burst: 12-18 MiB more anonymous
    memory than before it); now it gives them back once idle (1-3 MiB more)."""
    rig.mount("--no-hydration", "--no-copy-on-read")
    pid = daemon_pid(rig.mnt)
    before = anonymous_mib(pid)
    read_burst(rig.image, os.path.getsize(random_source))
    deadline = time.monotonic() + 10  # the daemon gives memory back at its first idle second
    while (after := anonymous_mib(pid)) > before + 6:
        assert time.monotonic() < deadline, f"anonymous memory {before:.1f} -> {after:.1f} MiB"
        time.sleep(0.2)
