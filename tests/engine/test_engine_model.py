"""Random programs of reads, writes, discards, flushes, hydration steps, concurrent groups and
reopens, checked read by read against a plain in-memory model of the image. A second program
kind adds what follows the user: sequential streams (readahead's copies run ahead of the reader
while other ops go on) and a prefetch trace at each open."""

import os
import tempfile

import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from fuseclone.clone import open_clone, running
from fuseclone.engine import Settings
from fuseclone.metadata import Metadata
from fuseclone.sources.local import LocalSource
from tests.engine.conftest import make_source_file

IMAGE = 64 * 1024 + 1234


@st.composite
def byte_range(draw, max_len=20_000, image=IMAGE):
    off = draw(st.integers(0, image - 1))
    length = draw(st.integers(1, min(max_len, image - off)))
    return off, length


def op_strategy(image=IMAGE):
    rng = byte_range(image=image)
    return st.one_of(
        st.tuples(st.just("read"), rng),
        st.tuples(st.just("write"), rng, st.integers(0, 255)),
        st.tuples(st.just("discard"), rng),
        st.tuples(st.just("zero"), rng),
        st.tuples(st.just("flush")),
        st.tuples(st.just("hydrate"), st.integers(1, 6)),
        st.tuples(st.just("concurrent"), st.lists(st.tuples(
            st.sampled_from(["read", "write", "discard"]), rng, st.integers(0, 255)),
            min_size=2, max_size=6)),
        st.tuples(st.just("reopen"), st.booleans(), st.booleans()),
    )


def disjoint(ops):
    """Keep only group members whose byte ranges overlap no earlier member's."""
    taken, kept = [], []
    for kind, (off, n), fill in ops:
        if all(off + n <= a or b <= off for a, b in taken):
            taken.append((off, off + n))
            kept.append((kind, (off, n), fill))
    return kept


class Harness:
    def __init__(self, tmp, region_size, image=IMAGE, prefetch=()):
        self.image = image
        self.prefetch = list(prefetch)  # runs of regions, given to the engine at each open
        self.src = make_source_file(os.path.join(tmp, "src"), image, seed=3, chunk=4096,
                                    zero_every=4, hole_every=5)
        self.dst = os.path.join(tmp, "dst")
        self.meta = os.path.join(tmp, "meta")
        self.region_size = region_size
        with open(self.src, "rb") as f:
            self.model = bytearray(f.read())
        self.user_changed = []  # (offset, length) of every write, discard and zeroing

    async def open(self, copy_on_read=True, passdown=True):
        source = await LocalSource.open(self.src)
        engine = open_clone(source, self.dst, self.meta, region_size=self.region_size,
                            settings=Settings(hydration=False, copy_on_read=copy_on_read,
                                              discard_passdown=passdown, hydration_batch_size=2,
                                              commit_interval=0.01))
        if self.prefetch:
            engine.prefetch(self.prefetch, first_burst=1)
        return engine

    async def apply(self, engine, kind, rng, fill=0):
        off, n = rng
        if kind == "read":
            got = await engine.read(off, n)
            assert got == bytes(self.model[off : off + n]), f"read {off}+{n} differs"
        elif kind == "write":
            data = bytes([fill]) * n
            await engine.write(off, data)
            self.model[off : off + n] = data
            self.user_changed.append((off, n))
        elif kind in ("discard", "zero"):
            await (engine.discard if kind == "discard" else engine.write_zeroes)(off, n)
            self.model[off : off + n] = bytes(n)
            self.user_changed.append((off, n))
        elif kind == "stream":  # reads of `fill` bytes in a row over off+n: readahead follows
            for start in range(off, off + n, fill):
                await self.apply(engine, "read", (start, min(fill, off + n - start)))


async def hydrate_a_little(engine, steps):
    engine.message("enable_hydration")
    for _ in range(steps):
        await trio.sleep(0)
    await trio.sleep(0.005)
    engine.message("disable_hydration")


async def run_op(h, engine, op):
    kind = op[0]
    if kind in ("read", "write", "discard", "zero", "stream"):
        await h.apply(engine, kind, *op[1:])
    elif kind == "flush":
        await engine.flush()
    elif kind == "hydrate":
        await hydrate_a_little(engine, op[1])
    elif kind == "concurrent":
        async with trio.open_nursery() as n:
            for member in disjoint(op[1]):
                n.start_soon(h.apply, engine, *member)


async def run_program(tmp, region_size, program, image=IMAGE, prefetch=()):
    h = Harness(tmp, region_size, image, prefetch)
    engine = await h.open()
    ops = iter(program)
    while True:
        reopen = None
        async with running(engine):
            for op in ops:
                if op[0] == "reopen":
                    reopen = op
                    break
                await run_op(h, engine, op)
            if reopen is None:
                assert await engine.read(0, h.image) == bytes(h.model)
                engine.message("enable_hydration")
                with trio.fail_after(20):
                    await engine.complete.wait()
        if reopen is None:
            break
        engine = await h.open(copy_on_read=reopen[1], passdown=reopen[2])  # after a clean close
    with open(h.dst, "rb") as f:
        assert f.read(h.image) == bytes(h.model), "the destination alone differs from the model"
    with Metadata.open(h.meta, writable=False) as meta:
        assert meta.complete and meta.header.clean
        assert not meta.header.written_unknown
        for off, n in h.user_changed:  # changed-block tracking (`diff`) misses no user change
            assert all(meta.is_written(c) for c in meta.written_chunks(off, n)), \
                f"user change {off}+{n} is not in the written bitmap"


@settings(max_examples=int(os.environ.get("MODEL_EXAMPLES", "120")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(region_size=st.sampled_from([4096, 8192]),
       program=st.lists(op_strategy(), min_size=1, max_size=25))
def test_random_programs_match_the_model(region_size, program):
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(_with_timeout, tmp, region_size, program)


async def _with_timeout(tmp, region_size, program):
    with trio.fail_after(30):
        await run_program(tmp, region_size, program)


FOLLOW_IMAGE = 1024 * 1024 + 1234  # room for readahead windows (128 KiB and up) to run ahead


def follow_op_strategy():
    """op_strategy's ops and sequential streams, alone or beside other ops in a group."""
    stream = st.tuples(st.just("stream"), byte_range(max_len=400_000, image=FOLLOW_IMAGE),
                       st.sampled_from([4096, 16384, 65536]))
    member = st.one_of(
        st.tuples(st.sampled_from(["read", "write", "discard"]),
                  byte_range(image=FOLLOW_IMAGE), st.integers(0, 255)),
        stream)
    return st.one_of(op_strategy(FOLLOW_IMAGE), stream,
                     st.tuples(st.just("concurrent"), st.lists(member, min_size=2, max_size=5)))


@st.composite
def prefetch_runs(draw, region_size):
    """A trace's runs of regions (possibly none), in any order."""
    regions = -(-FOLLOW_IMAGE // region_size)
    starts = draw(st.lists(st.integers(0, regions - 1), max_size=6, unique=True))
    return [range(s, min(regions, s + draw(st.integers(1, 40)))) for s in starts]


@settings(max_examples=int(os.environ.get("MODEL_EXAMPLES", "120")) // 2, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), region_size=st.sampled_from([4096, 16384]),
       program=st.lists(follow_op_strategy(), min_size=1, max_size=20))
def test_programs_with_streams_and_a_prefetch_match_the_model(data, region_size, program):
    runs = data.draw(prefetch_runs(region_size))
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(_follow_with_timeout, tmp, region_size, program, runs)


async def _follow_with_timeout(tmp, region_size, program, runs):
    with trio.fail_after(60):
        await run_program(tmp, region_size, program, FOLLOW_IMAGE, runs)
