"""A stop while a copy of region R is held at each point of its way (test_copy_races.py's hold
points: its source read in flight, its DST write in flight, done but not committed, committed,
or its source read failing), with a user operation landed at that point.

Every stop of a mount (`unmount`, `unmount --lazy`, SIGTERM, a signal repeated) ends the same
way in the engine: its tasks cancelled (the FUSE session's with them), then its last commit;
`disable_hydration` is the message that stops copies. After the stop, every user operation
that returned must be in the image (a clean stop loses nothing acknowledged, flushed or not),
META must check out against SRC and DST (`check --verify`), and a mount after it must resume
and complete hydration with the same image."""

import errno
import functools
import itertools
import threading

import pytest
import trio
import trio.testing

from fuseclone.checker import _check_against
from fuseclone.clone import open_clone, running
from fuseclone.engine import Settings
from fuseclone.metadata import Metadata
from fuseclone.sources.local import LocalSource
from tests.engine.conftest import make_source_file
from tests.engine.test_copy_races import (COPIES, IMAGE, REGION, R, HeldSource, _has_point,
                                          _images, hold_the_copy_at, user_ops)

STOPS = ("stop", "disable_then_stop")
PHASES = ("read", "write", "mark", "after", "fail")
OPS = ("write_partial", "write_whole", "write_span", "discard_partial", "zeroes_partial", "read",
       "flush")
RELEASE_AFTER = 0.05  # seconds: a held DST write (a thread) goes on once the stop has begun


class FailingUserWrites:
    """DST's writes that carry OP's data (the user's write, alone or stored with the source's
    data around it) fail with ERRNO; the copies' writes go through."""

    def __init__(self, dst, op, error: int) -> None:
        self.op, self.error = op, error
        for name in ("write", "write_through"):
            setattr(dst, name, self._failing(getattr(dst, name)))

    def _failing(self, inner):
        def write(offset, data, *args, **kw):
            if self.op.data in bytes(data):
                raise OSError(self.error, f"injected {errno.errorcode[self.error]} in a user write")
            return inner(offset, data, *args, **kw)
        return write


async def run_stop_case(tmp_path, copy_kind: str, phase: str, op_name: str, stop: str,
                        fault: int | None = None):
    """FAULT: OP's own DST write fails with this errno."""
    src = str(make_source_file(tmp_path / "src", IMAGE, seed=7, chunk=REGION, zero_every=0,
                               hole_every=0))
    dst, meta = str(tmp_path / "dst"), str(tmp_path / "meta")
    with open(src, "rb") as f:
        source_bytes = f.read()
    extra, starter = COPIES[copy_kind]
    op = next(o for o in user_ops() if o.name == op_name)
    settings = Settings(hydration_batch_size=2, hydration_threshold=4, commit_interval=3600,
                        **extra)
    held = HeldSource(await LocalSource.open(src))
    engine = open_clone(held, dst, meta, region_size=REGION, settings=settings)
    if copy_kind == "prefetch":
        engine.prefetch([range(R, R + 2)], first_burst=1)
    if fault is not None:
        FailingUserWrites(engine.dst, op, fault)
    done, maybe = [], []  # user operations that returned; that failed or were cut short

    async def run_op(o):
        try:
            await o.run(engine)
        except OSError as exc:
            injected = o is op and exc.errno == fault
            source_failed = exc.errno == errno.EIO and o.needs_source and phase == "fail"
            assert injected or source_failed, repr(exc)
            maybe.append(o)
            return
        except trio.Cancelled:  # the stop came first: the user was never answered
            maybe.append(o)
            raise
        done.append(o)

    with trio.fail_after(20):
        async with running(engine):
            async with trio.open_nursery() as users:
                writes = await hold_the_copy_at(
                    phase, copy_kind, engine, held, users,
                    None if starter is None else functools.partial(run_op, starter))
                users.start_soon(run_op, op)
                await trio.testing.wait_all_tasks_blocked(0.01)
                if phase == "fail":  # the source read fails, the stop comes right after
                    held.release.set()
                    await trio.testing.wait_all_tasks_blocked(0.01)
                if fault is not None:  # the copy goes on, the write fails beside it, then the stop
                    held.release.set()
                    writes.release.set()
                    while op not in done + maybe:
                        await trio.sleep(0.001)
                    assert op in maybe, "the write whose DST write failed returned"
                if stop == "disable_then_stop":
                    engine.message("disable_hydration")
                # The copy stays held as the stop begins: a source read is cancelled with it, a
                # DST write (a thread) finishes a moment later.
                threading.Timer(RELEASE_AFTER, writes.release.set).start()
                users.cancel_scope.cancel()
    # `running` ended: the engine's tasks cancelled, its last commit made, META marked clean.

    header = Metadata.read_header(meta)
    assert header.clean
    with Metadata.open(meta, writable=False) as m:
        messages = []
        assert await _check_against(m, src, dst, True, messages.append), messages

    allowed = set()
    for n in range(len(maybe) + 1):
        for extra_ops in itertools.combinations(maybe, n):
            for image in _images([o for o in done + list(extra_ops) if o.changes], source_bytes):
                allowed.add(bytes(image))
    source = await LocalSource.open(src)
    engine = open_clone(source, dst, meta, settings=Settings(hydration=True))
    with trio.fail_after(20):
        async with running(engine):
            await engine.complete.wait()
            image = bytes(await engine.read(0, IMAGE))
    assert image in allowed, f"done {[o.name for o in done]}, maybe {[o.name for o in maybe]}"


ALL = [(copy, phase, op, stop) for copy in COPIES for phase in PHASES for op in OPS
       for stop in STOPS if _has_point(copy, phase)]
# The suite takes every copy and point once, each with an operation and a stop in turn; ./run
# soak takes the rest.
SUITE = [(copy, phase, OPS[i % len(OPS)], STOPS[i % len(STOPS)])
         for i, (copy, phase) in enumerate((c, p) for c in COPIES for p in PHASES
                                           if _has_point(c, p))]
REST = [case for case in ALL if case not in SUITE]


WRITES = ("write_partial", "write_whole", "write_span")
FAULTS = (errno.EIO, errno.ENOSPC)
ALL_FAULTS = [(copy, phase, op, fault) for copy in COPIES for phase in PHASES for op in WRITES
              for fault in FAULTS if _has_point(copy, phase)]
SUITE_FAULTS = [(copy, phase, WRITES[i % len(WRITES)], FAULTS[i % len(FAULTS)])
                for i, (copy, phase) in enumerate((c, p) for c in COPIES for p in PHASES
                                                  if _has_point(c, p))]
REST_FAULTS = [case for case in ALL_FAULTS if case not in SUITE_FAULTS]


@pytest.mark.parametrize("copy_kind,phase,op_name,stop", SUITE)
async def test_a_stop_while_a_copy_is_held(tmp_path, copy_kind, phase, op_name, stop):
    await run_stop_case(tmp_path, copy_kind, phase, op_name, stop)


@pytest.mark.soak
@pytest.mark.parametrize("copy_kind,phase,op_name,stop", REST)
async def test_a_stop_while_a_copy_is_held_every_op(tmp_path, copy_kind, phase, op_name, stop):
    await run_stop_case(tmp_path, copy_kind, phase, op_name, stop)


@pytest.mark.parametrize("copy_kind,phase,op_name,fault", SUITE_FAULTS)
async def test_a_user_write_failing_beside_a_held_copy(tmp_path, copy_kind, phase, op_name,
                                                       fault):
    """The user's own DST write fails (EIO, ENOSPC) while a copy of its region is held: the
    write fails and nothing else does; the image holds it whole or not at all, and R the
    source's data around it."""
    await run_stop_case(tmp_path, copy_kind, phase, op_name, "stop", fault)


@pytest.mark.soak
@pytest.mark.parametrize("copy_kind,phase,op_name,fault", REST_FAULTS)
async def test_a_user_write_failing_beside_a_held_copy_every_write(tmp_path, copy_kind, phase,
                                                                   op_name, fault):
    await run_stop_case(tmp_path, copy_kind, phase, op_name, "stop", fault)
