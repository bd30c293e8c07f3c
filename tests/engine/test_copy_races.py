"""A copy of one region in flight against every user operation, systematically.

Each case holds the engine's copy of region R at one point: its source read in flight
("read"), its DST write in flight ("write"), done but its bit not committed ("mark"), committed
("after"); or makes the source read fail there ("fail"). A user operation lands at that point,
then the copy goes on. The image must then read as the source with the user operations applied
(in some order, where they ran at once), and after a simulated power loss (the volatile
destination of test_power_loss) every flushed operation must be there and every other region
hold its source data or a user's (invariants 1 and 3). A user operation may fail only where it
needs the source's data of R."""

import errno
import functools
import itertools
import random
import threading
import zlib
from typing import Callable

import pytest
import trio
import trio.testing

from fuseclone.clone import open_clone, running
from fuseclone.engine import Settings
from fuseclone.sources.base import Source, SourceReadError
from fuseclone.sources.local import LocalSource
from tests.engine.conftest import WrappedSource, make_source_file
from tests.engine.test_power_loss import VolatileDestination

REGION = 4096
NR = 32
IMAGE = NR * REGION
R = 8
AT = R * REGION


class HeldSource(WrappedSource):
    """Wraps a source: the first read touching region R waits for `release`, then fails if
    `failing` is set (as every later read of R does while it stays set)."""

    def __init__(self, inner: Source) -> None:
        super().__init__(inner)
        self.armed = True
        self.arrived = trio.Event()
        self.release = trio.Event()
        self.failing = False

    async def read(self, offset, length):
        if offset < AT + REGION and offset + length > AT:
            if self.armed:
                self.armed = False
                self.arrived.set()
                await self.release.wait()
            if self.failing:
                raise SourceReadError(errno.EIO, "injected source fault")
        return await self.inner.read(offset, length)


class HeldWrites:
    """Wraps the copier's DST writes: the first one touching region R waits for `release`."""

    def __init__(self, engine) -> None:
        self.inner = engine.copier.write_or_punch
        self.armed = False
        self.arrived = trio.Event()
        self.release = threading.Event()
        self.token = trio.lowlevel.current_trio_token()
        engine.copier.write_or_punch = self.write_or_punch

    def write_or_punch(self, offset, data, *args):
        if self.armed and offset < AT + REGION and offset + len(data) > AT:
            self.armed = False
            self.token.run_sync_soon(self.arrived.set)
            self.release.wait()
        return self.inner(offset, data, *args)


# ---- user operations: what each does, its effect on an image, whether it needs R's source data

def _payload(name: str, length: int) -> bytes:
    seed = zlib.crc32(name.encode())
    return bytes((seed + i * 7) & 0xFF or 1 for i in range(length))


class Op:
    def __init__(self, name, kind, offset=0, length=0, needs_source=False, direct=False,
                 messages=()):
        self.name, self.kind, self.offset, self.length = name, kind, offset, length
        self.needs_source, self.direct, self.messages = needs_source, direct, messages
        self.data = _payload(name, length) if kind == "write" else bytes(length)

    async def run(self, engine) -> bytes | None:
        if self.kind == "write":
            await engine.write(self.offset, self.data, direct=self.direct)
        elif self.kind == "discard":
            await engine.discard(self.offset, self.length)
        elif self.kind == "zeroes":
            await engine.write_zeroes(self.offset, self.length)
        elif self.kind == "read":
            return await engine.read(self.offset, self.length)
        elif self.kind == "flush":
            await engine.flush()
        elif self.kind == "flush_now":
            datasync = engine.flush_now()
            if datasync is None:
                await engine.flush()
            else:
                await trio.to_thread.run_sync(datasync)
        elif self.kind == "message":
            for text in self.messages:
                engine.message(text)
        elif self.kind == "readahead":  # another copy over R and its neighbours
            engine.hydrator.read_ahead(self.offset, self.offset + self.length, engine._nursery)
        return None

    def apply(self, image: bytearray) -> None:
        if self.kind in ("write", "discard", "zeroes"):
            image[self.offset : self.offset + self.length] = self.data

    @property
    def changes(self) -> bool:
        return self.kind in ("write", "discard", "zeroes")


def user_ops() -> list[Op]:
    return [
        Op("write_whole", "write", AT, REGION),
        Op("write_whole_direct", "write", AT, REGION, direct=True),
        Op("write_partial", "write", AT + 300, 500, needs_source=True),
        Op("write_span", "write", AT - 100, REGION + 200),
        Op("write_two", "write", AT, 2 * REGION),
        Op("write_neighbour", "write", AT + REGION, REGION),
        Op("write_neighbour_partial", "write", AT + REGION + 5, 10),
        Op("write_across_end", "write", AT + REGION - 50, 100, needs_source=True),
        Op("write_before", "write", AT - REGION, REGION),
        Op("discard_whole", "discard", AT, REGION),
        Op("discard_partial", "discard", AT + 100, 1000, needs_source=True),
        Op("discard_span", "discard", AT - 100, REGION + 200),
        Op("zeroes_whole", "zeroes", AT, REGION),
        Op("zeroes_partial", "zeroes", AT + 4000, 96, needs_source=True),
        Op("read", "read", AT + 10, 100, needs_source=True),
        Op("read_span", "read", AT - REGION, 3 * REGION, needs_source=True),
        Op("read_neighbour", "read", AT + REGION, REGION),
        Op("flush", "flush"),
        Op("flush_now", "flush_now"),
        Op("readahead_over", "readahead", AT - REGION, 3 * REGION),
        Op("stop_resume", "message", messages=("disable_hydration", "enable_hydration")),
        Op("stop", "message", messages=("disable_hydration",)),
        Op("max_rate", "message", messages=("max_rate 1K", "max_rate 0")),
    ]


# ---- the copies of R: how each starts, and the user operation that starts it, if any

COPIES = {
    # kind: (settings, the user operation that starts the copy, if one does)
    "copy_on_read": (dict(hydration=False), Op("cor_read", "read", AT + 1, 50, needs_source=True)),
    "write_copy": (dict(hydration=False), Op("partial_write", "write", AT + 2000, 30, needs_source=True)),
    "hydration": (dict(hydration=True), None),
    "readahead": (dict(hydration=False), None),
    "prefetch": (dict(hydration=True), None),
}


async def settle(engine):
    """Until no claim is left (the copies and stores are done)."""
    while engine._claims:
        await engine.changed.park()


async def run_case(tmp_path, copy_kind: str, phase: str, op: Op, end: str, zero: bool):
    """`end`: what comes before the power loss: nothing, a commit (engine.flush), or the
    flush the FUSE layer makes (flush_now). `zero`: R's source data is zeros (punched)."""
    src = str(make_source_file(tmp_path / "src", IMAGE, seed=7, chunk=REGION, zero_every=0,
                               hole_every=0))
    if zero:
        with open(src, "r+b") as f:
            f.seek(AT)
            f.write(bytes(REGION))
    dst, meta = str(tmp_path / "dst"), str(tmp_path / "meta")
    with open(src, "rb") as f:
        source_bytes = f.read()
    extra, starter = COPIES[copy_kind]
    settings = Settings(hydration_batch_size=2, hydration_threshold=4, commit_interval=3600,
                        **extra)
    inner = await LocalSource.open(src)
    held = HeldSource(inner)
    engine = open_clone(held, dst, meta, region_size=REGION, settings=settings)
    if copy_kind == "prefetch":
        engine.prefetch([range(R, R + 2)], first_burst=1)
    volatile = VolatileDestination(engine.dst)
    engine.dst = engine.copier.dst = volatile

    async def no_final_commit():
        return None

    engine._shutdown_commit = no_final_commit
    done: list[Op] = []  # user operations that returned, in order
    failed: list[Op] = []
    reads: list[tuple[Op, bytes]] = []
    ops = [o for o in (starter, op) if o is not None]

    async def run_op(o: Op):
        try:
            got = await o.run(engine)
        except OSError as exc:
            assert exc.errno == errno.EIO, f"{o.name}: {exc!r}"
            assert o.needs_source and phase == "fail", f"{o.name} failed: {exc}"
            failed.append(o)
            return
        if got is not None:
            reads.append((o, got))
        done.append(o)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            async with trio.open_nursery() as users:
                writes = await hold_the_copy_at(
                    phase, copy_kind, engine, held, users,
                    None if starter is None else functools.partial(run_op, starter))
                users.start_soon(run_op, op)
                if phase in ("read", "fail", "write"):
                    await trio.testing.wait_all_tasks_blocked(0.01)
                    (writes if phase == "write" else held).release.set()
            held.failing = False
            await settle(engine)
            images = _images([o for o in done if o.changes], source_bytes)
            maybe = [o for o in failed if o.changes]
            if maybe:
                images += _images([o for o in done if o.changes] + maybe, source_bytes)
            for o, got in reads:
                lo, hi = o.offset, o.offset + o.length
                assert any(got == img[lo:hi] for img in _images_all(ops, source_bytes)), \
                    f"{o.name} read data of no state"
            image = await engine.read(0, IMAGE)
            assert any(image == img for img in images), _diff(image, images, source_bytes)
            if end != "none":
                await Op(end, end).run(engine)
            nursery.cancel_scope.cancel()
    volatile.lose_power()
    engine.meta.close()
    volatile.close()

    source = await LocalSource.open(src)
    engine = open_clone(source, dst, meta, settings=Settings(hydration=False, copy_on_read=False))
    async with running(engine):
        after = await engine.read(0, IMAGE)
    written = [o for o in done + failed if o.changes]
    finals = [bytes(i) for i in images]
    for block in range(NR):
        sl = slice(block * REGION, (block + 1) * REGION)
        if end != "none":
            allowed = {bytes(img[sl]) for img in finals}
        else:
            allowed = {img[sl] for img in _images_all(written, source_bytes)}
        assert bytes(after[sl]) in allowed, (
            f"after power loss block {block} holds {_what(after[sl], source_bytes[sl])}")


def _images(ops, source_bytes) -> list[bytearray]:
    """The image after OPS applied in each order."""
    out = []
    for order in itertools.permutations(ops):
        image = bytearray(source_bytes)
        for o in order:
            o.apply(image)
        out.append(image)
    return out


def _images_all(ops, source_bytes) -> list[bytes]:
    """The image after any subset of OPS, in any order."""
    out = []
    changing = [o for o in ops if o.changes]
    for n in range(len(changing) + 1):
        for subset in itertools.combinations(changing, n):
            out += [bytes(i) for i in _images(list(subset), source_bytes)]
    return out


def _what(block: bytes, source: bytes) -> str:
    if block == source:
        return "the source's data"
    if block == bytes(len(block)):
        return "zeros"
    return "other data"


def _diff(image, images, source_bytes) -> str:
    bad = [b for b in range(NR)
           if all(image[b * REGION:(b + 1) * REGION] != i[b * REGION:(b + 1) * REGION] for i in images)]
    return "blocks " + ", ".join(
        f"{b} ({_what(image[b * REGION:(b + 1) * REGION], source_bytes[b * REGION:(b + 1) * REGION])})"
        for b in bad)


ENDS = ("none", "flush", "flush_now")


def _has_point(copy: str, phase: str) -> bool:
    """Whether the copy has that point: a partial write's own copy is written with the
    write, on the event loop, right after its source read (engine._write_extended), so no
    DST write of it is ever in flight."""
    return not (copy == "write_copy" and phase == "write")


ALL = [(copy, phase, op.name, end, zero)
       for copy in COPIES
       for phase in ("read", "write", "mark", "after", "fail")
       for op in user_ops()
       for end in ENDS
       for zero in (False, True)
       if _has_point(copy, phase)]
# The suite takes every copy, point and operation once, with an end and a source picked at
# random (seeded); ./run soak takes the rest (3450 cases in all, about 95 s).
_pick = random.Random(0)
SUITE = [case for case in [(copy, phase, op.name, _pick.choice(ENDS), _pick.random() < 0.5)
                            for copy in COPIES
                            for phase in ("read", "write", "mark", "after", "fail")
                            for op in user_ops()]
         if _has_point(case[0], case[1])]
REST = [case for case in ALL if case not in SUITE]


@pytest.mark.parametrize("copy_kind,phase,op_name,end,zero", SUITE)
async def test_copy_race(tmp_path, copy_kind, phase, op_name, end, zero):
    op = next(o for o in user_ops() if o.name == op_name)
    await run_case(tmp_path, copy_kind, phase, op, end, zero)


@pytest.mark.soak
@pytest.mark.parametrize("copy_kind,phase,op_name,end,zero", REST)
async def test_copy_race_every_end(tmp_path, copy_kind, phase, op_name, end, zero):
    await test_copy_race(tmp_path, copy_kind, phase, op_name, end, zero)


async def hold_the_copy_at(phase: str, copy_kind: str, engine, held: "HeldSource", users,
                           start_copy: Callable | None) -> "HeldWrites":
    """Start the copy (START_COPY: the user operation whose copy it is, in USERS; readahead's
    asked for here) and bring it to PHASE, where it stays: its source read ("read", "fail"),
    its DST write ("write"), its bits marked ("mark"), or committed too ("after"). Returns the
    hold on its DST writes."""
    writes = HeldWrites(engine)
    writes.armed = phase == "write"
    held.failing = phase == "fail"
    if start_copy is not None:
        users.start_soon(start_copy)
    if copy_kind == "readahead":
        engine.hydrator.read_ahead(AT, AT + 2 * REGION, engine._nursery)
    if phase in ("read", "fail"):
        await held.arrived.wait()
    elif phase == "write":
        held.release.set()
        await writes.arrived.wait()
    else:
        held.release.set()
        while not engine.meta.is_hydrated(R):
            await engine.changed.park()
        if phase == "after":
            await engine.commit()
    return writes


async def test_a_write_over_an_unreadable_region_reads_only_around_it(tmp_path):
    """A write that covers region R whole and its unhydrated neighbours in part needs the
    source's data of the neighbours only: R unreadable in the source must not fail it (under
    load test_copy_race[readahead-fail-write_span-...] came here when the failed copy of R was
    over before the write looked at its regions)."""
    src = str(make_source_file(tmp_path / "src", IMAGE, seed=7, chunk=REGION, zero_every=0,
                               hole_every=0))
    with open(src, "rb") as f:
        image = bytearray(f.read())
    held = HeldSource(await LocalSource.open(src))
    held.armed, held.failing = False, True
    engine = open_clone(held, str(tmp_path / "dst"), str(tmp_path / "meta"), region_size=REGION,
                        settings=Settings(hydration=False))
    op = next(o for o in user_ops() if o.name == "write_span")
    async with running(engine):
        await op.run(engine)
        op.apply(image)
        held.failing = False
        assert await engine.read(0, IMAGE) == bytes(image)
