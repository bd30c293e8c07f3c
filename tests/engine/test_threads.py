"""Worker threads the system refuses for a while (`ulimit -v`, `ulimit -u`, a cgroup's
pids.max): under `ulimit -v 200000` a mount said its image was ready and died on its first
hydration copy ("can't start new thread"). The engine waits for a thread instead; one refused
for good is an errno (EAGAIN) its callers report, never the daemon's end."""

import errno
import os

import pytest
import trio
import trio._threads

from fuseclone import threads
from tests.engine.conftest import MiB


def refuse_threads(monkeypatch, refusals):
    """The next REFUSALS thread starts fail as pthread_create's EAGAIN makes them fail."""
    start = trio._threads.start_thread_soon
    left = [refusals]

    def start_or_refuse(*args, **kwargs):
        if left[0] > 0:
            left[0] -= 1
            raise RuntimeError("can't start new thread")
        return start(*args, **kwargs)

    monkeypatch.setattr(trio._threads, "start_thread_soon", start_or_refuse)
    return left


async def test_hydration_and_user_io_wait_for_refused_threads(clone, monkeypatch):
    engine = await clone.open(hydration_batch_size=64)
    async with clone.running(engine):
        left = refuse_threads(monkeypatch, 40)
        data = os.urandom(4096)
        await engine.write(MiB + 4096, data)  # a write in the middle of an unhydrated region
        assert await engine.read(MiB + 4096, 4096) == data
        await engine.flush()
        with trio.fail_after(30):
            await engine.complete.wait()
        assert left[0] == 0  # they were refused
        status = engine.status()
        assert status.hydrated_regions == status.total_regions
        assert status.hydration_errors == 0 and status.metadata_mode == "rw"
    size = os.path.getsize(clone.src)
    want = bytearray(clone.source_bytes())
    want[MiB + 4096:MiB + 8192] = data
    with open(clone.dst, "rb") as f:
        assert f.read(size) == want


async def test_a_thread_refused_for_good_is_eagain(monkeypatch):
    monkeypatch.setattr(threads, "THREAD_START_PATIENCE", 0.2)
    refuse_threads(monkeypatch, 10**9)
    with pytest.raises(OSError) as info:
        await threads.in_thread(os.getpid)
    assert info.value.errno == errno.EAGAIN
    assert str(info.value) == ("[Errno 11] cannot start a thread (ulimit -u or -v, or the "
                               "cgroup's pids.max)")


async def test_a_worker_out_of_memory_is_a_failed_copy(clone, monkeypatch):
    """Under `ulimit -v 250000` a copy's buffer (a batch of up to 8 MiB, read in a worker)
    raised MemoryError, which ended the daemon; now it is ENOMEM: hydration backs off."""
    from fuseclone.sources.local import LocalSource

    read = LocalSource._read_unchanged
    left = [3]

    def out_of_memory_at_first(self, length, offset):
        if left[0] > 0:
            left[0] -= 1
            raise MemoryError
        return read(self, length, offset)

    monkeypatch.setattr(LocalSource, "_read_unchanged", out_of_memory_at_first)
    engine = await clone.open(hydration_batch_size=64)
    async with clone.running(engine):
        with trio.fail_after(30):
            await engine.complete.wait()
        assert engine.status().hydration_errors == 3
    with open(clone.dst, "rb") as f:
        assert f.read(os.path.getsize(clone.src)) == clone.source_bytes()
