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
flight, messages (a header write each, in a worker thread), and several power cuts in a row.

The cut is an instant, not a cancellation: work in worker threads goes on after it (a commit
between DST's fdatasync and its META write, say), but nothing it writes or syncs from then on
reaches either disk. Of what was written before the cut and not synced, DST and META keep a
random part, block by block (the kernel writes dirty pages back whenever it likes): a user's
data on DST before its written bits are in META would show."""

import os
import random
import threading

import pytest
import trio

from fuseclone import markahead
from fuseclone.clone import open_clone, running
from fuseclone.destination import Destination
from fuseclone.engine import Settings
from fuseclone.metadata import Metadata
from fuseclone.sources.local import LocalSource
from tests.engine.conftest import make_source_file
from tests.engine.crash_child import flush

BLOCK = 4096
SECTOR = 512  # what a disk writes whole (a META block's write may tear between two)
IMAGE = 1 << 20


class Power:
    """The power supply of one run: `off` is set, under `lock`, the instant it goes out. Every
    DST write, fdatasync and META write after that instant is as if never made, even one a
    worker thread is in the middle of (a commit's DST fdatasync, say, or its META write after
    it): what reached the disks is decided at that instant."""

    def __init__(self, survival: float) -> None:
        self.off = False
        # The chance that a block written before the cut but not synced reached the disk
        # anyway (the kernel writes dirty pages back whenever it likes, fsync or not).
        self.survival = survival
        self.lock = threading.Lock()  # the cut happens between two writes or syncs, never inside


class VolatileDestination(Destination):
    """Writes, punches and zeroings are cached in memory until a datasync() that returns before
    the power cut makes them durable; of the rest, `settle` leaves a random part on the disk."""

    def __init__(self, inner: Destination, power: Power | None = None) -> None:
        super().__init__(inner.path, inner.fd, inner.image_size)
        self._direct_fd = inner._direct_fd  # so that direct writes are written through
        self._sync = inner._sync  # its fdatasync
        self.power = power or Power(survival=0.0)
        self.cache: list[tuple[int, bytes]] = []
        self.settled = 0  # entries taken off the front of the cache (durable) so far
        self.lock = self.power.lock  # datasync runs in a worker thread, writes maybe inline

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
            if not self.power.off:
                self.cache.append((offset, bytes(data)))

    write_direct = write_through = write

    def punch_hole(self, offset, length):
        self.write(offset, bytes(length))

    zero_range = punch_hole

    def datasync(self):
        # What was written before the call is durable once it returns, as with a real
        # fdatasync, unless the power went out first. Flushes may run beside a commit's.
        with self.lock:
            if self.power.off:
                return  # the machine is dead: nothing of this happens
            upto = self.settled + len(self.cache)
        super().datasync()
        with self.lock:
            if self.power.off:
                return  # cut before the disk said it was done: not durable
            done = max(0, upto - self.settled)
            for off, payload in self.cache[:done]:
                Destination.write(self, off, payload)
            del self.cache[:done]
            self.settled += done

    def lose_power(self):
        """The power goes out now, and nothing of the cache reaches the disk."""
        with self.lock:
            self.power.off = True
        self.cache.clear()

    def settle(self, rng):
        """After the cut: the cache is lost, except the blocks the disk had by chance."""
        for off, payload in self.cache:
            for at in range(0, len(payload), BLOCK):
                if rng.random() < self.power.survival:
                    Destination.write(self, off + at, payload[at : at + BLOCK])
        self.cache.clear()


class VolatileMetadata:
    """META's fdatasync, watched: META as it was when the latest one before the cut began is
    what is durable; what was written after that, up to the cut, survives block by block by
    chance (`settle`); what was written after the cut, not at all."""

    def __init__(self, meta, power: Power) -> None:
        self.meta = meta
        self.power = power
        self._sync = meta._sync
        self.durable = self._image()  # open_clone synced what it wrote
        self.durable_order = 0
        self.began = 0
        self.at_cut: bytes | None = None
        meta._sync = self

    def _image(self) -> bytes:
        size = os.fstat(self.meta._fd).st_size
        return os.pread(self.meta._fd, size, 0)

    def __call__(self) -> None:
        with self.power.lock:
            if self.power.off:
                return
            self.began += 1
            order, image = self.began, self._image()
        self._sync()
        with self.power.lock:
            if not self.power.off and order > self.durable_order:
                self.durable, self.durable_order = image, order

    def close(self) -> None:
        self._sync.close()

    def cut(self) -> None:
        """Call at the cut, under the power's lock: what META held then."""
        self.at_cut = self._image()

    def settle(self, rng, path) -> None:
        """After the cut (META closed): write the file as the disk holds it. A block written
        since the last fdatasync may be there whole, or torn: some of its sectors only."""
        image = bytearray(self.durable)
        for at in range(0, len(self.at_cut), BLOCK):
            if self.at_cut[at : at + BLOCK] == image[at : at + BLOCK]:
                continue
            if rng.random() < self.power.survival:
                torn = rng.random() < 0.3
                for sector in range(at, at + BLOCK, SECTOR):
                    if not torn or rng.random() < 0.5:
                        image[sector : sector + SECTOR] = self.at_cut[sector : sector + SECTOR]
        with open(path, "r+b") as f:
            f.write(image)


async def workload(engine, rng, log, power):
    """Touch each block at most once, over all power cuts; log (block, kind, flushed?): a
    flush is logged if it returned before the power cut (a user saw it done)."""
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
            if power.off:
                return
            for b in done:
                log[b] = log[b][:2] + (True,)
            done.clear()
        if rng.random() < 0.05:
            await message(engine, rng)
        if rng.random() < 0.3:
            await trio.sleep(rng.uniform(0, 0.003))


THRESHOLDS, BATCH_SIZES = (4, 8, 16), (1, 2, 3)  # what `message` sets; 8 and 2 at the start


async def message(engine, rng):
    """A dmsetup-style message, whose header write (a worker thread's) may be cut too."""
    if rng.random() < 0.5:
        engine.message(f"hydration_threshold {rng.choice(THRESHOLDS)}")
    else:
        engine.message(f"hydration_batch_size {rng.choice(BATCH_SIZES)}")
    await engine.record_settings()


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


async def crash_and_check(tmp_path, seed, monkeypatch):
    rng = random.Random(seed)
    if rng.random() < 0.5:
        # A write marks only its own chunks: a 1 MiB neighbourhood is the whole image, durable
        # after the first write, and no later write would wait for its written bits.
        monkeypatch.setattr(markahead, "NEIGHBOURHOOD", BLOCK)
        monkeypatch.setattr(markahead, "MAX_WINDOW", BLOCK)
    src = str(make_source_file(tmp_path / "src", IMAGE, seed=seed, chunk=BLOCK, zero_every=5, hole_every=0))
    dst, meta = str(tmp_path / "dst"), str(tmp_path / "meta")
    log = {}
    for _ in range(rng.choice([1, 1, 2, 3])):
        await run_until_power_cut(src, dst, meta, rng, log)

    header = Metadata.read_header(meta)  # a valid one, with settings some message recorded
    assert header.hydration_threshold in THRESHOLDS and header.hydration_batch_size in BATCH_SIZES
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
    power = Power(survival=rng.choice([0.0, 0.5, 1.0]))
    volatile = VolatileDestination(engine.dst, power)
    engine.dst = engine.copier.dst = volatile
    volatile_meta = VolatileMetadata(engine.meta, power)

    async def no_final_commit():  # the power goes out: nothing runs after the crash
        return None

    engine._shutdown_commit = no_final_commit

    async def cut_power(after, cancel_scope):
        await trio.sleep(after)
        with power.lock:  # DST's cache and META as they are at this instant
            power.off = True
            volatile_meta.cut()
        cancel_scope.cancel()

    cut_after = rng.uniform(0.005, 0.08)
    hydrated_first = rng.random() < 0.3  # the writes come to hydrated regions (a database's)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        if hydrated_first:
            await engine.wait_until_settled()
        nursery.start_soon(cut_power, cut_after, nursery.cancel_scope)
        await workload(engine, rng, log, power)
        await trio.sleep_forever()
    volatile.settle(rng)
    engine.meta.close()
    volatile.close()
    volatile_meta.settle(rng, meta)


@pytest.mark.parametrize("seed", range(40))
async def test_power_loss_keeps_flushed_writes_and_source_data(tmp_path, seed, monkeypatch):
    await crash_and_check(tmp_path, seed, monkeypatch)


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(40, 1000))
async def test_power_loss_soak(tmp_path, seed, monkeypatch):
    await crash_and_check(tmp_path, seed, monkeypatch)
