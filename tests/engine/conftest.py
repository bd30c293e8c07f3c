import contextlib
import os
import random

import pytest
import trio

from fuseclone.clone import open_clone, running
from fuseclone.engine import Settings
from fuseclone.sources.base import Source
from fuseclone.sources.local import LocalSource

KiB = 1024
MiB = 1024 * KiB


def make_source_file(path, size, *, seed=1, zero_every=5, hole_every=7, chunk=64 * KiB):
    """A source with random data, some all-zero chunks and some real holes."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for i, off in enumerate(range(0, size, chunk)):
            n = min(chunk, size - off)
            if hole_every and i % hole_every == hole_every - 1:
                continue  # left as a hole
            data = bytes(n) if zero_every and i % zero_every == zero_every - 1 else rng.randbytes(n)
            f.seek(off)
            f.write(data)
    return path


@pytest.fixture
def source_file(tmp_path):
    return str(make_source_file(tmp_path / "src.img", 4 * MiB + 5 * KiB))


class Clone:
    """Paths of one clone and a way to open its engine."""

    def __init__(self, tmp_path, src):
        self.src = src
        self.dst = str(tmp_path / "dst.img")
        self.meta = str(tmp_path / "meta")

    async def open(self, **settings):
        region_size = settings.pop("region_size", None)
        source = await LocalSource.open(self.src)
        return open_clone(source, self.dst, self.meta, region_size=region_size,
                          settings=Settings(**settings))

    def running(self, engine, **kwargs):
        return running(engine, **kwargs)

    def source_bytes(self, offset=0, length=None):
        with open(self.src, "rb") as f:
            f.seek(offset)
            return f.read(length if length is not None else os.path.getsize(self.src))


@pytest.fixture
def clone(tmp_path, source_file):
    return Clone(tmp_path, source_file)


async def assert_settle_waiter_woken_by(engine, trigger, monkeypatch) -> None:
    """Start `engine.wait_until_settled()`, then await `trigger()`: the waiter must wake within
    10 s, woken by the event itself (where waiters used to poll, they would now wait an hour)."""
    import fuseclone.engine as engine_module

    monkeypatch.setattr(engine_module, "STOPPED_POLL_INTERVAL", 3600, raising=False)
    woke = trio.Event()

    async def waiter():
        await engine.wait_until_settled()
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(0.05)  # the waiter is waiting before the trigger
        await trigger()
        with trio.fail_after(10):
            await woke.wait()


@contextlib.asynccontextmanager
async def user_reading_hydrated(engine, clone):
    """For the block: a user reading 4 KiB of hydrated data (copy-on-read hydrates it first)
    every 2 ms."""
    assert await engine.read(0, 4096) == clone.source_bytes(0, 4096)

    async def read_hydrated():
        while True:
            await engine.read(0, 4096)
            await trio.sleep(0.002)

    async with trio.open_nursery() as users:
        users.start_soon(read_hydrated)
        yield
        users.cancel_scope.cancel()


class WrappedSource(Source):
    """A source that passes everything to `inner`: tests override `read` to hold or fail it."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.description, self._size = inner.description, inner.size

    @property
    def size(self):
        return self._size

    def own_identity(self):
        return self.inner.identity()

    async def read(self, offset, length):
        return await self.inner.read(offset, length)

    async def extents(self, offset, length):
        return await self.inner.extents(offset, length)

    async def aclose(self):
        await self.inner.aclose()
