"""What the FUSE layer needs from the image it serves. The clone engine implements it.

Every method may raise OSError(errno): the filesystem answers that errno to the kernel. Any other
exception is a bug: the filesystem logs its traceback and answers EIO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol, Union

from . import codec


# ---- what a quick handler answers: one dispatch decision per request ----------------------------


@dataclass(slots=True)
class Blocking:
    """The answer needs one blocking call first (a large copy into the page cache, a read from
    disk). The session runs `job` on a thread of its own, which then sends the reply itself: the
    event loop reads the next requests meanwhile, and there is no hop back to it. Jobs run one
    at a time, in the order they came; `parallel` ones (reads) on threads of their own, beside
    the others and in any order. `waits_for_reads`: the job may wait for READs in flight (an
    invalidation of cached pages waits for those the kernel holds locked for them), so it never
    runs on the event loop, which answers them, nor on a thread that reads. A job may answer
    with another Blocking job, one that `waits_for_reads`, to run next and give the reply: what
    it learned only once done (a write's invalidation)."""

    job: Callable[[], codec.Reply | Blocking]
    parallel: bool = False
    waits_for_reads: bool = False


@dataclass(slots=True)
class Continue:
    """The answer needs to wait for something (the source, a commit): the session runs `answer`
    in a task of its own. It carries what the quick attempt learned, so nothing is asked twice.
    A backend's `read_now` / `write_now` answer with one too, whose `answer` gives the bytes
    read (or does the write); the filesystem wraps it in one that gives the reply."""

    answer: Callable[[], Awaitable[Any]]


@dataclass(slots=True)
class ReadFrom:
    """The answer is the `length` bytes at `offset` of the file `fd` (hydrated data, which
    nothing changes while it is read): the session reads them with io_uring into a buffer of its
    own and replies from the completion, with no thread. `read` is the same read as one blocking
    call for any thread: the session's fallback, and its answer to a short or failed read.
    `drop_cached`: drop the pages this read brings into the file's page cache (the kernel keeps
    a copy of the data: one is enough). As a filesystem's quick answer it means a DataReply of
    those bytes."""

    fd: int
    offset: int
    length: int
    drop_cached: bool
    read: Callable[[], bytes | bytearray]


QuickAnswer = Union[codec.Reply, Blocking, Continue, ReadFrom]


@dataclass(frozen=True)
class Permissions:
    """Who may open the image: its mode bits, owner and group."""

    mode: int
    uid: int
    gid: int


class ImageBackend(Protocol):
    @property
    def size(self) -> int:
        """Fixed image size in bytes. Size changes are refused by the filesystem."""

    def permissions(self) -> Permissions:
        """The image's mode bits, owner and group as they are now. The engine's are DST's, like
        a device node's: a chmod or chown of DST decides who may open the image."""

    async def set_permissions(self, mode: int | None, uid: int, gid: int) -> None:
        """chmod (`mode` not None) and chown (-1: unchanged) of the image; the engine applies
        them to DST. The kernel has already checked that the caller may."""

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """Bytes at [offset, offset+length), clipped to the image size (bytes-like)."""

    def read_now(self, offset: int, length: int, *, kernel_keeps: bool
                 ) -> bytes | bytearray | ReadFrom | Continue:
        """Like `read`, deciding once without waiting: the bytes if they can be had at once, a
        `ReadFrom` naming the file range that holds them (a disk read, nothing else to wait
        for), or a `Continue` whose answer awaits them, starting from what this call found out.
        `kernel_keeps`: the kernel keeps what this read returns in the image's page cache, so
        no other copy of it needs to stay cached."""

    def write_now(self, offset: int, data: bytes | memoryview, *, direct: bool = False
                  ) -> bool | Callable[[], None] | Continue:
        """Like `write`, deciding once without waiting: True if done, a `Continue` whose answer
        does the rest, or a blocking call that does it from any thread (the write is then
        acknowledged after it).
        `direct`: the writer opened the image with O_DIRECT (it keeps no copy of what it
        writes, and a disk's writer that does usually flushes soon)."""

    async def write(self, offset: int, data: bytes | memoryview, *, direct: bool = False) -> None:
        """Write inside the image (the filesystem has already refused writes past its end).
        `direct`: as for `write_now`."""

    async def discard(self, offset: int, length: int) -> None:
        """FALLOCATE PUNCH_HOLE|KEEP_SIZE: afterwards the range reads as zeros."""

    async def write_zeroes(self, offset: int, length: int) -> None:
        """FALLOCATE ZERO_RANGE: afterwards the range reads as zeros."""

    async def flush(self) -> None:
        """FSYNC: every write completed before the call is durable when it returns."""

    async def expose_to_direct_writes(self) -> None:
        """Writes are about to reach DST without passing through the backend (a FUSE
        passthrough open): return once every part of the image is durably marked written,
        as each of them would have been."""

    def refuse_direct_writes_past_the_end(self) -> None:
        """Writes that reached DST without the backend (passthrough) went past the image's end:
        raise OSError(ENOSPC), once, as the write cache's writeback would, and leave DST as
        it was. Blocking, but short enough for any thread."""

    def flush_now(self) -> Callable[[], None] | None:
        """Like `flush`, without waiting: a blocking call that does it from any thread, or
        None if `flush` must do it."""

    def flush_is_short(self) -> bool:
        """Whether the call `flush_now` returned is short enough to run on the event loop."""

    async def seek(self, offset: int, whence: int) -> int:
        """LSEEK with os.SEEK_DATA or os.SEEK_HOLE; raises OSError(ENXIO) past the end."""
