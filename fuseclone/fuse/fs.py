"""The one-file filesystem: a directory holding the image, or (on a regular-file mountpoint) the
image itself, mapped onto an ImageBackend.

The kernel page cache is used for the image (FOPEN_KEEP_CACHE, long attribute timeouts). That is
safe because the image only changes through this mount: every write and discard passes through
the kernel, which updates or drops its cached pages on the way (cached writes are written back
before an fsync, a direct write or a fallocate of their range is answered, and the kernel
invalidates the range of a PUNCH_HOLE / ZERO_RANGE fallocate). One exception: an FOPEN_DIRECT_IO
writer's asynchronous writes (io_submit, io_uring, a --direct-io=on loop device). The kernel drops
the range's cached pages before it sends such a WRITE, not after, and a buffered reader meanwhile
caches what the image held before it; so while caching opens exist, those writes are answered
only after their range is invalidated, if a caching open's READ or a buffered write touched it
since it was last dropped (`pagecache.py`, `_then_invalidate`). Hydration never changes what
the image reads as, so it needs no invalidation.

Who may open the image is DST's business, as with a device node: the image shows DST's owner,
group and mode bits (read anew each time the kernel asks, at most ATTR_SECONDS after a chmod or
chown of DST), and a chmod or chown of the image is applied to DST. The mount is made with
default_permissions, so the kernel checks those bits; allow_other only lets users other than
the mounting one reach the mount at all.
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import functools
import logging
import os
import stat
import threading
import time
from typing import Callable, Mapping

import trio

from ..errors import FusecloneError
from ..threads import in_thread
from . import abi, codec
from .backend import Blocking, Continue, ImageBackend, QuickAnswer, ReadFrom
from .pagecache import CachedRanges, Invalidation

log = logging.getLogger(__name__)

NAMESPACE_CHANGES = frozenset({
    abi.Opcode.CREATE, abi.Opcode.MKNOD, abi.Opcode.MKDIR, abi.Opcode.SYMLINK, abi.Opcode.LINK,
    abi.Opcode.UNLINK, abi.Opcode.RMDIR, abi.Opcode.RENAME, abi.Opcode.RENAME2, abi.Opcode.TMPFILE,
})

CACHE_SECONDS = 3600.0  # names and the directory never change while mounted
# The image's owner and mode are DST's, which may change under us: the kernel asks again after
# this long (once a second at most, a GETATTR is an fstat of DST).
ATTR_SECONDS = 1.0
# The image is a disk, not a program: it shows no setuid, setgid or sticky bit, and gets none.
PERMISSION_BITS = 0o777
BLOCK = 4096
# Invalidations running at once: each may wait for reads in flight, which must still find
# worker threads of the engine's (they have a limiter of their own).
INVALIDATING_THREADS = 4
IMAGE_FH = 1  # an open that uses the image's page cache (or, with passthrough, DST's)
DIRECT_FH = 2  # an FOPEN_DIRECT_IO open: past the page cache


def check_image_name(name: str) -> None:
    """Refuse (one line) a --name that is not a file name of its own."""
    if not name or "/" in name or name in (".", ".."):
        raise FusecloneError(f"--name {name!r}: the image's name must be a file name (no '/', "
                             "not '.' or '..')")


LOST_RANGES_SHOWN = 8  # ranges of lost writes a summary names (and the log), the rest counted


class LostWrites:
    """Writes the kernel had acknowledged from its cache (FUSE_WRITE_CACHE) that failed when it
    wrote them back (a partial write to an unhydrated region whose copy's source failed): their
    writers were told success, and only a later fsync or close of theirs hears of the failure,
    which a lazy unmount or a SIGTERM never comes to. Kept for status and for the stop to
    report. Thread-safe: blocking write jobs fail on the session's job thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self._ranges: list[list[int]] = []  # [start, end), merged, in order
        self._logged = 0
        self.given_up: str | None = None  # why the stop went on without the rest (unknown)

    def __bool__(self) -> bool:
        return bool(self.bytes or self.given_up)

    @property
    def ranges(self) -> int:
        """The ranges lost, merged: a write between two of them joins them into one."""
        with self._lock:
            return len(self._ranges)

    def give_up(self, why: str) -> None:
        """The stop goes on without the writes still cached: how many, the kernel does not say."""
        self.given_up = why

    def add(self, offset: int, length: int, exc: OSError) -> None:
        with self._lock:
            self.bytes += _insert_merged(self._ranges, offset, offset + length)
            self._logged += 1
            logged = self._logged
        if logged <= LOST_RANGES_SHOWN:
            log.error("%d bytes at offset %d, written into the kernel's cache and acknowledged, "
                      "are lost: writing them back failed (%s)%s", length, offset,
                      exc.strerror or os.strerror(exc.errno or errno.EIO),
                      "; more are counted, not logged" if logged == LOST_RANGES_SHOWN else "")

    def summary(self) -> str:
        """"4096 bytes whose write-back failed (offset 2101248 +4096)": the first ranges
        named, the rest counted; and the stop's giving up, if it gave up."""
        with self._lock:
            shown = ", ".join(f"offset {start} +{end - start}"
                              for start, end in self._ranges[:LOST_RANGES_SHOWN])
            more = len(self._ranges) - LOST_RANGES_SHOWN
            known = (f"{self.bytes} bytes whose write-back failed "
                     f"({shown}{f' and {more} more ranges' if more > 0 else ''})")
        if self.given_up is None:
            return known
        unknown = f"the writes still cached when {self.given_up} (how many is unknown)"
        return f"{known} and {unknown}" if self.bytes else unknown


def _insert_merged(ranges: list[list[int]], start: int, end: int) -> int:
    """[start, end) into RANGES (sorted, disjoint), merged with those it touches; returns the
    bytes it added (a write lost twice counts once)."""
    i = bisect.bisect_left(ranges, [start])
    if i > 0 and ranges[i - 1][1] >= start:
        i -= 1
        start = ranges[i][0]
    j, covered = i, 0
    while j < len(ranges) and ranges[j][0] <= end:
        end = max(end, ranges[j][1])
        covered += ranges[j][1] - ranges[j][0]
        j += 1
    ranges[i:j] = [[start, end]]
    return end - start - covered


class ImageFilesystem:
    def __init__(self, image: ImageBackend, *, name: str = "image", image_at_root: bool = False,
                 write_cache: bool = False, lost_writes: LostWrites | None = None) -> None:
        check_image_name(name)
        self.image = image
        self.name = os.fsencode(name)
        self.image_at_root = image_at_root
        self.image_id = abi.ROOT_ID if image_at_root else abi.ROOT_ID + 1
        self.write_cache = write_cache  # the kernel caches writes (FUSE_WRITEBACK_CACHE)
        self.lost_writes = lost_writes if lost_writes is not None else LostWrites()
        self._uid, self._gid = os.getuid(), os.getgid()  # the directory's owner
        self._mounted_at = time.time()
        self.user_read_bytes = 0  # answered to READs (status and metrics)
        self.user_write_bytes = 0  # accepted from WRITEs
        self.backing_id: int | None = None  # FUSE passthrough to DST (use_backing)
        self.direct_io_opens = False  # O_DIRECT opens get FOPEN_DIRECT_IO (negotiated)
        self.reads_on_ring = 0  # READs the session answered from an io_uring read of DST
        self._caching_opens = 0  # opens of the image answered IMAGE_FH and not yet released
        self._caching_opened = 0  # such opens ever made
        self._invalidate: Callable[[int, int, int], None] | None = None  # the session's
        self._invalidating = trio.CapacityLimiter(INVALIDATING_THREADS)
        self._cached = CachedRanges(image.size)  # what READs of caching opens may have cached

    def negotiated(self, init_flags: int, invalidate: Callable[[int, int, int], None]) -> None:
        """The features INIT settled on. An O_DIRECT open gets FOPEN_DIRECT_IO only where the
        kernel lets such an open be mapped shared (FUSE_DIRECT_IO_ALLOW_MMAP, Linux 6.6);
        elsewhere its mmap would fail with ENODEV. `invalidate(nodeid, offset, length)` drops
        the kernel's cached pages of a range (blocking: a worker thread's job)."""
        self.direct_io_opens = bool(init_flags & abi.FUSE_DIRECT_IO_ALLOW_MMAP)
        self._invalidate = invalidate

    def use_backing(self, backing_id: int) -> None:
        """From now on every open of the image is a passthrough open of the registered backing
        file (DST, of a complete clone): the kernel reads and writes it without asking us.
        Every open, because the kernel refuses a caching open of a file that has passthrough
        opens, and the reverse."""
        self.backing_id = backing_id

    def handlers(self) -> Mapping[type, object]:
        return {
            codec.Lookup: self.lookup, codec.GetAttr: self.getattr, codec.SetAttr: self.setattr,
            codec.Open: self.open, codec.OpenDir: self.opendir, codec.ReadDir: self.readdir,
            codec.Release: self.release, codec.ReleaseDir: self.release, codec.Flush: self.flush,
            codec.Read: self.read, codec.Write: self.write, codec.Fsync: self.fsync,
            codec.StatFs: self.statfs, codec.Fallocate: self.fallocate, codec.Lseek: self.lseek,
            codec.Access: self.access, codec.Unsupported: self.unsupported,
        }

    def quick_handlers(self) -> Mapping[type, object]:
        """Request type -> synchronous handler that decides once how the request is answered:
        a Reply now, a Blocking job for a thread, or a Continue for a task of its own."""
        return {codec.Read: self.read_now, codec.Write: self.write_now, codec.Fsync: self.fsync_now,
                codec.SetAttr: self.setattr_now}

    # ---- names and attributes ---------------------------------------------------------------

    def _attr(self, nodeid: int) -> codec.Attr:
        t = self._mounted_at
        if nodeid == self.image_id:
            size = self.image.size
            perm = self.image.permissions()
            return codec.Attr(ino=nodeid, size=size, mode=stat.S_IFREG | (perm.mode & PERMISSION_BITS),
                              nlink=1, uid=perm.uid, gid=perm.gid, blocks=(size + 511) // 512,
                              atime=t, mtime=t, ctime=t, blksize=BLOCK)
        if nodeid == abi.ROOT_ID:
            return codec.Attr(ino=nodeid, size=0, mode=stat.S_IFDIR | 0o755, nlink=2,
                              uid=self._uid, gid=self._gid, atime=t, mtime=t, ctime=t)
        raise OSError(errno.ENOENT, "no such node")

    def _entry(self) -> codec.EntryReply:
        return codec.EntryReply(self.image_id, self._attr(self.image_id), CACHE_SECONDS, ATTR_SECONDS)

    async def lookup(self, req: codec.Lookup) -> codec.Reply:
        if req.nodeid == abi.ROOT_ID and not self.image_at_root and req.name == self.name:
            return self._entry()
        raise OSError(errno.ENOENT, "no such file")

    def _attr_seconds(self, nodeid: int) -> float:
        # The directory's attributes never change: cached, a stat of the mountpoint does not
        # wait for this daemon.
        return ATTR_SECONDS if nodeid == self.image_id else CACHE_SECONDS

    async def getattr(self, req: codec.GetAttr) -> codec.Reply:
        return codec.AttrReply(self._attr(req.nodeid), self._attr_seconds(req.nodeid))

    def setattr_now(self, req: codec.SetAttr) -> QuickAnswer:
        """Answered at once unless it changes owner or mode. With the write cache the kernel
        keeps the image's times itself and sends them before every FSYNC, inside the inode
        lock that a database's writes wait for: a task of its own cost that much more."""
        if req.valid & (abi.FATTR_MODE | abi.FATTR_UID | abi.FATTR_GID):
            return Continue(lambda: self.setattr(req))
        return self._unchanged_attr(req)

    def _unchanged_attr(self, req: codec.SetAttr) -> codec.AttrReply:
        attr = self._attr(req.nodeid)
        if req.valid & abi.FATTR_SIZE and req.size != attr.size:
            # The image is exactly the source's size; a truncate would lose or invent data.
            raise OSError(errno.EPERM, "the image size is fixed")
        return codec.AttrReply(attr, self._attr_seconds(req.nodeid))  # times: accepted, not kept

    async def setattr(self, req: codec.SetAttr) -> codec.Reply:
        reply = self._unchanged_attr(req)
        if req.valid & (abi.FATTR_MODE | abi.FATTR_UID | abi.FATTR_GID):
            if req.nodeid != self.image_id:
                raise OSError(errno.EPERM, "the directory's owner and mode are fixed")
            await self._set_permissions(req)
            reply = codec.AttrReply(self._attr(req.nodeid), self._attr_seconds(req.nodeid))
        return reply

    async def _set_permissions(self, req: codec.SetAttr) -> None:
        """chmod/chown of the image, applied to DST (default_permissions: the kernel has let
        only the owner chmod, and only root chown)."""
        mode = None
        if req.valid & abi.FATTR_MODE:
            mode = stat.S_IMODE(req.mode)
            if mode & ~PERMISSION_BITS:
                raise OSError(errno.EPERM, "the image takes no setuid, setgid or sticky bit")
        await self.image.set_permissions(mode, req.uid_new if req.valid & abi.FATTR_UID else -1,
                                         req.gid_new if req.valid & abi.FATTR_GID else -1)

    async def access(self, req: codec.Access) -> codec.Reply:
        self._attr(req.nodeid)
        return codec.EmptyReply()  # default_permissions: the kernel has checked the mode bits

    async def unsupported(self, req: codec.Unsupported) -> codec.Reply:
        # A one-file namespace: "Operation not permitted" says so better than ENOSYS's
        # "Function not implemented", which stays for everything else (the kernel remembers it
        # and stops asking).
        if req.code in NAMESPACE_CHANGES:
            raise OSError(errno.EPERM, "the mount holds only the image")
        raise OSError(errno.ENOSYS, "not served")

    async def statfs(self, req: codec.StatFs) -> codec.Reply:
        # The loop driver enables discard only when statfs answers; f_bsize is its granularity.
        return codec.StatFsReply(blocks=(self.image.size + BLOCK - 1) // BLOCK, bfree=0, bavail=0,
                                 files=1, ffree=0, bsize=BLOCK)

    # ---- the directory ----------------------------------------------------------------------

    async def opendir(self, req: codec.OpenDir) -> codec.Reply:
        if req.nodeid != abi.ROOT_ID or self.image_at_root:
            raise OSError(errno.ENOTDIR, "not a directory")
        return codec.OpenReply(0, abi.FOPEN_CACHE_DIR | abi.FOPEN_KEEP_CACHE)

    async def readdir(self, req: codec.ReadDir) -> codec.Reply:
        dirs = stat.S_IFDIR >> 12
        entries = [codec.DirEntry(abi.ROOT_ID, b".", dirs), codec.DirEntry(abi.ROOT_ID, b"..", dirs),
                   codec.DirEntry(self.image_id, self.name, stat.S_IFREG >> 12,
                                  self._entry() if req.plus else None)]
        return codec.DirReply(entries, req.offset, req.size, req.plus)

    async def release(self, req: codec.Request) -> codec.Reply:
        if isinstance(req, codec.Release) and req.fh == IMAGE_FH:
            self._caching_opens -= 1
        return codec.EmptyReply()  # close(2) is not a flush: durability is fsync's job

    async def flush(self, req: codec.Flush) -> codec.Reply:
        """A close: nothing to make durable, but a passthrough writer past the image's end
        learns of it here at the latest, as a writer through the write cache does."""
        if self.backing_id is not None:
            self.image.refuse_direct_writes_past_the_end()
        return codec.EmptyReply()

    # ---- the image --------------------------------------------------------------------------

    async def open(self, req: codec.Open) -> codec.Reply:
        if req.nodeid != self.image_id:
            raise OSError(errno.EISDIR, "is a directory")
        if self.backing_id is not None:
            reply = await self._open_passthrough(req)
            self._opened_caching()
            return reply
        # Keep the page cache across opens: nothing changes the image behind the kernel's back.
        flags = abi.FOPEN_KEEP_CACHE | abi.FOPEN_PARALLEL_DIRECT_WRITES
        if not (req.flags & os.O_DIRECT and self.direct_io_opens):
            self._opened_caching()
            return codec.OpenReply(IMAGE_FH, flags)
        # A direct writer (a database, a --direct-io=on loop device) commits in chains of
        # requests. Through the cached-file path the kernel stamps the image's times on each
        # such write and, with the write cache, sends them as a SETATTR before the next FSYNC,
        # inside the inode lock that every write waits for: one more round trip in 722 of 855
        # commits. FOPEN_DIRECT_IO writes stamp nothing, and with FOPEN_PARALLEL_DIRECT_WRITES
        # they share the lock. The kernel still writes back and drops cached pages of the
        # range first, so buffered openers stay coherent (see _may_leave_stale_pages).
        return codec.OpenReply(DIRECT_FH, flags | abi.FOPEN_DIRECT_IO)

    def _opened_caching(self) -> None:
        self._caching_opens += 1
        self._caching_opened += 1

    async def _open_passthrough(self, req: codec.Open) -> codec.Reply:
        """Reads and writes of this open go to DST without us. Its writes would escape
        changed-block tracking, so a writable open is answered only once the whole image is
        marked written in META (write-ahead, like any write's bits). No FOPEN_KEEP_CACHE: the
        kernel drops what the image's page cache held from before."""
        if req.flags & os.O_ACCMODE != os.O_RDONLY:
            await self.image.expose_to_direct_writes()
        return codec.OpenReply(IMAGE_FH, abi.FOPEN_PASSTHROUGH, self.backing_id)

    def _note_read(self, req: codec.Read) -> None:
        if req.fh == IMAGE_FH:  # a READ of a caching open may fill the page cache
            self._cached.note_cached(req.offset, req.size)

    def read_now(self, req: codec.Read) -> QuickAnswer:
        self._note_read(req)
        if req.offset >= self.image.size:
            return codec.DataReply(b"")
        got = self.image.read_now(req.offset, req.size,
                                  kernel_keeps=not req.open_flags & os.O_DIRECT)
        if isinstance(got, Continue):
            return Continue(functools.partial(self._read_reply, got))
        self.user_read_bytes += min(req.size, self.image.size - req.offset)
        if isinstance(got, ReadFrom):
            return got  # the session reads it from DST and replies
        return codec.DataReply(got)

    async def _read_reply(self, rest: Continue) -> codec.Reply:
        data = await rest.answer()
        self.user_read_bytes += len(data)
        return codec.DataReply(data)

    def write_now(self, req: codec.Write) -> QuickAnswer:
        if not req.write_flags & abi.FUSE_WRITE_CACHE or req.offset >= self.image.size:
            # A cached write past the image's end is refused (ENOSPC) as documented, not lost;
            # one across the end (write-back coalesces pages) is lost if its part inside is.
            return self._write_now(req)
        try:
            answer = self._write_now(req)
        except OSError as exc:
            self._lost(req, exc)
            raise
        if isinstance(answer, Blocking):
            return dataclasses.replace(answer, job=functools.partial(self._noting_loss,
                                                                     answer.job, req))
        if isinstance(answer, Continue):
            return Continue(functools.partial(self._noting_loss_of_task, answer.answer, req))
        return answer

    def _noting_loss(self, job: Callable[[], codec.Reply], req: codec.Write) -> codec.Reply:
        try:
            return job()
        except _PastTheEnd:
            raise
        except OSError as exc:
            self._lost(req, exc)
            raise

    async def _noting_loss_of_task(self, answer: Callable, req: codec.Write) -> codec.Reply:
        try:
            return await answer()
        except _PastTheEnd:  # the part inside was stored
            raise
        except OSError as exc:
            self._lost(req, exc)
            raise
        except trio.Cancelled:  # the session ends (a stop that gave up on the source): unstored
            self._lost(req, OSError(errno.ECANCELED, "the mount stopped before it was stored"))
            raise

    def _lost(self, req: codec.Write, exc: OSError) -> None:
        """The write's part inside the image is lost (past the end nothing is stored anyway)."""
        self.lost_writes.add(req.offset, min(len(req.data), self.image.size - req.offset), exc)

    def _write_now(self, req: codec.Write) -> QuickAnswer:
        direct = self._direct_write(req)
        if not direct:
            # Its pages hold what it writes (a write-through one fills them before it is sent,
            # the write cache's are written back from them): a direct write that reaches DST
            # after it must drop them, as a READ's.
            self._cached.note_cached(req.offset, len(req.data))
        answer = self._write_answer(req)
        if isinstance(answer, Continue) and direct and self._invalidate is not None:
            # It may wait long (for the source, a commit): an open that comes meanwhile, reads
            # its range before its data is in DST and may even be gone again by then counts,
            # so only what was noted decides, once it is done.
            return Continue(functools.partial(self._answer_then_invalidate, answer, req))
        if not self._may_leave_stale_pages(req):
            if isinstance(answer, Blocking) and direct and self._invalidate is not None:
                # It waits for the job thread's turn, which an open may come and read in too.
                return dataclasses.replace(answer, job=functools.partial(
                    self._then_invalidation_if_opened, answer.job, req, self._caching_opened))
            return answer
        # No task and no hop back to the loop: a thread of the session's writes, invalidates
        # and replies (a hop to a worker thread and back cut 34k such writes a second to 4k).
        if isinstance(answer, Blocking):
            return Blocking(functools.partial(self._then_invalidate, answer, req),
                            waits_for_reads=True)
        planned = self._cached.plan(req.offset, len(req.data))  # written: DST holds it now
        if planned is None:
            return answer
        return Blocking(functools.partial(_call_then, functools.partial(self._drop, planned),
                                          answer), waits_for_reads=True)

    def _write_answer(self, req: codec.Write) -> QuickAnswer:
        if _synchronous(req):
            return Continue(lambda: self._write_synchronously(req))
        if req.offset + len(req.data) > self.image.size:
            return Continue(lambda: self.write(req))  # it clips or refuses the write
        done = self.image.write_now(req.offset, req.data, direct=_direct(req))
        if isinstance(done, Continue):
            return Continue(functools.partial(self._write_reply, done, len(req.data)))
        self.user_write_bytes += len(req.data)
        reply = codec.WriteReply(len(req.data))
        if done is True:
            return reply
        return Blocking(functools.partial(_call_then, done, reply))

    async def _write_reply(self, rest: Continue, length: int) -> codec.Reply:
        await rest.answer()
        self.user_write_bytes += length
        return codec.WriteReply(length)

    def _may_leave_stale_pages(self, req: codec.Write) -> bool:
        """Whether the image's page cache may hold what the range held before this write: a
        direct writer's while opens that cache exist. The kernel drops the range's pages
        before it sends a direct WRITE, but not after; of an asynchronous writer's
        (io_submit, io_uring, a loop device), a buffered reader's READ often comes between
        and is answered the data the write replaces, which then stays cached
        (FOPEN_KEEP_CACHE: 50 of 60 such writes in a row, and it stayed). Direct: an
        FOPEN_DIRECT_IO open's, an open with O_DIRECT set later (fcntl), or, with the write
        cache, any write that is not the kernel writing back its cache (a loop device
        switched to direct I/O by `losetup --direct-io=on LOOPDEV` asks for it per request,
        and its open shows no O_DIRECT). Never a write-through buffered write: its writer
        holds a page locked until answered, which an invalidation would wait for. The
        writer's own open, if it is a caching one, does not count: it reads directly too
        (a loop device alone kept 29k of its 4 KiB writes a second, not 4k)."""
        if self._invalidate is None or self._caching_opens - (req.fh == IMAGE_FH) <= 0:
            return False
        return self._direct_write(req)

    def _direct_write(self, req: codec.Write) -> bool:
        """Whether a WRITE went past the page cache (see _may_leave_stale_pages): not the
        kernel writing back its cache, and of an FOPEN_DIRECT_IO open, an O_DIRECT one, or any
        with the write cache (which takes every buffered write)."""
        if req.write_flags & abi.FUSE_WRITE_CACHE:
            return False
        return bool(req.fh == DIRECT_FH or req.open_flags & os.O_DIRECT or self.write_cache)

    def _then_invalidate(self, answer: Blocking, req: codec.Write) -> codec.Reply:
        """Blocking, for a thread that answers no READ: the write's answer, then its range
        dropped from the image's page cache, then the reply. Whatever a reader cached of the
        range before the write reached DST is gone by the time the writer hears of it. Not on
        the event loop: the kernel waits there for pages that reads in flight hold locked,
        which the loop answers."""
        try:
            return answer.job()
        finally:
            planned = self._cached.plan(req.offset, len(req.data))
            if planned is not None:
                self._drop(planned)

    def _then_invalidation_if_opened(self, job: Callable[[], codec.Reply], req: codec.Write,
                                     opened: int) -> codec.Reply | Blocking:
        """Blocking, on the job thread of writes (no caching open but the writer's own when the
        write came): the write's job; then, if a caching open has come since and noted its
        range, the invalidation and the reply, handed on to a thread that answers no READ.
        Not this one: it runs write-through WRITEs in order, which the kernel holds pages
        locked for until answered, and the invalidation would wait for those pages."""
        try:
            outcome: codec.Reply | OSError = job()
        except OSError as exc:  # DST may hold part of it: dropped all the same
            outcome = exc
        planned = (None if self._caching_opened == opened
                   else self._cached.plan(req.offset, len(req.data)))
        if planned is not None:
            return Blocking(functools.partial(self._drop_then, planned, outcome),
                            waits_for_reads=True)
        if isinstance(outcome, OSError):
            raise outcome
        return outcome

    def _drop_then(self, planned: Invalidation, outcome: codec.Reply | OSError) -> codec.Reply:
        """Blocking, for a thread that answers no READ: `planned` dropped, then the answer."""
        self._drop(planned)
        if isinstance(outcome, OSError):
            raise outcome
        return outcome

    async def _answer_then_invalidate(self, answer: Continue, req: codec.Write) -> codec.Reply:
        """`_then_invalidate` for a direct write that waits for something first (the source, a
        commit), whatever opens there were when it came: the invalidation in a worker thread
        of its own limiter."""
        try:
            return await answer.answer()
        finally:
            planned = self._cached.plan(req.offset, len(req.data))
            if planned is not None:
                with trio.CancelScope(shield=True):
                    await in_thread(self._drop, planned, limiter=self._invalidating)

    def _drop(self, planned: Invalidation) -> None:
        """Blocking: drop a range from the image's page cache (see _then_invalidate)."""
        self._invalidate(self.image_id, planned.offset, planned.length)
        self._cached.dropped(planned)

    async def _write_synchronously(self, req: codec.Write) -> codec.Reply:
        """A write that must be durable when answered (see _synchronous): the write, then the
        flush an FSYNC gets (DST durable, then its regions' bits in META)."""
        reply = await self.write(req)
        await self.image.flush()
        return reply

    async def read(self, req: codec.Read) -> codec.Reply:
        self._note_read(req)
        if req.offset >= self.image.size:
            return codec.DataReply(b"")
        data = await self.image.read(req.offset, req.size)
        self.user_read_bytes += len(data)
        return codec.DataReply(data)

    async def write(self, req: codec.Write) -> codec.Reply:
        room = self.image.size - req.offset
        if room <= 0 and len(req.data):
            raise OSError(errno.ENOSPC, "write past the end of the image")
        data = req.data if len(req.data) <= room else req.data[:room]
        await self.image.write(req.offset, data, direct=_direct(req))
        self.user_write_bytes += len(data)
        if len(data) < len(req.data) and req.write_flags & abi.FUSE_WRITE_CACHE:
            # Writeback ignores a short count: the part past the end would be dropped silently.
            raise _PastTheEnd(errno.ENOSPC, "write past the end of the image")
        return codec.WriteReply(len(data))

    def fsync_now(self, req: codec.Fsync) -> QuickAnswer:
        """An FSYNC that is one fdatasync of DST runs on the loop when it is short, else on the
        session's job thread, which answers it itself (no hop back to the loop). Never short
        with passthrough: the kernel writes DST there, and no count of ours sees how much."""
        flush = self.image.flush_now()
        if flush is None:
            return Continue(lambda: self.fsync(req))
        if self.backing_id is not None:
            return Blocking(functools.partial(self._passthrough_fsync, flush))
        if self.image.flush_is_short():
            flush()
            return codec.EmptyReply()
        return Blocking(functools.partial(_call_then, flush, codec.EmptyReply()))

    def _passthrough_fsync(self, flush: Callable[[], None]) -> codec.Reply:
        """Blocking: DST durable, then the kernel's writes past the image's end (it writes DST
        itself and does not know where the image ends) refused with ENOSPC."""
        flush()
        self.image.refuse_direct_writes_past_the_end()
        return codec.EmptyReply()

    async def fsync(self, req: codec.Fsync) -> codec.Reply:
        await self.image.flush()
        if self.backing_id is not None:
            self.image.refuse_direct_writes_past_the_end()
        return codec.EmptyReply()

    async def fallocate(self, req: codec.Fallocate) -> codec.Reply:
        size = self.image.size
        end = min(req.offset + req.length, size)
        mode = req.mode
        if mode & ~(abi.FALLOC_FL_KEEP_SIZE | abi.FALLOC_FL_PUNCH_HOLE | abi.FALLOC_FL_ZERO_RANGE):
            raise OSError(errno.EOPNOTSUPP, "unsupported fallocate mode")
        if req.offset + req.length > size and not mode & abi.FALLOC_FL_KEEP_SIZE:
            raise OSError(errno.EPERM, "the image size is fixed")
        if end <= req.offset:
            return codec.EmptyReply()
        if mode & abi.FALLOC_FL_PUNCH_HOLE:
            await self.image.discard(req.offset, end - req.offset)
        elif mode & abi.FALLOC_FL_ZERO_RANGE:
            await self.image.write_zeroes(req.offset, end - req.offset)
        # plain preallocation inside the image: every byte already exists
        return codec.EmptyReply()

    async def lseek(self, req: codec.Lseek) -> codec.Reply:
        if self.write_cache:
            # The kernel asks without writing its cached pages back first (and holds the inode
            # lock, so we cannot fetch them): a hole here might hide written data. ENOSYS makes
            # it treat the whole image as data from now on.
            raise OSError(errno.ENOSYS, "SEEK_DATA/SEEK_HOLE with the write cache")
        if req.whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "only SEEK_DATA and SEEK_HOLE reach the filesystem")
        if req.nodeid != self.image_id:
            raise OSError(errno.EINVAL, "not the image")
        return codec.LseekReply(await self.image.seek(req.offset, req.whence))


def _call_then(call: Callable[[], None], reply: codec.Reply) -> codec.Reply:
    """A handed-over job: the blocking call, then the reply it earns."""
    call()
    return reply


class _PastTheEnd(OSError):
    """ENOSPC for the part of a cached write past the image's end, once its part inside is
    stored: refused as documented, not a lost write."""


def _synchronous(req: codec.Write) -> bool:
    """Whether a user's own write asks to be durable once answered: an `O_SYNC`/`O_DSYNC`
    open, or a `pwritev2` with `RWF_SYNC`/`RWF_DSYNC` (the kernel adds O_DSYNC to the WRITE's
    flags). The kernel follows a write through its page cache with an FSYNC, but not one of
    an FOPEN_DIRECT_IO open (an O_DIRECT opener): that write is the daemon's to make durable,
    or a crash loses it although acknowledged. Writes of other opens are made durable here
    too (their FSYNC that follows then finds little to do): an open's O_DIRECT may be
    cleared with fcntl while it keeps FOPEN_DIRECT_IO. Not the kernel writing back its cache:
    the FSYNC it does that for comes next."""
    return bool(req.open_flags & os.O_DSYNC) and not req.write_flags & abi.FUSE_WRITE_CACHE


def _direct(req: codec.Write) -> bool:
    """Whether the writer opened the image with O_DIRECT and this is its own write (not the
    kernel writing back its cache): it keeps no copy, and a flush usually follows."""
    return bool(req.open_flags & os.O_DIRECT) and not req.write_flags & abi.FUSE_WRITE_CACHE
