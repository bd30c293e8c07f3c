"""Random programs of reads, writes, discards, flushes, hydration steps, concurrent groups and
reopens, checked read by read against a plain in-memory model of the image."""

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
def byte_range(draw, max_len=20_000):
    off = draw(st.integers(0, IMAGE - 1))
    length = draw(st.integers(1, min(max_len, IMAGE - off)))
    return off, length


def op_strategy():
    rng = byte_range()
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
    def __init__(self, tmp, region_size):
        self.src = make_source_file(os.path.join(tmp, "src"), IMAGE, seed=3, chunk=4096,
                                    zero_every=4, hole_every=5)
        self.dst = os.path.join(tmp, "dst")
        self.meta = os.path.join(tmp, "meta")
        self.region_size = region_size
        with open(self.src, "rb") as f:
            self.model = bytearray(f.read())

    async def open(self, copy_on_read=True, passdown=True):
        source = await LocalSource.open(self.src)
        return open_clone(source, self.dst, self.meta, region_size=self.region_size,
                          settings=Settings(hydration=False, copy_on_read=copy_on_read,
                                            discard_passdown=passdown, hydration_batch_size=2,
                                            commit_interval=0.01))

    async def apply(self, engine, kind, rng, fill=0):
        off, n = rng
        if kind == "read":
            got = await engine.read(off, n)
            assert got == bytes(self.model[off : off + n]), f"read {off}+{n} differs"
        elif kind == "write":
            data = bytes([fill]) * n
            await engine.write(off, data)
            self.model[off : off + n] = data
        elif kind in ("discard", "zero"):
            await (engine.discard if kind == "discard" else engine.write_zeroes)(off, n)
            self.model[off : off + n] = bytes(n)


async def hydrate_a_little(engine, steps):
    engine.message("enable_hydration")
    for _ in range(steps):
        await trio.sleep(0)
    await trio.sleep(0.005)
    engine.message("disable_hydration")


async def run_op(h, engine, op):
    kind = op[0]
    if kind in ("read", "write", "discard", "zero"):
        await h.apply(engine, kind, *op[1:])
    elif kind == "flush":
        await engine.flush()
    elif kind == "hydrate":
        await hydrate_a_little(engine, op[1])
    elif kind == "concurrent":
        async with trio.open_nursery() as n:
            for member in disjoint(op[1]):
                n.start_soon(h.apply, engine, *member)


async def run_program(tmp, region_size, program):
    h = Harness(tmp, region_size)
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
                assert await engine.read(0, IMAGE) == bytes(h.model)
                engine.message("enable_hydration")
                with trio.fail_after(20):
                    await engine.complete.wait()
        if reopen is None:
            break
        engine = await h.open(copy_on_read=reopen[1], passdown=reopen[2])  # after a clean close
    with open(h.dst, "rb") as f:
        assert f.read(IMAGE) == bytes(h.model), "the destination alone differs from the model"
    with Metadata.open(h.meta, writable=False) as meta:
        assert meta.complete and meta.header.clean


@settings(max_examples=int(os.environ.get("MODEL_EXAMPLES", "120")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(region_size=st.sampled_from([4096, 8192]),
       program=st.lists(op_strategy(), min_size=1, max_size=25))
def test_random_programs_match_the_model(region_size, program):
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(_with_timeout, tmp, region_size, program)


async def _with_timeout(tmp, region_size, program):
    with trio.fail_after(30):
        await run_program(tmp, region_size, program)
