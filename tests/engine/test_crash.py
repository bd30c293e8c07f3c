"""SIGKILL the engine at random moments, many times; after each, every flushed write is intact
and marked written (`diff` lists it), every untouched block equals the source, the metadata is
valid, and every hydrated block holding user data is marked written (so `check --verify` passes). Then hydrate to the end and
check the destination alone."""

import os
import random
import subprocess
import sys
import time

import pytest
import trio

from fuseclone.clone import open_clone, running
from fuseclone.engine import Settings
from fuseclone.metadata import Metadata
from fuseclone.sources.local import LocalSource
from tests.engine.conftest import make_source_file
from tests.engine.crash_child import BLOCK, pattern, read_journal

CHILD = os.path.join(os.path.dirname(__file__), "crash_child.py")
IMAGE = 4 << 20


def expected_block(block, kind, source_block):
    if kind == "w":
        return pattern(block, "w")
    if kind == "d":
        return bytes(BLOCK)
    data = bytearray(source_block)
    data[100:1100] = pattern(block, "p")
    return bytes(data)


def check_after_crash(src, dst, meta_path, journal):
    attempted, flushed = read_journal(journal)
    with Metadata.open(meta_path, writable=False) as meta, open(src, "rb") as s, open(dst, "rb") as d:
        source, dest = s.read(), d.read(IMAGE)
        for block in range(IMAGE // BLOCK):
            sl = slice(block * BLOCK, (block + 1) * BLOCK)
            visible = dest[sl] if meta.is_hydrated(block) else source[sl]
            if meta.is_hydrated(block) and dest[sl] != source[sl]:  # what check --verify sees
                assert meta.is_written(meta.written_chunks(block * BLOCK, 1)[0]), \
                    f"block {block} holds user data but is not marked written"
            if block in flushed:
                assert visible == expected_block(block, attempted[block], source[sl]), \
                    f"flushed block {block} ({attempted[block]}) lost"
                assert meta.is_written(meta.written_chunks(block * BLOCK, 1)[0]), \
                    f"flushed block {block} ({attempted[block]}) missing from diff"
            elif block in attempted:
                assert visible in (source[sl], expected_block(block, attempted[block], source[sl])), \
                    f"unflushed block {block} holds neither old nor new data"
            else:
                assert visible == source[sl], f"untouched block {block} differs from the source"
    return len(flushed)


def run_crash_loop(tmp_path, iterations, seed=0):
    src = str(make_source_file(tmp_path / "src", IMAGE, seed=5, chunk=BLOCK, zero_every=6, hole_every=9))
    dst, meta, journal = (str(tmp_path / n) for n in ("dst", "meta", "journal"))
    rng = random.Random(seed)
    flushed = 0
    for i in range(iterations):
        started = os.path.getsize(journal) if os.path.exists(journal) else 0
        child = subprocess.Popen([sys.executable, CHILD, src, dst, meta, journal, str(rng.randrange(1 << 30))])
        try:
            deadline = time.monotonic() + 20
            while not _started_since(journal, started):
                assert child.poll() is None, f"crash child exited early with {child.returncode}"
                assert time.monotonic() < deadline, "crash child did not start"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            child.kill()
            child.wait()
        flushed = check_after_crash(src, dst, meta, journal)
    assert flushed > 0, "the workload never flushed: the test checked nothing"
    trio.run(_hydrate_to_end, src, dst, meta, journal)


def _started_since(journal, offset):
    if not os.path.exists(journal):
        return False
    with open(journal, "rb") as f:
        f.seek(offset)
        return b"S\n" in f.read()


async def _hydrate_to_end(src, dst, meta, journal):
    source = await LocalSource.open(src)
    engine = open_clone(source, dst, meta, settings=Settings())
    async with running(engine):
        with trio.fail_after(60):
            await engine.complete.wait()
    # now the destination alone must show what the image showed
    attempted, flushed = read_journal(journal)
    with open(src, "rb") as s, open(dst, "rb") as d:
        source_bytes, dest = s.read(), d.read(IMAGE)
    for block in flushed:
        sl = slice(block * BLOCK, (block + 1) * BLOCK)
        assert dest[sl] == expected_block(block, attempted[block], source_bytes[sl])
    for block in range(IMAGE // BLOCK):
        if block not in attempted:
            sl = slice(block * BLOCK, (block + 1) * BLOCK)
            assert dest[sl] == source_bytes[sl]


def test_sigkill_at_random_moments(tmp_path):
    run_crash_loop(tmp_path, iterations=12)


@pytest.mark.soak
def test_sigkill_soak(tmp_path):
    run_crash_loop(tmp_path, iterations=int(os.environ.get("CRASH_ITERATIONS", "300")), seed=1)
