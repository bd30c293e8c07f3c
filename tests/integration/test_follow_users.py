"""Hydration that follows the user, through the real CLI against a real nbdkit behind 5 ms:
readahead for sequential readers, nothing extra for random ones, and access traces that a
later clone prefetches from (or refuses)."""

import mmap
import os
import re
import sys
import time

import pytest

from tests.integration.conftest import MiB, fuseclone, sha256, sh, status_json
from tests.sources.conftest import nbdkit  # noqa: F401  (the fixture)

SIZE = 16 * MiB
READ_LINE = re.compile(r" Read id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+) ")


@pytest.fixture
def slow_source(rig, nbdkit):  # noqa: F811
    """rig.src (random data, no holes) behind nbdkit's delay filter, every read logged."""
    with open(rig.src, "wb") as f:
        f.write(os.urandom(SIZE))
    log = rig.tmp / "nbd.log"
    server = nbdkit("--filter=log", "--filter=delay", "file", rig.src, "rdelay=5ms", f"logfile={log}")
    return server.url(), log


def source_reads(log):
    """(offset, length) of every read the server was asked for."""
    return [(int(o, 16), int(n, 16)) for o, n in READ_LINE.findall(log.read_text())]


def direct_reads(path, ranges):
    """O_DIRECT preads of (offset, length) ranges; returns the bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        out = []
        for offset, length in ranges:
            buf = mmap.mmap(-1, length)
            assert os.preadv(fd, [buf], offset) == length
            out.append(bytes(buf))
        return out
    finally:
        os.close(fd)


def source_bytes(rig, offset, length):
    with open(rig.src, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_sequential_direct_reader_is_fetched_ahead_in_large_requests(rig, slow_source):
    url, log = slow_source
    rig.mount("--no-hydration", src=url)
    sh("dd", f"if={rig.image}", "of=/dev/null", "bs=64k", "count=128", "iflag=direct")
    reads = source_reads(log)
    # One 64 KiB round trip per read without readahead (128 of them); ahead of the reader the
    # copies grow to 1 MiB.
    assert len(reads) < 50, reads
    assert max(length for _, length in reads) >= 512 << 10
    assert status_json(rig.mnt)["fetched"]["readahead"] > 0
    assert sha256(rig.image, 8 * MiB) == sha256(rig.src, 8 * MiB)


def test_random_readers_do_not_pay_for_readahead(rig, slow_source):
    url, log = slow_source
    rig.mount("--no-hydration", src=url)
    at_mount = source_reads(log)
    assert sorted(at_mount) == [(0, 65536), (SIZE - 65536, 65536)]  # the data sample alone
    ranges = [(block * 65536, 4096) for block in (200, 3, 101, 17, 150, 60, 240, 33)]
    assert direct_reads(rig.image, ranges) == [source_bytes(rig, o, n) for o, n in ranges]
    assert sorted(source_reads(log)[len(at_mount):]) == sorted(ranges)
    assert status_json(rig.mnt)["fetched"]["readahead"] == 0


def wait_for_prefetch(mnt, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        st = status_json(mnt)
        if not st["prefetching"] and st["prefetch_hydrated"] == st["prefetch_regions"]:
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.1)


# The daemon with its trace's close held back 1 s: the window in which a mount that let go of
# META before its trace was over while `fuseclone unmount` had returned.
SLOW_TRACE_CLOSE = """
import sys, time
from fuseclone import trace
close = trace.TraceRecorder.close
trace.TraceRecorder.close = lambda self: (time.sleep(1), close(self))
from fuseclone.cli import main
sys.argv[0] = "fuseclone"
main()
"""


def test_a_trace_is_complete_once_unmount_returns(rig, slow_source):
    """`fuseclone unmount` returns once the daemon let go of META; the trace was closed after
    that, so right after unmount it had no `end` line (a `--prefetch` of it: refused as
    incomplete) and was still held (a remount recording it: refused as in use, where it is
    refused for the trace it holds)."""
    url, _ = slow_source
    trace = rig.tmp / "start.trace"
    sh(sys.executable, "-c", SLOW_TRACE_CLOSE, "mount", "--no-hydration", "--record-access", trace,
       url, rig.dst, rig.meta, rig.mnt)
    rig.stack.callback(rig._force_unmount, rig.mnt)
    direct_reads(rig.image, [(MiB, 4096)])
    fuseclone("unmount", rig.mnt)
    assert trace.read_text().splitlines()[-1] == "end 1"
    again = fuseclone("mount", "--no-hydration", "--record-access", trace, url, rig.dst, rig.meta,
                      rig.mnt, check=False)
    assert again.returncode == 1 and "holds an access trace already" in again.stderr, again.stderr


def test_access_trace_round_trip_prefetches_the_next_clone(rig, slow_source):
    url, log = slow_source
    trace = rig.tmp / "start.trace"
    rig.mount("--no-hydration", "--record-access", trace, src=url)
    ranges = [(5 * MiB, 8192), (MiB, 4096), (12 * MiB + 65536, 65536), (5 * MiB, 4096)]
    direct_reads(rig.image, ranges)
    lines = trace.read_text().splitlines()
    assert [tuple(map(int, line.split()[1:])) for line in lines[2:]] == ranges[:3]  # flushed as read
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    assert trace.read_text().splitlines()[-1] == "end 3"

    second = rig.tmp / "second"
    second.mkdir()
    dst, meta = second / "dst.img", second / "clone.meta"
    fuseclone("mount", "--no-hydration", "--prefetch", trace, url, dst, meta, rig.mnt)
    rig.stack.callback(rig._force_unmount, rig.mnt)
    st = wait_for_prefetch(rig.mnt)
    assert st["prefetch_regions"] == (8192 + 4096 + 65536) // 4096
    assert st["hydrated_regions"] == st["prefetch_regions"]  # only those: hydration is off
    assert "prefetch" in fuseclone("status", rig.mnt).stdout
    before = len(source_reads(log))
    assert direct_reads(rig.image, ranges) == [source_bytes(rig, o, n) for o, n in ranges]
    assert len(source_reads(log)) == before  # all served from DST


def test_reads_of_data_hydration_copied_first_are_recorded(rig):
    """A fast local source hydrates before the workload reads: those reads belong in the trace
    all the same (before, it recorded only reads that went to the source: none here)."""
    with open(rig.src, "wb") as f:
        f.write(os.urandom(SIZE))
    trace = rig.tmp / "start.trace"
    rig.mount("--record-access", trace)
    fuseclone("wait", rig.mnt, "--timeout", "60")
    ranges = [(5 * MiB, 8192), (MiB, 4096), (12 * MiB + 65536, 65536), (5 * MiB, 4096)]
    assert direct_reads(rig.image, ranges) == [source_bytes(rig, o, n) for o, n in ranges]
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    lines = trace.read_text().splitlines()
    assert [tuple(map(int, line.split()[1:])) for line in lines[2:-1]] == ranges[:3]
    assert lines[-1] == "end 3"


@pytest.mark.parametrize("trace_text", [
    "not a trace\n",
    'fuseclone-access-trace 1\n{"image_size": 16777216, "source": {"kind": "nbd"}}\n0.1 0\n',
])
def test_corrupt_trace_is_refused_and_nothing_created(rig, trace_text):
    with open(rig.src, "wb") as f:
        f.truncate(SIZE)
    trace = rig.tmp / "bad.trace"
    trace.write_text(trace_text)
    result = fuseclone("mount", "--prefetch", trace, rig.src, rig.dst, rig.meta, rig.mnt, check=False)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and str(trace) in result.stderr
    assert not os.path.exists(rig.dst) and not os.path.exists(rig.meta)


def test_trace_of_another_source_is_refused(rig):
    other = rig.tmp / "other.img"
    for path in (rig.src, other):
        with open(path, "wb") as f:
            f.write(os.urandom(MiB))
    trace = rig.tmp / "other.trace"
    rig.mount("--record-access", trace, src=str(other))
    direct_reads(rig.image, [(0, 4096)])
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    second = rig.tmp / "second"
    second.mkdir()
    result = fuseclone("mount", "--prefetch", trace, rig.src, second / "dst", second / "meta",
                       rig.mnt, check=False)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "another source" in result.stderr
    assert os.listdir(second) == []
