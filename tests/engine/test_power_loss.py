"""Power loss, simulated: destination writes stay in a volatile cache until fdatasync, and a
crash throws the cache away. After the crash, every region the metadata calls hydrated must hold
durable data (invariant 1): flushed writes intact (invariant 3), untouched regions equal to the
source, and every block that reads changed, or was flushed, marked written (what `diff` lists;
`check --verify` compares no written block). SIGKILL cannot test this (the page cache survives a
killed process).

Besides the main path (buffered writes, discards, flushes that commit), the workload takes the
ones a database's takes: direct writes, written through to the disk (which keeps them in its
volatile cache too) while the image is flushed often, and flushes that are one fdatasync of DST
(`flush_now`) running beside a commit's; zeroing, discards with passdown off, a prefetch in
flight, and several power cuts in a row."""

import random
import threading

import pytest
import trio

from fuseclone.clone import open_clone, running
from fuseclone.destination import Destination
from fuseclone.engine import Settings
from fuseclone.sources.local import LocalSource
from tests.engine.conftest import make_source_file

BLOCK = 4096
IMAGE = 1 << 20


class VolatileDestination(Destination):
    """Writes, punches and zeroings are cached in memory until datasync()."""

    def __init__(self, inner: Destination) -> None:
        super().__init__(inner.path, inner.fd, inner.image_size)
        self._direct_fd = inner._direct_fd  # so that direct writes are written through
        self._sync = inner._sync  # its fdatasync
        self.cache: list[tuple[int, bytes]] = []
        self.lock = threading.Lock()  # datasync runs in a worker thread, writes maybe inline

    def read(self, offset, length):
        with self.lock:  # else a datasync between the two could move the cache under the read
            data = bytearray(super().read(offset, length))
            cache = list(self.cache)
        for off, payload in cache:
            lo, hi = max(off, offset), min(off + len(payload), offset + length)
            if lo < hi:
                data[lo - offset : hi - offset] = payload[lo - off : hi - off]
        return bytes(data)

    def read_cached(self, offset, length):
        return None  # always take read(), which sees the cache

    def write(self, offset, data):
        with self.lock:
            self.cache.append((offset, bytes(data)))

    write_direct = write_through = write

    def punch_hole(self, offset, length):
        with self.lock:
            self.cache.append((offset, bytes(length)))

    zero_range = punch_hole

    def datasync(self):
        # What was written before the call is made durable, as with a real fdatasync; in order
        # and under the lock, since a flush's fdatasync may run beside a commit's.
        with self.lock:
            pending = list(self.cache)
            for off, payload in pending:
                Destination.write(self, off, payload)
            del self.cache[: len(pending)]
        super().datasync()

    def lose_power(self):
        self.cache.clear()


async def workload(engine, rng, log):
    """Touch each block at most once, over all power cuts; log (block, kind, flushed?)."""
    blocks = [block for block in range(IMAGE // BLOCK) if block not in log]
    rng.shuffle(blocks)
    done = []
    for block in blocks[: rng.randrange(20, 200)]:
        kind = rng.choice("wwwpdz")
        data = rng.randbytes(BLOCK if kind == "w" else 700)
        # Logged before it runs: the crash can cut in after the data landed but before the call
        # returned (a whole-block write is done at once and its bit set before a checkpoint).
        log[block] = ("d" if kind == "z" else kind, data, False)
        if kind == "w":
            await engine.write(block * BLOCK, data, direct=rng.random() < 0.5)
        elif kind == "p":
            await engine.write(block * BLOCK + 33, data)
        elif kind == "z":
            await engine.write_zeroes(block * BLOCK, BLOCK)
        else:
            await engine.discard(block * BLOCK, BLOCK)
        done.append(block)
        if rng.random() < 0.2:
            await flush(engine, rng)
            for b in done:
                log[b] = log[b][:2] + (True,)
            done.clear()
        if rng.random() < 0.3:
            await trio.sleep(rng.uniform(0, 0.003))


async def flush(engine, rng):
    """A flush as the FUSE layer makes it: one fdatasync of DST in a thread when that is
    enough (`flush_now`: it runs beside the committer's commits), else a commit."""
    datasync = engine.flush_now() if rng.random() < 0.5 else None
    if datasync is None:
        await engine.flush()
    else:
        await trio.to_thread.run_sync(datasync)


def prefetch_runs(rng):
    runs = []
    for _ in range(rng.randrange(1, 6)):
        start = rng.randrange(0, IMAGE // BLOCK - 8)
        runs.append(range(start, start + rng.randrange(1, 8)))
    return runs


def expected(kind, data, source_block):
    if kind == "w":
        return data
    if kind == "d":
        return bytes(BLOCK)
    out = bytearray(source_block)
    out[33 : 33 + len(data)] = data
    return bytes(out)


async def crash_and_check(tmp_path, seed):
    rng = random.Random(seed)
    src = str(make_source_file(tmp_path / "src", IMAGE, seed=seed, chunk=BLOCK, zero_every=5, hole_every=0))
    dst, meta = str(tmp_path / "dst"), str(tmp_path / "meta")
    log = {}
    for _ in range(rng.choice([1, 1, 2, 3])):
        await run_until_power_cut(src, dst, meta, rng, log)

    source = await LocalSource.open(src)
    engine = open_clone(source, dst, meta, settings=Settings(hydration=False, copy_on_read=False))
    async with running(engine):
        with open(src, "rb") as f:
            source_bytes = f.read()
        for block in range(IMAGE // BLOCK):
            sl = slice(block * BLOCK, (block + 1) * BLOCK)
            got = await engine.read(block * BLOCK, BLOCK)
            written = check_written(engine.meta, block, got != source_bytes[sl], seed)
            if block not in log:
                assert got == source_bytes[sl], f"seed {seed}: untouched block {block} lost its source data"
                continue
            kind, data, flushed = log[block]
            want = expected(kind, data, source_bytes[sl])
            if flushed:
                assert got == want, f"seed {seed}: flushed block {block} ({kind}) lost"
                assert written, f"seed {seed}: flushed block {block} ({kind}) missing from diff"
            else:
                assert got in (want, source_bytes[sl]), f"seed {seed}: block {block} holds garbage"
    return sum(1 for *_, f in log.values() if f)


def check_written(meta, block, changed, seed):
    """Changed-block tracking survives the cut: a block that reads other than the source has
    its chunks' written bits in META (SPEC invariant 1: the bits are durable before the data,
    and before the regions' hydrated bits), so `diff` never lists less than was written.
    Returns whether the block is marked written."""
    written = all(meta.is_written(c) for c in meta.written_chunks(block * BLOCK, BLOCK))
    assert written or not changed, \
        f"seed {seed}: block {block} reads changed data but is not marked written"
    return written


async def run_until_power_cut(src, dst, meta, rng, log):
    source = await LocalSource.open(src)
    engine = open_clone(source, dst, meta, settings=Settings(
        hydration_batch_size=2, hydration_threshold=8, commit_interval=rng.choice([0.002, 0.02, 1.0]),
        max_rate=rng.choice([0, 4 << 20]), discard_passdown=rng.random() < 0.5))
    if rng.random() < 0.5:
        runs = prefetch_runs(rng)
        engine.prefetch(runs, first_burst=rng.randrange(0, len(runs) + 1))
    volatile = VolatileDestination(engine.dst)
    engine.dst = engine.copier.dst = volatile

    async def no_final_commit():  # the power goes out: nothing runs after the crash
        return None

    engine._shutdown_commit = no_final_commit
    with trio.move_on_after(rng.uniform(0.005, 0.08)):
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            await workload(engine, rng, log)
            await trio.sleep_forever()
    volatile.lose_power()
    engine.meta.close()
    volatile.close()


@pytest.mark.parametrize("seed", range(40))
async def test_power_loss_keeps_flushed_writes_and_source_data(tmp_path, seed):
    await crash_and_check(tmp_path, seed)
