"""SIGKILL the mount daemon at random moments while a process writes, punches holes and fsyncs
through the FUSE image; after each kill the stale mount is cleaned, and every fsync'd write is
intact, every untouched block equals the source, and `fuseclone check --verify` passes. The engine-level
loop (tests/engine/test_crash.py) does the same without the kernel in between."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from fuseclone import control
from tests.engine.conftest import make_source_file
from tests.engine.crash_child import BLOCK, read_journal
from tests.engine.test_crash import IMAGE, check_after_crash, expected_block
from tests.integration.conftest import fuseclone

WRITER = os.path.join(os.path.dirname(__file__), "fuse_crash_writer.py")


def run_fuse_crash_loop(rig, iterations, seed=0):
    make_source_file(rig.src, IMAGE, seed=5, chunk=BLOCK, zero_every=6, hole_every=9)
    journal = str(rig.tmp / "journal")
    rng = random.Random(seed)
    flushed = 0
    for _ in range(iterations):
        options = ["--max-rate", "8M"] + (["--no-hydration"] if rng.random() < 0.3 else [])
        rig.mount(*options)
        pid = control.request(rig.meta, {"op": "status"})["pid"]
        started = os.path.getsize(journal) if os.path.exists(journal) else 0
        writer = subprocess.Popen([sys.executable, WRITER, rig.image, journal, str(rng.randrange(1 << 30))])
        try:
            _wait_for_start(journal, started, writer)
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(pid, signal.SIGKILL)
            writer.wait(timeout=30)  # every op fails once the daemon is gone
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        _wait_gone(pid)
        assert "stale" in fuseclone("unmount", rig.mnt).stderr
        flushed = check_after_crash(rig.src, rig.dst, rig.meta, journal)
        fuseclone("check", rig.meta, "--src", rig.src, "--dst", rig.dst, "--verify")
    assert flushed > 0, "the writer never fsync'd: the test checked nothing"
    _hydrate_and_compare(rig, journal)


def _wait_for_start(journal, offset, writer):
    deadline = time.monotonic() + 20
    while True:
        if os.path.exists(journal):
            with open(journal, "rb") as f:
                f.seek(offset)
                if b"S\n" in f.read():
                    return
        assert writer.poll() is None, f"writer exited early with {writer.returncode}"
        assert time.monotonic() < deadline, "writer did not start"
        time.sleep(0.01)


def _wait_gone(pid):
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, "killed daemon still there"
        time.sleep(0.01)


def _hydrate_and_compare(rig, journal):
    rig.mount()
    fuseclone("wait", rig.mnt, "--timeout", "120")
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    attempted, flushed = read_journal(journal)
    with open(rig.src, "rb") as s, open(rig.dst, "rb") as d:
        source, dest = s.read(), d.read(IMAGE)
    for block in range(IMAGE // BLOCK):
        sl = slice(block * BLOCK, (block + 1) * BLOCK)
        if block in flushed:
            assert dest[sl] == expected_block(block, attempted[block], source[sl]), block
        elif block not in attempted:
            assert dest[sl] == source[sl], block


def test_sigkill_of_the_daemon_loses_no_fsynced_write(rig):
    run_fuse_crash_loop(rig, iterations=5)


@pytest.mark.soak
def test_sigkill_of_the_daemon_soak(rig):
    run_fuse_crash_loop(rig, iterations=int(os.environ.get("CRASH_ITERATIONS", "300")) // 3, seed=1)
