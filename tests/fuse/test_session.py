"""The trio session's dispatch rules, driven through a SOCK_SEQPACKET socket pair that stands in
for /dev/fuse (one message per read, like the device): INIT negotiation, ENOSYS, malformed
requests, handler bugs, INTERRUPT, FORGET, and how the session ends. Real mounts are tested in
tests/integration."""

import errno
import logging
import os
import socket
import threading
import tracemalloc

import pytest
import trio

from fuseclone.fuse import abi, codec
from fuseclone.fuse import session as session_module
from fuseclone.fuse.abi import Opcode
from fuseclone.fuse.backend import Blocking, Continue
from fuseclone.fuse.session import (MAX_QUEUED_JOBS, MAX_QUEUED_WAITING_JOBS, MAX_WRITE,
                                    READ_BUFFER_SIZE, WAITING_JOB_THREADS, WRITE_COPIED_BELOW,
                                    Session, negotiate)
from fuseclone.threads import in_thread, threads_working
from tests.fuse.test_codec import request


class SlowFs:
    """Answers GETATTR at once, READ after `release` is set, and STATFS with a bug."""

    def __init__(self):
        self.release = trio.Event()
        self.reads_started = 0
        self.cancelled = 0
        self.writes = []
        self.job_threads = set()
        self.jobs_may_finish = threading.Event()
        self.ran_on = {}  # request unique -> the thread that ran its job
        self.handed_on_ran_on = {}  # and the job it handed on
        self.reads_may_finish = threading.Event()
        self.writes_waiting = 0
        self.writes_may_finish: trio.Event | None = None  # when set: writes wait for it

    def negotiated(self, init_flags, invalidate):
        self.init_flags = init_flags

    def handlers(self):
        return {codec.GetAttr: self.getattr, codec.Read: self.read, codec.StatFs: self.statfs,
                codec.Write: self.write}

    def quick_handlers(self):
        return {codec.Read: self.read_now, codec.Write: self.write_now}

    def write_now(self, req):
        """Writes at 1 MiB go to a job thread (2 MiB: failing, 3 MiB: a bug; 5 MiB: a job that
        may wait for READs); others wait."""
        data = bytes(req.data)  # taken here: the job must still see the buffer's contents

        def job():
            self.ran_on[req.unique] = threading.get_ident()
            if req.offset != 4 << 20:  # 4 MiB: a job that does not wait
                self.jobs_may_finish.wait(5)
            if req.offset == 2 << 20:
                raise OSError(errno.ENOSPC, "full")
            if req.offset == 3 << 20:
                raise RuntimeError("a bug in a job")
            assert bytes(req.data) == data, "the request's buffer was reused before its answer"
            self.job_threads.add(threading.get_ident())
            self.writes.append(data)
            return codec.WriteReply(len(data))

        if req.offset in (1 << 20, 2 << 20, 3 << 20, 4 << 20):
            return Blocking(job)
        if req.offset == 5 << 20:
            return Blocking(job, waits_for_reads=True)
        if req.offset == 6 << 20:
            return Blocking(lambda: self.hand_on(req.unique, len(data)))
        return Continue(lambda: self.write(req))

    def hand_on(self, unique, length):
        """A job that hands on one that may wait for READs (a write's invalidation)."""
        self.ran_on[unique] = threading.get_ident()

        def then():
            self.handed_on_ran_on[unique] = threading.get_ident()
            return codec.WriteReply(length)

        return Blocking(then, waits_for_reads=True)

    def read_now(self, req):
        """Offset 4096 is answered at once, 8192 is refused at once, 1 MiB and up is read by a
        parallel job (2 MiB: one that waits for `reads_may_finish`), the rest waits."""
        if req.offset >= 1 << 20:
            return Blocking(lambda: self.parallel_read(req), parallel=True)
        if req.offset == 4096:
            return codec.DataReply(b"q" * req.size)
        if req.offset == 8192:
            raise OSError(errno.EIO, "quick failure")
        return Continue(lambda: self.read(req))

    def parallel_read(self, req):
        self.ran_on[req.unique] = threading.get_ident()
        if req.offset == 2 << 20:
            self.reads_may_finish.wait(5)
        return codec.DataReply(b"p" * req.size)

    async def getattr(self, req):
        return codec.AttrReply(codec.Attr(req.nodeid, 123, 0o100600), 1.0)

    async def read(self, req):
        self.reads_started += 1
        try:
            await self.release.wait()
        except trio.Cancelled:
            self.cancelled += 1
            raise
        return codec.DataReply(b"x" * req.size)

    async def write(self, req):
        await trio.sleep(0.01)  # answered after later requests reuse read buffers
        if self.writes_may_finish is not None:
            self.writes_waiting += 1
            await self.writes_may_finish.wait()
        self.writes.append(bytes(req.data))
        return codec.WriteReply(len(req.data))

    async def statfs(self, req):
        raise RuntimeError("a bug")


class Kernel:
    """The kernel's end of the pair."""

    def __init__(self, sock):
        self.sock = sock

    def send(self, opcode, body=b"", unique=1, nodeid=1):
        self.sock.send(request(opcode, body, unique=unique, nodeid=nodeid))

    async def send_when_room(self, opcode, body=b"", unique=1):
        while True:
            try:
                return self.send(opcode, body, unique)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)

    async def reply(self):
        await trio.lowlevel.wait_readable(self.sock)
        data = self.sock.recv(1 << 21)
        length, error, unique = abi.out_header.unpack_from(data)
        assert length == len(data)
        return unique, -error, data[abi.out_header.size:]


@pytest.fixture
async def session():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    fs = SlowFs()
    sess = Session(ours.detach(), fs)
    kernel = Kernel(theirs)
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def run():
            await sess.run()
            done.set()

        nursery.start_soon(run)
        yield kernel, fs, done
        theirs.close()  # end of file ends the session
        with trio.fail_after(5):
            await done.wait()
    os.close(sess.fd)


def test_negotiate_keeps_only_offered_flags():
    init = codec.Init(1, 0, 0, 0, 0, 7, 44, 1 << 20, abi.FUSE_ASYNC_READ | abi.FUSE_MAX_PAGES | abi.FUSE_WRITEBACK_CACHE)
    reply = negotiate(init)
    assert reply.minor == abi.KERNEL_MINOR_VERSION  # never more than the header we mirror
    assert reply.flags == abi.FUSE_ASYNC_READ | abi.FUSE_MAX_PAGES  # writeback cache only if asked
    cached = negotiate(init, writeback_cache=True)
    assert cached.flags == abi.FUSE_ASYNC_READ | abi.FUSE_MAX_PAGES | abi.FUSE_WRITEBACK_CACHE
    not_offered = codec.Init(1, 0, 0, 0, 0, 7, 44, 1 << 20, abi.FUSE_ASYNC_READ)
    assert negotiate(not_offered, writeback_cache=True).flags == abi.FUSE_ASYNC_READ
    assert reply.max_write == MAX_WRITE and reply.max_pages == MAX_WRITE // 4096
    old = negotiate(codec.Init(1, 0, 0, 0, 0, 7, 26, 4096, abi.FUSE_ASYNC_READ))
    assert old.minor == 26 and old.flags == abi.FUSE_ASYNC_READ
    with pytest.raises(OSError):
        negotiate(codec.Init(1, 0, 0, 0, 0, 6, 0, 0, 0))


def test_negotiate_shared_mmap_of_direct_io_opens_where_offered():
    offered = abi.FUSE_ASYNC_READ | abi.FUSE_INIT_EXT | abi.FUSE_DIRECT_IO_ALLOW_MMAP
    reply = negotiate(codec.Init(1, 0, 0, 0, 0, 7, 45, 1 << 20, offered))
    assert reply.flags == offered
    fields = abi.init_out.unpack(b"".join(codec.encode_reply(1, reply))[abi.out_header.size:])
    assert fields[10] == abi.FUSE_DIRECT_IO_ALLOW_MMAP >> 32  # flags2


def test_negotiate_passthrough_instead_of_the_writeback_cache():
    offered = (abi.FUSE_ASYNC_READ | abi.FUSE_WRITEBACK_CACHE | abi.FUSE_INIT_EXT
               | abi.FUSE_PASSTHROUGH)
    reply = negotiate(codec.Init(1, 0, 0, 0, 0, 7, 45, 1 << 20, offered), writeback_cache=True,
                      passthrough=True)
    # The kernel ignores FUSE_PASSTHROUGH next to FUSE_WRITEBACK_CACHE: the cache goes.
    assert reply.flags == abi.FUSE_ASYNC_READ | abi.FUSE_INIT_EXT | abi.FUSE_PASSTHROUGH
    assert (reply.minor, reply.max_stack_depth) == (abi.PASSTHROUGH_MINOR_VERSION, 1)
    fields = abi.init_out.unpack(b"".join(codec.encode_reply(1, reply))[abi.out_header.size:])
    assert fields[10:] == (abi.FUSE_PASSTHROUGH >> 32, 1)  # flags2, max_stack_depth
    # A kernel without passthrough: neither, and the protocol we mirror in full.
    older = negotiate(codec.Init(1, 0, 0, 0, 0, 7, 38, 1 << 20,
                                 abi.FUSE_ASYNC_READ | abi.FUSE_WRITEBACK_CACHE | abi.FUSE_INIT_EXT),
                      writeback_cache=True, passthrough=True)
    assert (older.flags, older.minor, older.max_stack_depth) == (
        abi.FUSE_ASYNC_READ | abi.FUSE_INIT_EXT, abi.KERNEL_MINOR_VERSION, 0)


async def test_a_refused_backing_file_leaves_every_request_to_the_daemon(caplog):
    class Fs(SlowFs):
        backing_ids = []

        def use_backing(self, backing_id):
            self.backing_ids.append(backing_id)

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fs = Fs()
    sess = Session(ours.detach(), fs, passthrough=True)
    try:
        with caplog.at_level(logging.WARNING):
            sess.register_backing(theirs.fileno())  # no FUSE device: the ioctl fails
        assert not sess.passthrough and fs.backing_ids == []
        assert "the daemon serves every read and write" in caplog.text
    finally:
        theirs.close()
        os.close(sess.fd)


async def test_handshake_answers_init():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sess = Session(ours.detach(), SlowFs())
    kernel = Kernel(theirs)
    kernel.send(Opcode.INIT, abi.init_in_head.pack(7, 38, 65536, abi.FUSE_ASYNC_READ) + bytes(48), unique=2)
    with trio.fail_after(5):
        await sess.handshake()
        unique, error, body = await kernel.reply()
    assert (unique, error) == (2, 0)
    assert abi.init_out.unpack(body)[:4] == (7, 38, 65536, abi.FUSE_ASYNC_READ)
    theirs.close()
    os.close(sess.fd)


async def test_requests_are_dispatched_concurrently(session):
    kernel, fs, _ = session
    kernel.send(Opcode.READ, abi.read_in.pack(1, 0, 10, 0, 0, 0, 0), unique=10, nodeid=2)
    kernel.send(Opcode.GETATTR, abi.getattr_in.pack(0, 0, 0), unique=11, nodeid=2)
    with trio.fail_after(5):
        unique, error, body = await kernel.reply()  # the getattr overtakes the blocked read
        assert (unique, error) == (11, 0)
        assert abi.attr.unpack_from(body, abi.attr_out_head.size)[1] == 123
        fs.release.set()
        unique, error, body = await kernel.reply()
    assert (unique, error, body) == (10, 0, b"x" * 10)


async def test_unserved_opcode_gets_enosys(session):
    kernel, _, _ = session
    kernel.send(Opcode.MKDIR, b"\0" * 16 + b"dir\0", unique=12)
    with trio.fail_after(5):
        assert (await kernel.reply())[:2] == (12, errno.ENOSYS)


async def test_malformed_request_gets_eio_and_the_session_goes_on(session):
    kernel, _, _ = session
    kernel.send(Opcode.READ, b"short", unique=13)
    kernel.send(Opcode.GETATTR, abi.getattr_in.pack(0, 0, 0), unique=14)
    with trio.fail_after(5):
        assert (await kernel.reply())[:2] == (13, errno.EIO)
        assert (await kernel.reply())[:2] == (14, 0)


async def test_a_bug_in_a_handler_is_logged_and_answered_eio(session, caplog):
    kernel, _, _ = session
    with caplog.at_level(logging.ERROR):
        kernel.send(Opcode.STATFS, unique=15)
        with trio.fail_after(5):
            assert (await kernel.reply())[:2] == (15, errno.EIO)
    assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records)


async def test_interrupt_cancels_the_request(session):
    kernel, fs, _ = session
    kernel.send(Opcode.READ, abi.read_in.pack(1, 0, 10, 0, 0, 0, 0), unique=20, nodeid=2)
    with trio.fail_after(5):
        while fs.reads_started == 0:
            await trio.sleep(0.001)
        kernel.send(Opcode.INTERRUPT, abi.interrupt_in.pack(20), unique=21)
        assert (await kernel.reply())[:2] == (20, errno.EINTR)
    assert fs.cancelled == 1


async def test_interrupt_of_an_answered_request_is_ignored(session):
    kernel, _, _ = session
    kernel.send(Opcode.INTERRUPT, abi.interrupt_in.pack(999), unique=22)
    kernel.send(Opcode.FORGET, abi.forget_in.pack(1), unique=23, nodeid=2)
    kernel.send(Opcode.GETATTR, abi.getattr_in.pack(0, 0, 0), unique=24)
    with trio.fail_after(5):
        assert (await kernel.reply())[:2] == (24, 0)  # nothing was sent for 22 and 23


async def test_write_data_survives_buffer_reuse(session):
    kernel, fs, _ = session
    payloads = [os.urandom(70000) for _ in range(20)]
    with trio.fail_after(10):
        for i, data in enumerate(payloads):
            body = abi.write_in.pack(1, 0, len(data), 0, 0, 0, 0) + data
            await kernel.send_when_room(Opcode.WRITE, body, unique=100 + i)
        answered = {(await kernel.reply())[0] for _ in payloads}
    assert answered == {100 + i for i in range(20)}
    assert sorted(fs.writes) == sorted(payloads)


async def test_blocking_jobs_answer_from_a_thread_while_the_loop_reads_on(session, caplog):
    kernel, fs, _ = session
    payloads = [os.urandom(70000) for _ in range(6)]
    with trio.fail_after(10):
        for i, data in enumerate(payloads):
            body = abi.write_in.pack(1, 1 << 20, len(data), 0, 0, 0, 0) + data
            await kernel.send_when_room(Opcode.WRITE, body, unique=60 + i)
        for unique, offset in ((70, 2 << 20), (71, 3 << 20)):
            body = abi.write_in.pack(1, offset, 5, 0, 0, 0, 0) + b"x" * 5
            await kernel.send_when_room(Opcode.WRITE, body, unique=unique)
        await kernel.send_when_room(Opcode.GETATTR, abi.getattr_in.pack(0, 0, 0), unique=72)
        # GETATTR, read after every write, is answered while the jobs wait: the loop goes on
        assert (await kernel.reply())[:2] == (72, 0)
        fs.jobs_may_finish.set()
        answers = {}
        for _ in range(len(payloads) + 2):
            unique, error, body = await kernel.reply()
            answers[unique] = error
    assert answers == {**{60 + i: 0 for i in range(6)}, 70: errno.ENOSPC, 71: errno.EIO}
    assert fs.writes == payloads  # one job thread: in the order they were read
    assert fs.job_threads and threading.get_ident() not in fs.job_threads
    assert "a bug in a job" in caplog.text


async def test_jobs_beyond_the_queue_bound_run_on_the_loop(session):
    """Each queued job holds its request's buffer: past MAX_QUEUED_JOBS, jobs run at once."""
    kernel, fs, _ = session
    with trio.fail_after(10):
        for i in range(MAX_QUEUED_JOBS):  # these wait in, or for, the job thread
            body = abi.write_in.pack(1, 1 << 20, 5, 0, 0, 0, 0) + b"q" * 5
            await kernel.send_when_room(Opcode.WRITE, body, unique=90 + i)
        body = abi.write_in.pack(1, 4 << 20, 5, 0, 0, 0, 0) + b"n" * 5
        await kernel.send_when_room(Opcode.WRITE, body, unique=99)
        assert (await kernel.reply())[:2] == (99, 0)  # answered while the others wait
        assert fs.ran_on[99] == threading.get_ident()  # on the event loop's thread
        fs.jobs_may_finish.set()
        answered = {(await kernel.reply())[0] for _ in range(MAX_QUEUED_JOBS)}
    assert answered == set(range(90, 90 + MAX_QUEUED_JOBS))
    assert threading.get_ident() not in {fs.ran_on[u] for u in answered}


async def test_jobs_that_may_wait_for_reads_never_run_on_the_loop(session):
    """An invalidation waits for READs in flight, which the loop answers: such a job runs on a
    thread of its own even when its queue is full, or it holds its request's buffer."""
    kernel, fs, _ = session
    with trio.fail_after(10):
        body = abi.write_in.pack(1, 1 << 20, 5, 0, 0, 0, 0) + b"o" * 5
        await kernel.send_when_room(Opcode.WRITE, body, unique=1000)  # holds the job thread
        waiting = range(1001, 1003 + MAX_QUEUED_WAITING_JOBS)
        for unique in waiting:
            data = b"b" * (WRITE_COPIED_BELOW if unique == waiting[-1] else 5)
            body = abi.write_in.pack(1, 5 << 20, len(data), 0, 0, 0, 0) + data
            await kernel.send_when_room(Opcode.WRITE, body, unique=unique)
        await kernel.send_when_room(Opcode.GETATTR, abi.getattr_in.pack(0, 0, 0), unique=999)
        assert (await kernel.reply())[:2] == (999, 0)  # the loop reads on
        fs.jobs_may_finish.set()
        answers = {unique: error for unique, error, _ in
                   [await kernel.reply() for _ in range(len(waiting) + 1)]}
    assert answers == {unique: 0 for unique in (1000, *waiting)}
    assert {fs.ran_on[u] for u in waiting}.isdisjoint({threading.get_ident(), fs.ran_on[1000]})


async def test_a_job_handed_on_runs_on_a_waiting_job_thread(session):
    """From the job thread, or from the loop when that thread is behind, it goes to a thread
    that answers no READ, which replies."""
    kernel, fs, _ = session
    loop = threading.get_ident()
    with trio.fail_after(10):
        body = abi.write_in.pack(1, 6 << 20, 5, 0, 0, 0, 0) + b"h" * 5
        kernel.send(Opcode.WRITE, body, unique=500)
        assert (await kernel.reply())[:2] == (500, 0)
        for i in range(MAX_QUEUED_JOBS):  # these wait in, or for, the job thread
            body = abi.write_in.pack(1, 1 << 20, 5, 0, 0, 0, 0) + b"q" * 5
            await kernel.send_when_room(Opcode.WRITE, body, unique=510 + i)
        body = abi.write_in.pack(1, 6 << 20, 5, 0, 0, 0, 0) + b"l" * 5
        kernel.send(Opcode.WRITE, body, unique=501)
        assert (await kernel.reply())[:2] == (501, 0)  # while the job thread is busy
        fs.jobs_may_finish.set()
        for _ in range(MAX_QUEUED_JOBS):
            assert (await kernel.reply())[1] == 0
    job_thread = fs.ran_on[510]
    assert fs.ran_on[500] == job_thread and fs.ran_on[501] == loop
    assert {fs.handed_on_ran_on[500], fs.handed_on_ran_on[501]}.isdisjoint({loop, job_thread})


async def test_the_session_ends_after_the_jobs_its_jobs_hand_on(session):
    kernel, fs, done = session
    body = abi.write_in.pack(1, 1 << 20, 5, 0, 0, 0, 0) + b"y" * 5
    kernel.send(Opcode.WRITE, body, unique=520)  # holds the job thread
    body = abi.write_in.pack(1, 6 << 20, 5, 0, 0, 0, 0) + b"h" * 5
    kernel.send(Opcode.WRITE, body, unique=521)
    kernel.send(Opcode.DESTROY, unique=522)
    with trio.fail_after(5):
        assert (await kernel.reply())[:2] == (522, 0)
        fs.jobs_may_finish.set()
        answers = {(await kernel.reply())[:2] for _ in range(2)}
        await done.wait()
    assert answers == {(520, 0), (521, 0)} and 521 in fs.handed_on_ran_on


def read(kernel, offset, unique, size=10):
    kernel.send(Opcode.READ, abi.read_in.pack(1, offset, size, 0, 0, 0, 0), unique=unique, nodeid=2)


async def test_parallel_jobs_run_beside_the_ordered_ones_and_answer_once(session):
    """Reads of data on disk do not wait behind a write job (nor the loop for them), and an
    INTERRUPT of one being read changes nothing: one answer each, with the data."""
    kernel, fs, _ = session
    body = abi.write_in.pack(1, 1 << 20, 5, 0, 0, 0, 0) + b"w" * 5
    kernel.send(Opcode.WRITE, body, unique=199)  # its job waits for jobs_may_finish
    uniques = range(200, 232, 2)
    for unique in uniques:
        read(kernel, 1 << 20, unique)
        kernel.send(Opcode.INTERRUPT, abi.interrupt_in.pack(unique), unique=unique + 1)
    kernel.send(Opcode.GETATTR, abi.getattr_in.pack(0, 0, 0), unique=300)
    with trio.fail_after(10):
        answers = [await kernel.reply() for _ in range(len(uniques) + 1)]
        with trio.move_on_after(0.2):  # nothing more: every request was answered once
            extra = await kernel.reply()
            pytest.fail(f"a second answer: {extra}")
        fs.jobs_may_finish.set()
        assert (await kernel.reply())[:2] == (199, 0)
    by_unique = {unique: (error, body) for unique, error, body in answers}
    assert by_unique.pop(300)[0] == 0  # GETATTR, read after them, did not wait for them
    assert by_unique == {u: (0, b"p" * 10) for u in uniques}
    assert {fs.ran_on[u] for u in uniques}.isdisjoint({threading.get_ident(), fs.ran_on[199]})


async def test_the_session_ends_after_its_parallel_jobs(session):
    kernel, fs, done = session
    read(kernel, 2 << 20, 400)
    kernel.send(Opcode.DESTROY, unique=401)
    with trio.fail_after(5):
        assert (await kernel.reply())[:2] == (401, 0)
        await trio.sleep(0.1)
        assert not done.is_set(), "the session ended with a read job still running"
        fs.reads_may_finish.set()
        assert await kernel.reply() == (400, 0, b"p" * 10)
        await done.wait()


async def test_the_session_ends_after_its_jobs(session):
    """A job still running when the kernel ends the session is not abandoned: the session's
    nursery waits for the job thread, whose reply is then sent, before the session returns."""
    kernel, fs, done = session
    body = abi.write_in.pack(1, 1 << 20, 5, 0, 0, 0, 0) + b"y" * 5
    kernel.send(Opcode.WRITE, body, unique=80)
    kernel.send(Opcode.DESTROY, unique=81)
    with trio.fail_after(5):
        assert (await kernel.reply())[:2] == (81, 0)
        await trio.sleep(0.1)
        assert not done.is_set(), "the session ended with a job still running"
        fs.jobs_may_finish.set()
        assert (await kernel.reply())[:2] == (80, 0)
        await done.wait()
    assert fs.writes == [b"y" * 5]


async def test_the_session_ends_after_its_jobs_that_may_wait_for_reads(session):
    """Such jobs still running, or queued behind them, when the kernel ends the session are
    all run and answered before the session returns (their threads are told to stop)."""
    kernel, fs, done = session
    waiting = range(90, 92 + WAITING_JOB_THREADS)
    for unique in waiting:
        body = abi.write_in.pack(1, 5 << 20, 5, 0, 0, 0, 0) + b"z" * 5
        kernel.send(Opcode.WRITE, body, unique=unique)
    kernel.send(Opcode.DESTROY, unique=89)
    with trio.fail_after(5):
        assert (await kernel.reply())[:2] == (89, 0)
        await trio.sleep(0.1)
        assert not done.is_set(), "the session ended with jobs still running"
        fs.jobs_may_finish.set()
        answers = {unique: error for unique, error, _ in
                   [await kernel.reply() for _ in waiting]}
        await done.wait()
    assert answers == {unique: 0 for unique in waiting}


async def test_destroy_ends_the_session(session):
    kernel, _, done = session
    kernel.send(Opcode.DESTROY, unique=30)
    with trio.fail_after(5):
        assert (await kernel.reply())[:2] == (30, 0)
        await done.wait()


async def test_a_read_blocked_when_the_session_ends_is_cancelled(session):
    kernel, fs, done = session
    kernel.send(Opcode.READ, abi.read_in.pack(1, 0, 10, 0, 0, 0, 0), unique=40, nodeid=2)
    with trio.fail_after(5):
        while fs.reads_started == 0:
            await trio.sleep(0.001)
        kernel.send(Opcode.DESTROY, unique=41)
        await done.wait()
    assert fs.cancelled == 1


async def test_small_writes_waiting_in_tasks_hold_no_read_buffer(session):
    """Small writes that wait in tasks (writeback's 4 KiB pages waiting for META, up to
    max_background of them) hold their data, not a 1 MiB read buffer each: that was 70 MiB
    of a 1 TiB clone's daemon (benchmark row 6)."""
    kernel, fs, _ = session
    fs.writes_may_finish = trio.Event()
    payloads = [os.urandom(4096) for _ in range(32)]
    tracemalloc.start()
    try:
        with trio.fail_after(10):
            for i, data in enumerate(payloads):
                body = abi.write_in.pack(1, (8 << 20) + i * 4096, len(data), 0, 0, 0, 0) + data
                await kernel.send_when_room(Opcode.WRITE, body, unique=100 + i)
            while fs.writes_waiting < len(payloads):
                await trio.sleep(0.01)
            held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    fs.writes_may_finish.set()
    with trio.fail_after(10):
        answered = {(await kernel.reply())[0] for _ in payloads}
    assert answered == {100 + i for i in range(len(payloads))}
    assert sorted(fs.writes) == sorted(payloads)
    assert held < 4 * READ_BUFFER_SIZE, f"{held >> 20} MiB held by {len(payloads)} writes of 4 KiB"


async def test_quick_handlers_answer_without_a_task_and_fall_back(session):
    kernel, fs, _ = session
    kernel.send(Opcode.READ, abi.read_in.pack(1, 0, 10, 0, 0, 0, 0), unique=50, nodeid=2)  # waits
    kernel.send(Opcode.READ, abi.read_in.pack(1, 4096, 5, 0, 0, 0, 0), unique=51, nodeid=2)
    kernel.send(Opcode.READ, abi.read_in.pack(1, 8192, 5, 0, 0, 0, 0), unique=52, nodeid=2)
    with trio.fail_after(5):
        assert await kernel.reply() == (51, 0, b"qqqqq")
        assert (await kernel.reply())[:2] == (52, errno.EIO)
        assert fs.reads_started == 1  # only the read the quick handler declined became a task
        fs.release.set()
        assert await kernel.reply() == (50, 0, b"x" * 10)


async def test_interrupt_right_behind_its_request_is_not_lost(session):
    kernel, fs, _ = session
    for unique in range(60, 100, 2):  # both sit in the queue before the read's task starts
        kernel.send(Opcode.READ, abi.read_in.pack(1, 0, 10, 0, 0, 0, 0), unique=unique, nodeid=2)
        kernel.send(Opcode.INTERRUPT, abi.interrupt_in.pack(unique), unique=unique + 1)
    with trio.fail_after(5):
        answers = [await kernel.reply() for _ in range(20)]
    assert sorted(a[:2] for a in answers) == [(u, errno.EINTR) for u in range(60, 100, 2)]


def count_sleeps(monkeypatch):
    """How many times the session slept in epoll for its next request."""
    sleeps = []
    wait = Session._wait_for_request

    async def counted(self):
        sleeps.append(1)
        await wait(self)

    monkeypatch.setattr(Session, "_wait_for_request", counted)
    return sleeps


def widen_polling_bounds(monkeypatch):
    """Wider than the daemon's: a test's own gaps on a loaded machine are longer than a
    kernel's."""
    monkeypatch.setattr(session_module, "SPIN_SECONDS", 0.05)
    monkeypatch.setattr(session_module, "SPIN_AFTER_GAPS_UNDER", 0.5)
    monkeypatch.setattr(session_module, "_cpu_to_spare", lambda: True)  # however loaded CI is


async def getattr_chain(kernel, first_unique, length):
    """Each GETATTR sent as soon as the one before is answered, like a reader at iodepth 1."""
    for unique in range(first_unique, first_unique + length):
        kernel.send(Opcode.GETATTR, abi.getattr_in.pack(0, 0, 0), unique=unique)
        assert (await kernel.reply())[:2] == (unique, 0)


async def test_a_chain_of_requests_is_polled_for_not_slept_for(session, monkeypatch):
    kernel, _, _ = session
    widen_polling_bounds(monkeypatch)
    sleeps = count_sleeps(monkeypatch)
    with trio.fail_after(10):
        await getattr_chain(kernel, 200, 50)
    # Without polling every request after the first would be slept for
    assert len(sleeps) <= 5, f"slept for {len(sleeps)} of 50 requests"


async def slept_for_a_chain(kernel, sleeps, first_unique):
    """How many of 20 chained requests the session slept for (SLEEPS: count_sleeps's list),
    after a chain of 5 turned polling on."""
    await getattr_chain(kernel, first_unique, 5)
    sleeps.clear()
    await getattr_chain(kernel, first_unique + 5, 20)
    return len(sleeps)


async def test_no_polling_while_a_job_thread_or_a_worker_thread_works(session, monkeypatch):
    """The polling loop would keep the GIL from a thread that needs it."""
    kernel, fs, _ = session
    widen_polling_bounds(monkeypatch)
    sleeps = count_sleeps(monkeypatch)
    with trio.fail_after(10):
        body = abi.write_in.pack(1, 1 << 20, 5, 0, 0, 0, 0) + b"j" * 5
        kernel.send(Opcode.WRITE, body, unique=300)  # waits in the job thread
        assert await slept_for_a_chain(kernel, sleeps, 301) >= 20
        fs.jobs_may_finish.set()
        assert (await kernel.reply())[:2] == (300, 0)

        working, done = trio.Event(), threading.Event()
        async with trio.open_nursery() as nursery:
            async def in_a_worker():
                working.set()
                await in_thread(done.wait, 5)

            nursery.start_soon(in_a_worker)
            await working.wait()
            assert await slept_for_a_chain(kernel, sleeps, 400) >= 20
            done.set()


async def test_resident_threads_do_not_count_as_working():
    assert not threads_working()
    started, stop = trio.Event(), threading.Event()
    async with trio.open_nursery() as nursery:
        async def resident():
            started.set()
            await in_thread(stop.wait, 5, resident=True)

        nursery.start_soon(resident)
        await started.wait()
        await trio.sleep(0.01)
        assert not threads_working()
        assert await in_thread(threads_working) is True  # counted while it runs
        stop.set()
    assert not threads_working()


async def test_no_polling_without_a_cpu_to_spare(session, monkeypatch):
    """Polling would take CPU from runnable tasks that wait for one (a database's backends)."""
    kernel, _, _ = session
    widen_polling_bounds(monkeypatch)
    sleeps = count_sleeps(monkeypatch)
    with trio.fail_after(10):
        assert await slept_for_a_chain(kernel, sleeps, 200) <= 5  # it polls with one to spare
        monkeypatch.setattr(session_module, "_cpu_to_spare", lambda: False)
        assert await slept_for_a_chain(kernel, sleeps, 300) >= 20


@pytest.mark.parametrize("running, ours, spare", [(1, 4, True), (4, 4, True), (5, 4, False),
                                                 (1, 1, True), (2, 1, False), (3, 2, False)])
def test_cpu_to_spare_compares_the_running_tasks_with_the_cpus(tmp_path, monkeypatch, running,
                                                               ours, spare):
    """Of a machine's 4 CPUs, the daemon may run on OURS (taskset, a cpuset: its affinity
    mask). Compared with all 4, a daemon pinned to one CPU polled beside a busy task that
    wanted that CPU."""
    loadavg = tmp_path / "loadavg"
    loadavg.write_text(f"0.52 0.61 0.70 {running}/345 12345\n")
    fd = os.open(loadavg, os.O_RDONLY)
    try:
        monkeypatch.setattr(session_module, "_loadavg_fd", fd)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(ours)))
        monkeypatch.setattr(session_module, "_cpus", session_module._count_cpus())
        assert session_module._cpu_to_spare() is spare
    finally:
        os.close(fd)


def test_cpu_to_spare_counts_the_cpus_once(monkeypatch):
    """The affinity mask is a syscall (os.cpu_count() read /sys, 15 us): not at every gap of a
    chain."""
    counted = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: counted.append(1) or set(range(4)))
    monkeypatch.setattr(session_module, "_loadavg_fd", None)  # opened afresh
    monkeypatch.setattr(session_module, "_cpus", 1, raising=False)
    try:
        for _ in range(3):
            session_module._cpu_to_spare()
        assert len(counted) == 1
        assert session_module._cpus == 4
    finally:
        os.close(session_module._loadavg_fd)


def test_cpu_to_spare_reads_this_machines_running_tasks(monkeypatch):
    monkeypatch.setattr(session_module, "_loadavg_fd", None)  # opened afresh
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(1 << 20)))
    try:
        assert session_module._cpu_to_spare() is True
    finally:
        os.close(session_module._loadavg_fd)


async def test_a_reply_the_kernel_refuses_from_a_job_thread_is_answered_eio(
        session, monkeypatch, caplog):
    """A reply the kernel refused (EINVAL: a bug in its encoding) raised in the job thread and
    ended the whole session. Now it is logged, the request answered EIO, and the jobs go on."""
    kernel, fs, _ = session
    send = Session._send

    def refusing_80(self, parts):
        length, error, unique = abi.out_header.unpack_from(b"".join(bytes(p) for p in parts))
        if unique == 80 and not error:
            raise OSError(errno.EINVAL, "Invalid argument")
        send(self, parts)

    monkeypatch.setattr(Session, "_send", refusing_80)
    with trio.fail_after(10):
        for unique in (80, 81):
            body = abi.write_in.pack(1, 4 << 20, 5, 0, 0, 0, 0) + b"j" * 5
            await kernel.send_when_room(Opcode.WRITE, body, unique=unique)
        answers = dict([(await kernel.reply())[:2] for _ in range(2)])
    assert answers == {80: errno.EIO, 81: 0}
    assert "the kernel refused the reply to request 80" in caplog.text
