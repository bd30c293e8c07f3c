"""The FUSE session on trio: mount, negotiate INIT, read requests from /dev/fuse, run each as
its own task, write the replies, honour INTERRUPT, and unmount when the session ends.

The session knows the protocol, not the filesystem: every request other than INIT, DESTROY,
FORGET and INTERRUPT goes to the handler the filesystem registered for its type, which returns
a `codec.Reply` or raises OSError(errno). A quick handler (READ, WRITE) decides once, on the
event loop, how its request is answered: now, by a job on a thread (`backend.Blocking`), by a
task (`backend.Continue`), or from a read of a file range on the session's io_uring
(`backend.ReadFrom`, answered when its completion is reaped; on a thread where io_uring is
unavailable).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import queue
import select
import threading
import time
from typing import Awaitable, Callable, Mapping, Protocol

import trio

from .. import uring
from ..threads import in_thread, threads_working
from . import abi, codec
from .backend import Blocking, Continue, QuickAnswer, ReadFrom
from .mount import (CoveredError, MountEntry, check_clone_on_top, mount_entries, mount_fuse,
                    places_of, set_dirty_limit, top_mount, unmount)

log = logging.getLogger(__name__)

MAX_WRITE = 1 << 20  # FUSE_MAX_PAGES lets the kernel send 1 MiB reads and writes
MAX_PAGES = MAX_WRITE // 4096
# A read from /dev/fuse must have room for the largest request: header + write_in + data.
READ_BUFFER_SIZE = MAX_WRITE + 64 * 1024
MAX_BACKGROUND = 64
KEPT_BUFFERS = 16
# A write smaller than this is copied out of its read buffer before it is dispatched, and the
# buffer goes back at once: writeback sends single 4 KiB pages, up to MAX_BACKGROUND of them at
# a time, and when they waited in tasks for META's write-ahead each held a whole buffer (70 MiB
# of a 1 TiB clone's daemon). The copy is a few microseconds at most; larger writes keep theirs.
WRITE_COPIED_BELOW = 64 << 10
MAX_READS_WITHOUT_WAIT = 16
# Requests that come in chains (a reader at iodepth 1, a commit's writes and flushes) arrive
# soon after the answer before them. Sleeping in epoll between them costs a wakeup each, and
# the request's sender waits for it: polling /dev/fuse a little longer first took cold 4 KiB
# reads at iodepth 1 from 3.0-3.5k to 4.4-5.0k IOPS (docs/benchmark/spin.md). Only after a
# short gap (as the kernel's haltpoll does: a gap slept through is longer than one polled, by
# the wakeup, hence the wider bound), only while no worker thread needs the GIL, which the
# polling loop would hold most of the time, and only with a CPU to spare (`_cpu_to_spare`).
SPIN_SECONDS = 200e-6
SPIN_AFTER_GAPS_UNDER = 1e-3  # seconds: a gap this short, even slept through, turns polling on

WANTED_INIT_FLAGS = (abi.FUSE_ASYNC_READ | abi.FUSE_BIG_WRITES | abi.FUSE_MAX_PAGES
                     | abi.FUSE_ASYNC_DIO | abi.FUSE_PARALLEL_DIROPS)

# Jobs waiting for the job thread hold their request buffers (up to 1 MiB each): beyond this
# many, a job runs on the loop instead, which bounds that memory and holds the kernel back.
MAX_QUEUED_JOBS = 8
# Parallel jobs (reads from DST) hold no request buffer: their bound only holds the kernel back.
# One thread: the page-cache probe that missed has already started the disk's read, so one
# thread waiting for each in turn keeps a queue depth of 16 at the disk. More threads only
# fought over the GIL: cold 4 KiB reads at iodepth 16 ran at 22k IOPS with 1, 17k with 2 and
# 11-13k with 24 (raw loop 55-58k, 2 vCPUs).
PARALLEL_JOB_THREADS = 1
MAX_QUEUED_PARALLEL_JOBS = 4 * MAX_BACKGROUND
# Threads for the jobs that may wait for READs in flight (a direct write answered after an
# invalidation of its range): one waiting for a READ from a slow source leaves the others.
WAITING_JOB_THREADS = 2
# Those jobs hold no request buffer (a write's that does waits in a task instead): their bound
# only holds the kernel back.
MAX_QUEUED_WAITING_JOBS = 4 * MAX_BACKGROUND
# Reads on the io_uring at once; beyond, they go to the parallel job thread (the kernel's
# MAX_BACKGROUND and its synchronous readers keep far fewer in flight).
MAX_RING_READS = 4 * MAX_BACKGROUND
# How soon reads the kernel would not take (io_uring_enter's EAGAIN or EBUSY) are submitted again
SUBMIT_RETRY_SECONDS = 0.001


Handler = Callable[[codec.Request], Awaitable[codec.Reply]]
QuickHandler = Callable[[codec.Request], QuickAnswer]


class Filesystem(Protocol):
    def handlers(self) -> Mapping[type, Handler]:
        """Request type -> async handler. Types without a handler are answered ENOSYS."""

    def quick_handlers(self) -> Mapping[type, QuickHandler]:
        """Request type -> synchronous handler that answers at once (a Reply), hands a blocking
        job over (`Blocking`: any thread may run it), or a continuation (`Continue`) over."""

    def negotiated(self, init_flags: int, invalidate: Callable[[int, int, int], None]) -> None:
        """INIT settled on `init_flags`; `invalidate(nodeid, offset, length)` drops cached pages
        of a range (blocking: never call it on the event loop)."""

    def use_backing(self, backing_id: int) -> None:
        """Passthrough was negotiated and the backing file registered (only called when
        `serve` was given one)."""

    reads_on_ring: int  # the session counts here the READs it answered from its io_uring


async def serve(fs: Filesystem, mountpoint: str, *, fsname: str, allow_other: bool = False,
                use_fusermount: bool | None = None, write_cache: int = 0,
                passthrough_fd: int | None = None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Mount `fs` at `mountpoint` and serve it until it is unmounted (returns) or the caller is
    cancelled (unmounts, then re-raises). `task_status.started()` fires once INIT is answered,
    so the filesystem can be used as soon as `nursery.start(serve, ...)` returns; it hands over
    the mount's id in mountinfo (what `check_clone_on_top` wants before an unmount).

    `write_cache` > 0 turns on the kernel's writeback cache: writes are acknowledged from the
    page cache, reach the filesystem when written back (at the latest on fsync, close, or
    memory pressure), and up to `write_cache` bytes may wait there.

    `passthrough_fd` (a regular file, instead of the write cache: the kernel refuses the two
    together) asks for FUSE passthrough: if the kernel offers it, the file is registered as a
    backing file and `fs.use_backing(backing_id)` is called before `started()`, so opens can
    send their reads and writes straight to it."""
    real_mountpoint = os.path.realpath(mountpoint)
    fd = mount_fuse(mountpoint, fsname=fsname, allow_other=allow_other,
                    use_fusermount=use_fusermount)
    session = Session(fd, fs, writeback_cache=write_cache > 0,
                      passthrough=passthrough_fd is not None)
    mount_id = device = None
    # From here on whatever fails (reading mountinfo with no descriptor left, say) unmounts:
    # a mount left without its daemon would only answer ENOTCONN.
    try:
        mounted = top_mount(real_mountpoint)  # ours: mount(2) has just put it there
        if mounted is not None:
            mount_id, device = mounted.mount_id, mounted.device
        if write_cache and not set_dirty_limit(real_mountpoint, write_cache):
            log.info("%s: the kernel's dirty limit for FUSE mounts applies (about 1%% of the "
                     "system's): raising it needs root and Linux 6.2", mountpoint)
        await session.handshake()
        if passthrough_fd is not None:
            session.register_backing(passthrough_fd)
        task_status.started(mount_id)
        await session.run()
    finally:
        session.close(mountpoint, real_mountpoint, mount_id, device, fsname)


def negotiate(init: codec.Init, *, writeback_cache: bool = False,
              passthrough: bool = False) -> codec.InitReply:
    """The INIT answer: protocol 7.x at most our header's minor, and the features fuseclone
    wants among those the kernel offers. Passthrough is 7.40's: asked for, and offered, it
    makes the answer 7.40 and excludes the writeback cache."""
    if init.major < abi.KERNEL_VERSION:
        raise OSError(errno.EPROTO, f"kernel FUSE protocol {init.major}.{init.minor} is too old")
    # flags2 bits: FUSE_INIT_EXT says flags2 is there
    wanted = WANTED_INIT_FLAGS | abi.FUSE_INIT_EXT | abi.FUSE_DIRECT_IO_ALLOW_MMAP
    if passthrough:
        wanted |= abi.FUSE_PASSTHROUGH
    elif writeback_cache:
        wanted |= abi.FUSE_WRITEBACK_CACHE
    flags = init.flags & wanted
    ours = abi.PASSTHROUGH_MINOR_VERSION if flags & abi.FUSE_PASSTHROUGH else abi.KERNEL_MINOR_VERSION
    return codec.InitReply(
        minor=min(init.minor, ours) if init.major == abi.KERNEL_VERSION else ours,
        max_readahead=init.max_readahead, flags=flags, max_background=MAX_BACKGROUND,
        congestion_threshold=MAX_BACKGROUND * 3 // 4, max_write=MAX_WRITE, max_pages=MAX_PAGES,
        max_stack_depth=abi.PASSTHROUGH_STACK_DEPTH if flags & abi.FUSE_PASSTHROUGH else 0)


def open_backing(dev_fd: int, file_fd: int) -> int:
    """Register `file_fd` with the FUSE connection of `dev_fd` as a passthrough backing file
    (FUSE_DEV_IOC_BACKING_OPEN; the kernel wants CAP_SYS_ADMIN and a regular file on a
    filesystem that stacks on nothing). Returns its backing id; raises OSError."""
    request = bytearray(abi.backing_map.pack(file_fd, 0, 0))
    return fcntl.ioctl(dev_fd, abi.FUSE_DEV_IOC_BACKING_OPEN, request, True)


class Session:
    def __init__(self, fd: int, fs: Filesystem, *, writeback_cache: bool = False,
                 passthrough: bool = False) -> None:
        self.fd = fd
        self.fs = fs
        self.writeback_cache = writeback_cache
        self.passthrough = passthrough  # asked for; after INIT: negotiated
        self._handlers = dict(fs.handlers())
        self._quick_handlers = dict(fs.quick_handlers())
        self._in_flight: dict[int, trio.CancelScope] = {}
        self._free_buffers: list[bytearray] = []
        self._reads_without_wait = 0
        self._idle_since: float | None = None  # when /dev/fuse was last found empty
        self._spin = False  # whether the last gap between requests was short enough to poll
        self._polling = False  # whether this gap is polled for
        self._jobs = _JobQueue(threads=1, slots=MAX_QUEUED_JOBS)
        self._parallel_jobs = _JobQueue(threads=PARALLEL_JOB_THREADS, slots=MAX_QUEUED_PARALLEL_JOBS)
        self._waiting_jobs = _JobQueue(threads=WAITING_JOB_THREADS, slots=MAX_QUEUED_WAITING_JOBS)
        self._job_queues = (self._jobs, self._parallel_jobs, self._waiting_jobs)
        self._waiting_threads = trio.CapacityLimiter(WAITING_JOB_THREADS)  # when that one is full
        self._ring_reads: uring.Reads | None = None  # while `run` serves, if io_uring works here
        self._reaper_wait = trio.CancelScope()  # the ring reaper's wait for completions
        os.set_blocking(fd, False)

    # ---- reading and writing /dev/fuse --------------------------------------------------------

    async def _read_request(self) -> tuple[codec.Request, bytearray] | None:
        """The next request and the buffer it lives in; None once the kernel ends the session.
        A malformed request is answered EIO here and skipped."""
        while True:
            buf = self._free_buffers.pop() if self._free_buffers else bytearray(READ_BUFFER_SIZE)
            try:
                # Read first, wait only when nothing is queued: under load this drains several
                # requests per wakeup instead of paying an epoll round for each.
                if self._reads_without_wait >= MAX_READS_WITHOUT_WAIT:
                    self._reads_without_wait = 0
                    self._submit_reads()
                    await trio.lowlevel.checkpoint()  # let the answering tasks run
                n = os.readv(self.fd, [buf])
                self._reads_without_wait += 1
                self._idle_since = None
            except BlockingIOError:
                self._give_back(buf)
                self._reads_without_wait = 0
                self._submit_reads()  # one io_uring_enter for the reads of this batch
                if self._spinning():
                    os.sched_yield()  # to other processes on this CPU, if any want it
                    await trio.lowlevel.checkpoint()  # to the answering tasks and the reaper
                else:
                    await self._wait_for_request()
                continue
            except OSError as exc:
                self._give_back(buf)
                if exc.errno in (errno.EINTR, errno.ENOENT):  # ENOENT: the request was aborted
                    continue
                if exc.errno == errno.ENODEV:  # unmounted
                    return None
                raise
            if n == 0:  # end of file: only a socket standing in for /dev/fuse does this
                self._give_back(buf)
                return None
            try:
                return codec.parse_request(memoryview(buf)[:n]), buf
            except codec.MalformedRequest as exc:
                self._give_back(buf)
                log.error("%s", exc)
                if exc.unique is not None:
                    self._send(codec.encode_error(exc.unique, errno.EIO))

    def _spinning(self) -> bool:
        """Whether to look at /dev/fuse again at once rather than sleep (SPIN_SECONDS)."""
        now = time.perf_counter()
        if self._idle_since is None:
            self._idle_since = now
            self._polling = self._spin and _cpu_to_spare()
        return (self._polling and now - self._idle_since < SPIN_SECONDS and not threads_working()
                and not any(jobs.busy for jobs in self._job_queues))

    async def _wait_for_request(self) -> None:
        await trio.lowlevel.wait_readable(self.fd)
        assert self._idle_since is not None
        self._spin = time.perf_counter() - self._idle_since < SPIN_AFTER_GAPS_UNDER

    def _give_back(self, buf: bytearray) -> None:
        if len(self._free_buffers) < KEPT_BUFFERS:
            self._free_buffers.append(buf)

    def _send(self, parts: list) -> None:
        try:
            os.writev(self.fd, parts)
        except OSError as exc:
            # ENOENT: the kernel gave up on the request (interrupted or aborted) meanwhile
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                raise

    def invalidate(self, nodeid: int, offset: int, length: int) -> None:
        """Drop the kernel's cached pages of `length` bytes at `offset` of `nodeid`
        (FUSE_NOTIFY_INVAL_INODE). Blocking, and never on the event loop: the kernel waits
        there for pages that reads in flight hold locked, and this loop answers those reads."""
        try:
            os.writev(self.fd, codec.encode_inval_inode(nodeid, offset, length))
        except OSError as exc:
            # ENOENT: the kernel holds no such inode, so nothing of it is cached; ENODEV: gone
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                raise

    # ---- the session ------------------------------------------------------------------------

    async def handshake(self) -> None:
        """Answer INIT, the first request of every session."""
        while True:
            got = await self._read_request()
            if got is None:
                raise OSError(errno.ENODEV, "unmounted before INIT")
            req, buf = got
            self._give_back(buf)
            if isinstance(req, codec.Init):
                try:
                    reply = negotiate(req, writeback_cache=self.writeback_cache,
                                      passthrough=self.passthrough)
                except OSError as exc:
                    self._send(codec.encode_error(req.unique, exc.errno))
                    raise
                self._send(codec.encode_reply(req.unique, reply))
                log.debug("FUSE %d.%d, flags %#x", req.major, req.minor, reply.flags)
                if req.major == abi.KERNEL_VERSION:
                    self._note_passthrough(reply)
                    self.fs.negotiated(reply.flags, self.invalidate)
                    return
                # a newer major: the kernel sends INIT again for our version
            elif req.expects_reply:
                self._send(codec.encode_error(req.unique, errno.EIO))

    def _note_passthrough(self, reply: codec.InitReply) -> None:
        if self.passthrough and not reply.flags & abi.FUSE_PASSTHROUGH:
            log.warning("the kernel offers no FUSE passthrough (Linux 6.9 or later with "
                        "CONFIG_FUSE_PASSTHROUGH): the daemon serves every read and write")
            self.passthrough = False

    def register_backing(self, file_fd: int) -> None:
        """After INIT: if passthrough was negotiated, register `file_fd` as the backing file
        and hand its id to the filesystem; if the kernel refuses it, say why and go on
        without (every request then comes to the daemon, as without passthrough)."""
        if not self.passthrough:
            return
        try:
            backing_id = open_backing(self.fd, file_fd)
        except OSError as exc:
            log.warning("the kernel refused FUSE passthrough to the destination (%s): the "
                        "daemon serves every read and write", os.strerror(exc.errno))
            self.passthrough = False
            return
        log.info("FUSE passthrough: opens of the image read and write the destination "
                 "directly (backing id %d)", backing_id)
        self.fs.use_backing(backing_id)

    async def run(self) -> None:
        """Serve requests until the kernel ends the session (unmount or DESTROY)."""
        # The job threads' nursery is not cancelled when the session ends: a job handed over
        # must still run and answer (its thread may not even have started yet). One thread for
        # the jobs that run in order (writes): a second did not copy faster (ext4 serialises
        # buffered writes to a file); another for reads from disk, which need not wait for them.
        # They have a limiter of their own: trio's default one is for the engine's threads.
        queues = self._job_queues
        threads = trio.CapacityLimiter(sum(jobs.threads for jobs in queues))
        async with trio.open_nursery() as job_threads:
            for jobs in queues:
                for _ in range(jobs.threads):
                    job_threads.start_soon(functools.partial(
                        in_thread, self._run_jobs, jobs, limiter=threads, resident=True))
            try:
                async with trio.open_nursery() as nursery:
                    self._open_ring(nursery)
                    await self._serve_requests(nursery)
                    nursery.cancel_scope.cancel()  # the kernel is gone: nobody waits for answers
            finally:
                self._close_ring()
                # the job threads finish what they hold, then return (the waiting-job ones
                # once the job thread of writes has: see _run_jobs)
                for jobs in (self._jobs, self._parallel_jobs):
                    jobs.stop()

    async def _serve_requests(self, nursery: trio.Nursery) -> None:
        while True:
            got = await self._read_request()
            if got is None:
                return
            req, buf = got
            if isinstance(req, codec.Interrupt):
                self._interrupt(req.target)
            elif isinstance(req, codec.Destroy):
                self._send(codec.encode_reply(req.unique, codec.EmptyReply()))
                return
            elif not req.expects_reply:  # FORGET, BATCH_FORGET: nodes here are static
                pass
            else:
                if isinstance(req, codec.Write) and len(req.data) < WRITE_COPIED_BELOW:
                    req.data = memoryview(bytes(req.data))  # see WRITE_COPIED_BELOW
                    self._give_back(buf)
                    buf = None
                answer = self._answer_now(req, buf)
                if answer is _HANDED_OVER:  # the job thread answers it and gives `buf` back
                    continue
                if answer is not _ANSWERED:
                    # Registered before the task starts: an INTERRUPT read right after its
                    # request must find it.
                    scope = self._in_flight[req.unique] = trio.CancelScope()
                    if isinstance(req, codec.Write) and buf is not None:
                        # its data stays in `buf` until answered
                        nursery.start_soon(self._answer, req, answer, scope, buf)
                        continue
                    nursery.start_soon(self._answer, req, answer, scope, None)
            if buf is not None:
                self._give_back(buf)

    def _run_jobs(self, jobs: "_JobQueue") -> None:
        """A job thread: run handed-over blocking jobs and send their replies, until told to
        stop."""
        try:
            while (item := jobs.queue.get()) is not None:
                unique, blocking, buf, slotted = item
                try:
                    self._run_job(unique, blocking)
                finally:
                    if slotted:
                        jobs.slots.release()
                    jobs.done()
                    if buf is not None:
                        self._give_back(buf)
        finally:
            if jobs is self._jobs:
                # Its only thread: no job hands one on from now on (the loop has stopped too),
                # so the waiting-job threads may stop, behind what they were handed.
                self._waiting_jobs.stop()

    def _run_job(self, unique: int, blocking: Blocking) -> None:
        """Run a job here and send its answer. One it hands on (see Blocking) goes to the
        waiting-job threads, past their queue's bound if need be (each is a request the kernel
        waits for, which bounds them): neither here nor in a task, which only the loop starts."""
        got = _job_reply(unique, blocking)
        if isinstance(got, Blocking):
            slotted = self._waiting_jobs.slots.acquire(blocking=False)
            self._waiting_jobs.put((unique, got, None, slotted))
        else:
            self._send_job_reply(unique, got)

    def _send_job_reply(self, unique: int, reply: list) -> None:
        """A reply the kernel refuses (a bug in it) is logged and answered EIO: raised in a job
        thread, it ended the whole session, and with it every open of the image."""
        try:
            self._send(reply)
        except OSError:
            log.exception("bug: the kernel refused the reply to request %d; answering EIO",
                          unique)
            self._send(codec.encode_error(unique, errno.EIO))

    def _answer_now(self, req: codec.Request, buf: bytearray | None
                    ) -> "Callable[[], Awaitable[codec.Reply]] | object":
        """The one dispatch decision. Answer without a task of its own when the filesystem can
        (page-cached reads, small writes that need nothing from the source): a task start
        costs as much as the rest of such a request. Returns _ANSWERED, _HANDED_OVER (to the
        job thread, with `buf`), or what a task must await for the answer."""
        quick = self._quick_handlers.get(type(req))
        if quick is None:
            return functools.partial(self._handler(req), req)
        try:
            answer = quick(req)
        except OSError as exc:
            self._send(codec.encode_error(req.unique, exc.errno or errno.EIO))
            return _ANSWERED
        except Exception:
            log.exception("bug while answering %s", type(req).__name__)
            self._send(codec.encode_error(req.unique, errno.EIO))
            return _ANSWERED
        if isinstance(answer, Continue):
            return answer.answer
        if isinstance(answer, Blocking):
            return self._hand_over(req.unique, answer, buf)
        if isinstance(answer, ReadFrom):
            return self._read_from(req.unique, answer)
        self._send(codec.encode_reply(req.unique, answer))
        return _ANSWERED

    def _hand_over(self, unique: int, blocking: Blocking, buf: bytearray | None) -> object:
        if blocking.waits_for_reads:
            return self._hand_over_waiting(unique, blocking, buf)
        jobs = self._parallel_jobs if blocking.parallel else self._jobs
        if not jobs.slots.acquire(blocking=False):
            self._run_job(unique, blocking)  # the job threads are behind: run it here
            return _ANSWERED
        if blocking.parallel:  # its request's data is not needed any more
            jobs.put((unique, blocking, None, True))
            return _ANSWERED
        jobs.put((unique, blocking, buf, True))
        return _HANDED_OVER

    def _hand_over_waiting(self, unique: int, blocking: Blocking, buf: bytearray | None) -> object:
        """A job that may wait for READs in flight: never on the loop, which answers them. On
        a waiting-job thread if it holds no request buffer and there is room; else in a task,
        through a worker thread of their limiter."""
        if buf is None and self._waiting_jobs.slots.acquire(blocking=False):
            self._waiting_jobs.put((unique, blocking, None, True))
            return _ANSWERED
        return functools.partial(in_thread, blocking.job, limiter=self._waiting_threads)

    # ---- reads on the io_uring ----------------------------------------------------------------

    def _open_ring(self, nursery: trio.Nursery) -> None:
        """Set up the io_uring for ReadFrom answers and start its reaper in `nursery`; without
        io_uring (an old kernel, disabled by the administrator), say so once and read on the
        parallel job thread as before."""
        try:
            ring = uring.ReadRing()
        except uring.RingUnavailable as exc:
            log.info("reads from the destination go through a thread: %s", exc)
            return
        self._ring_reads = uring.Reads(ring)
        nursery.start_soon(self._reap_ring_reads, self._ring_reads)

    def _read_from(self, unique: int, answer: ReadFrom) -> object:
        reads = self._ring_reads
        if reads is None or len(reads) >= MAX_RING_READS or not reads.ring.has_room():
            return self._hand_over(unique, _read_job(answer), None)
        reads.start(answer.fd, answer.offset, answer.length, (unique, answer))
        return _ANSWERED  # by the reaper, once the read completes

    def _submit_reads(self) -> None:
        if self._ring_reads is not None and not self._ring_reads.ring.submit():
            self._reaper_wait.cancel()  # it tries again soon: nothing else may wake it

    async def _reap_ring_reads(self, reads: uring.Reads) -> None:
        while True:
            with trio.CancelScope() as self._reaper_wait:
                if reads.ring.queued:  # the kernel took none of them last time
                    self._reaper_wait.deadline = trio.current_time() + SUBMIT_RETRY_SECONDS
                await reads.ring.wait_readable()
            reads.ring.submit()
            for context, buffer, res in reads.reaped():
                try:
                    self._answer_ring_read(*context, buffer, res)
                except Exception:
                    log.exception("bug while answering a READ from the io_uring")
                    self._send(codec.encode_error(context[0], errno.EIO))

    def _answer_ring_read(self, unique: int, answer: ReadFrom, buffer: bytearray, res: int,
                          *, closing: bool = False) -> None:
        """Reply to a READ from its ring read's completion. A short or failed read is answered
        as the thread path answers it, by its blocking read (which reads on past a short read,
        pads DST's end with zeros, or raises the error)."""
        if res == answer.length:
            if answer.drop_cached:
                # Not RWF_DONTCACHE: it drops only the pages its own read brought in, and most
                # were brought in by the readahead of the page-cache probe that missed.
                os.posix_fadvise(answer.fd, answer.offset, answer.length, os.POSIX_FADV_DONTNEED)
            self.fs.reads_on_ring += 1
            self._send(codec.encode_reply(unique, codec.DataReply(buffer)))
            return
        if closing:
            self._run_job(unique, _read_job(answer))
        else:
            self._hand_over(unique, _read_job(answer), None)

    def _close_ring(self) -> None:
        """Wait for every read in flight, answer them, then close the ring: the kernel writes
        into their buffers until they complete. Blocking, but reads of a local disk are short,
        and this runs once, at the end of the session."""
        reads, self._ring_reads = self._ring_reads, None
        if reads is None:
            return
        done = reads.wait_all()  # should this fail, the ring stays open: the kernel may still write
        try:
            for context, buffer, res in done:
                self._answer_ring_read(*context, buffer, res, closing=True)
        finally:
            reads.ring.close()

    def _handler(self, req: codec.Request) -> Handler:
        return self._handlers.get(type(req), _not_served)

    async def _answer(self, req: codec.Request, answer: Callable[[], Awaitable[codec.Reply]],
                      scope: trio.CancelScope, buf: bytearray | None) -> None:
        with scope:
            try:
                parts = codec.encode_reply(req.unique, await answer())
            except OSError as exc:
                parts = codec.encode_error(req.unique, exc.errno or errno.EIO)
            except Exception:
                log.exception("bug while answering %s", type(req).__name__)
                parts = codec.encode_error(req.unique, errno.EIO)
            finally:
                del self._in_flight[req.unique]
                if buf is not None:
                    self._give_back(buf)
        if scope.cancelled_caught:  # only an INTERRUPT cancels this scope itself
            parts = codec.encode_error(req.unique, errno.EINTR)
        self._send(parts)

    def _interrupt(self, target: int) -> None:
        scope = self._in_flight.get(target)
        if scope is not None:  # else it was answered already
            scope.cancel()

    def close(self, mountpoint: str, real_mountpoint: str, mount_id: int | None,
              device: str | None, fsname: str) -> None:
        """Unmount (detaching lazily if something still holds the image), detach the bind
        mounts of DEVICE (ours, mounted as FSNAME) and drop the device. Only our own mounts:
        not a filesystem mounted over one, nor one mounted at the path after ours was detached
        behind our back, nor one given our mount id and device number after ours ended."""
        try:
            if mount_id is not None and device is not None:
                ours = self._ours(device, mount_id, fsname)
                here = next((entry for entry in ours if entry.mount_id == mount_id), None)
                if here is None:
                    log.debug("%s is not mounted here any more", mountpoint)
                    return
                if here.mountpoint != real_mountpoint:  # a directory above it renamed
                    mountpoint = real_mountpoint = here.mountpoint
            check_clone_on_top(real_mountpoint, mount_id)
            unmount(mountpoint)
        except CoveredError as exc:
            if any(entry.mount_id == mount_id for entry in mount_entries()):
                log.warning("%s; this mount stays under it, its daemon gone, until both are "
                            "unmounted", exc)
            else:
                log.info("%s was detached from its mountpoint meanwhile (umount -l): the mount "
                         "there now is not this one", mountpoint)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                log.warning("%s is still in use: detaching it lazily", mountpoint)
                _try(lambda: unmount(mountpoint, lazy=True))
            elif exc.errno not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not mounted any more
                log.error("%s", exc)
        except Exception:
            log.exception("unmount of %s failed", mountpoint)
        finally:
            try:
                if device is not None:
                    self._detach_other_places(device, mount_id, fsname)
            finally:
                os.close(self.fd)

    def _ours(self, device: str, mount_id: int | None, fsname: str) -> list[MountEntry]:
        """The mounts in this namespace of this session's filesystem (`places_of`). Once the
        kernel ended the session (the last of its mounts unmounted), it hands its device number
        and mount id to the next mounts at once, another clone's perhaps: then only those
        mounted as FSNAME are taken for ours (no other clone mounts our META while we hold it).
        While the session lives (it ends before the numbers are freed), DEVICE alone is ours;
        that also finds the mounts left of a connection aborted from outside. The table is
        read first, then the session asked: numbers it showed were still ours if it lives."""
        places = places_of(device, mount_id if mount_id is not None else -1)
        if self._connected():
            return places
        return [entry for entry in places if entry.source == fsname]

    def _connected(self) -> bool:
        """Whether the kernel has not ended this session (POLLERR once it has)."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return not any(events & (select.POLLERR | select.POLLNVAL)
                       for _, events in poller.poll(0))

    def _detach_other_places(self, device: str, mount_id: int | None, fsname: str) -> None:
        """Detach the bind mounts of ours still in this namespace (a stop while the clone is
        mounted elsewhere too: `unmount --lazy`, SIGTERM): without this session they only
        answer ENOTCONN, and their mount table entries would lead the CLI to META's next
        mount. Never a filesystem mounted over one of them, nor another clone's given DEVICE's
        number once ours ended (our own unmount just now may have ended it)."""
        try:
            places = self._ours(device, mount_id, fsname)
        except OSError as exc:  # no descriptor left, say
            log.error("the bind mounts of this clone stay, answering ENOTCONN: %s", exc)
            return
        for place in places:
            if place.mount_id == mount_id:
                continue  # ours, stuck under a filesystem mounted over it: said above
            try:
                check_clone_on_top(place.mountpoint, place.mount_id)
                unmount(place.mountpoint, lazy=True)
                log.info("%s, a bind mount of this clone, was detached", place.mountpoint)
            except CoveredError as exc:
                log.warning("%s; it stays, its daemon gone, until both are unmounted", exc)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOENT):  # gone meanwhile
                    log.error("%s", exc)


_ANSWERED, _HANDED_OVER = object(), object()


_loadavg_fd: int | None = None  # /proc/loadavg, opened once (-1: cannot be read)
# The CPUs this process may run on (its affinity mask: taskset, a cpuset), counted when that
# descriptor is opened, not at every gap of a chain of requests: os.cpu_count() opens, reads
# and closes /sys/devices/system/cpu/online (15 us, as much as the rest of a 4 KiB WRITE's work
# on the event loop), sched_getaffinity is a syscall (~5 us). A mask changed later (taskset -p
# of a running daemon) is not seen.
_cpus = 1


def _count_cpus() -> int:
    return len(os.sched_getaffinity(0)) or 1


def _cpu_to_spare() -> bool:
    """Whether every runnable task of the machine has a CPU now (/proc/loadavg's running
    count, this thread included): polling then takes CPU from nobody. A CPU-bound client (two
    busy loops beside fio at iodepth 1) lost work to a loop that polled regardless. Counted
    against the CPUs this process may run on (taskset, a cpuset), not the machine's: pinned
    to one of two, it polled beside a busy task that wanted that CPU."""
    global _loadavg_fd, _cpus
    if _loadavg_fd is None:
        _cpus = _count_cpus()
        try:
            _loadavg_fd = os.open("/proc/loadavg", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            _loadavg_fd = -1
    if _loadavg_fd < 0:
        return False
    try:
        running = int(os.pread(_loadavg_fd, 128, 0).split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return False
    return running <= _cpus


_Job = tuple[int, Blocking, "bytearray | None", bool]


class _JobQueue:
    """Blocking jobs waiting for `threads` job threads: (unique, job, request buffer or None,
    whether it took a slot) items, None to stop a thread. `slots` bounds the jobs queued or
    running (but for jobs handed on by others)."""

    def __init__(self, threads: int, slots: int) -> None:
        self.threads = threads
        self.queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.slots = threading.Semaphore(slots)
        self.busy = 0  # jobs put and not yet done
        self._busy_lock = threading.Lock()  # put on the loop (or a job thread), done on theirs

    def put(self, item: _Job) -> None:
        with self._busy_lock:
            self.busy += 1
        self.queue.put(item)

    def done(self) -> None:
        with self._busy_lock:
            self.busy -= 1

    def stop(self) -> None:
        for _ in range(self.threads):
            self.queue.put(None)


async def _not_served(req: codec.Request) -> codec.Reply:
    raise OSError(errno.ENOSYS, "not served")


def _read_job(answer: ReadFrom) -> Blocking:
    """The thread path of a ReadFrom answer."""
    return Blocking(lambda: codec.DataReply(answer.read()), parallel=True)


def _job_reply(unique: int, blocking: Blocking) -> list | Blocking:
    """Run a handed-over job; the buffers of its reply, or of its error, or the job it hands on."""
    try:
        got = blocking.job()
        if isinstance(got, Blocking):
            return got
        return codec.encode_reply(unique, got)
    except OSError as exc:
        return codec.encode_error(unique, exc.errno or errno.EIO)
    except Exception:
        log.exception("bug in a blocking job")
        return codec.encode_error(unique, errno.EIO)


def _try(action: Callable[[], None]) -> None:
    try:
        action()
    except Exception:
        log.exception("lazy unmount failed")
