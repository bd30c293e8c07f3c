"""READs answered from reads on the session's io_uring (`backend.ReadFrom`), through the
socket pair that stands in for /dev/fuse (tests/fuse/test_session.py): the bytes, short reads
and errors answered as the thread path answers them, the thread path where io_uring cannot be
set up, and reads still in flight when the session ends."""

import errno
import functools
import logging
import os
import socket
import threading

import pytest
import trio

from fuseclone import uring
from fuseclone.fuse import abi, codec
from fuseclone.fuse.abi import Opcode
from fuseclone.fuse.backend import ReadFrom
from fuseclone.fuse.session import Session
from tests.fuse.test_session import Kernel

FILE_SIZE = 64 << 10


def blocking_read(fd: int, offset: int, length: int) -> bytes:
    """The thread path's read: DST's end reads as zeros."""
    data = os.pread(fd, length, offset)
    return data + bytes(length - len(data))


class FileFs:
    """READ of nodeid 2 answers ReadFrom(file); nodeid 3 the same from `pipe` (a read that stays
    in flight until the test writes to it)."""

    def __init__(self, fd: int, pipe: int) -> None:
        self.fd, self.pipe = fd, pipe
        self.reads_on_ring = 0
        self.blocking_reads = 0

    def negotiated(self, init_flags, invalidate):
        pass

    def handlers(self):
        return {}

    def quick_handlers(self):
        return {codec.Read: self.read_now}

    def read_now(self, req):
        fd = self.pipe if req.nodeid == 3 else self.fd
        return ReadFrom(fd, req.offset, req.size, drop_cached=False,
                        read=functools.partial(self.read, fd, req.offset, req.size))

    def read(self, fd, offset, length):
        self.blocking_reads += 1
        return blocking_read(fd, offset, length)


@pytest.fixture
async def file_session(tmp_path):
    path = tmp_path / "dst"
    data = os.urandom(FILE_SIZE)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    pipe_r, pipe_w = os.pipe()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    fs = FileFs(fd, pipe_r)
    sess = Session(ours.detach(), fs)
    done = trio.Event()

    async def run():
        await sess.run()
        done.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            yield Kernel(theirs), fs, data, done, pipe_w
            theirs.close()  # end of file ends the session
            with trio.fail_after(5):
                await done.wait()
    finally:
        for each in (sess.fd, fd, pipe_r, pipe_w):
            os.close(each)


def read(kernel, offset, size, unique, nodeid=2):
    kernel.send(Opcode.READ, abi.read_in.pack(1, offset, size, 0, 0, 0, 0), unique=unique,
                nodeid=nodeid)


async def answers(kernel, count):
    with trio.fail_after(10):
        return {unique: (error, body) for unique, error, body in
                [await kernel.reply() for _ in range(count)]}


async def test_reads_are_answered_from_the_ring(file_session):
    kernel, fs, data, _, _ = file_session
    spans = [(offset, 4096) for offset in range(0, FILE_SIZE, 4096)] + [(1000, 20000)]
    for unique, (offset, size) in enumerate(spans, 1):
        read(kernel, offset, size, unique)
    got = await answers(kernel, len(spans))
    assert got == {u: (0, data[o:o + s]) for u, (o, s) in enumerate(spans, 1)}
    assert (fs.reads_on_ring, fs.blocking_reads) == (len(spans), 0)


async def test_short_and_failed_reads_are_answered_as_the_thread_path_does(file_session):
    """Past DST's end the ring's read is short: the blocking read pads it with zeros. A read
    the kernel refuses (a directory) gets its errno, as from the thread."""
    kernel, fs, data, _, _ = file_session
    read(kernel, FILE_SIZE - 100, 4096, 1)
    got = await answers(kernel, 1)
    assert got == {1: (0, data[-100:] + bytes(3996))}
    assert (fs.reads_on_ring, fs.blocking_reads) == (0, 1)
    fs.fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        read(kernel, 0, 4096, 2)
        assert await answers(kernel, 1) == {2: (errno.EISDIR, b"")}
    finally:
        os.close(fs.fd)


async def test_without_io_uring_reads_go_to_the_thread(file_session_without_ring):
    kernel, fs, data, _, _ = file_session_without_ring
    for unique in range(1, 9):
        read(kernel, unique * 4096, 4096, unique)
    got = await answers(kernel, 8)
    assert got == {u: (0, data[u * 4096:(u + 1) * 4096]) for u in range(1, 9)}
    assert (fs.reads_on_ring, fs.blocking_reads) == (0, 8)


def test_a_ring_that_cannot_be_mapped_is_unavailable(monkeypatch):
    """Out of descriptors (mmap dups the ring's) or address space, the session reads on its
    thread instead: a daemon that died of it had already told `mount` the image was ready."""
    def out_of_descriptors(*args, **kwargs):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(uring.mmap, "mmap", out_of_descriptors)
    with pytest.raises(uring.RingUnavailable, match="^its rings cannot be set up: Too many open files$"):
        uring.ReadRing()
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.fixture
async def file_session_without_ring(monkeypatch, caplog, tmp_path):
    def refused(*args, **kwargs):
        raise uring.RingUnavailable("io_uring is disabled (/proc/sys/kernel/io_uring_disabled)")

    monkeypatch.setattr(uring, "ReadRing", refused)
    caplog.set_level(logging.INFO, "fuseclone.fuse.session")
    async for each in file_session.__wrapped__(tmp_path):
        yield each
    said = [r.getMessage() for r in caplog.records if "io_uring" in r.getMessage()]
    assert said == ["reads from the destination go through a thread: io_uring is disabled "
                    "(/proc/sys/kernel/io_uring_disabled)"]


async def test_a_read_in_flight_when_the_session_ends_is_reaped_and_answered(file_session):
    """The ring is closed only once every read on it completed (the kernel writes into its
    buffer until then): the session waits for it (blocking: this loop is the session's), and
    answers it. Had it not waited, the read would have been cancelled, and its blocking read
    refused (a pipe has no offsets)."""
    kernel, fs, _, done, pipe_w = file_session
    read(kernel, 0, 5, 7, nodeid=3)  # waits in the ring until the pipe has data
    read(kernel, 0, 4096, 8)
    assert 8 in await answers(kernel, 1)
    writer = threading.Timer(0.5, os.write, (pipe_w, b"piped"))
    writer.start()
    kernel.send(Opcode.DESTROY, unique=9)
    with trio.fail_after(5):
        await done.wait()
    # The answer proves the session waited for the write; the timer's thread may still be
    # on its way out of os.write (is_alive() was seen True under load), so join it.
    writer.join(timeout=5)
    assert await answers(kernel, 2) == {9: (0, b""), 7: (0, b"piped")}
    assert fs.reads_on_ring == 2


async def test_reads_the_kernel_could_not_take_at_once_are_submitted_again(file_session, monkeypatch):
    """io_uring_enter may refuse new SQEs for a while (EAGAIN: short of memory; EBUSY: too many
    completions not yet reaped). They stay queued and are submitted again soon, even with
    nothing else in flight to wake the session (before, the error ended the session)."""
    kernel, fs, data, _, _ = file_session
    refusals = []
    enter = uring._syscall

    def refuse_twice(number, *args):
        if number == uring.SYS_IO_URING_ENTER and len(refusals) < 2:
            refusals.append(number)
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return enter(number, *args)

    monkeypatch.setattr(uring, "_syscall", refuse_twice)
    read(kernel, 4096, 4096, 1)
    assert await answers(kernel, 1) == {1: (0, data[4096:8192])}
    assert len(refusals) == 2 and fs.reads_on_ring == 1
