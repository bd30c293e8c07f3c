"""A local source: a regular file or a block device, opened read-only (SPEC invariant 4)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import AsyncIterator

from .. import claims
from ..blockio import (data_extents, fd_size, first_data, open_without_waiting, pread_exact,
                       why_denied)
from ..errors import SourceError
from ..identity import loop_identity, same_recorded_identity
from ..threads import in_thread
from .base import Extent, Source, SourceReadError


@contextlib.asynccontextmanager
async def open_local_source(path: str) -> AsyncIterator[LocalSource]:
    """The file or block device at `path`, open for the duration of the block."""
    source = await LocalSource.open(path)
    try:
        yield source
    finally:
        await source.aclose()


class LocalSource(Source):
    def __init__(self, path: str, fd: int) -> None:
        self.description = path
        self._fd = fd
        st = os.fstat(fd)
        self._is_file = stat.S_ISREG(st.st_mode)
        self._st = st
        self._size = fd_size(fd)
        self._held: list[int] = []  # files held beneath a block device (claims.hold)

    @classmethod
    async def open(cls, path: str) -> LocalSource:
        try:
            # read-only: the source is never written
            fd = open_without_waiting(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceError(f"{path}: source does not exist") from None
        except PermissionError:
            raise SourceError(f"{path}: source is not readable ({why_denied(path)})") from None
        except OSError as exc:
            raise SourceError(f"{path}: cannot open source: {exc.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise SourceError(f"{path}: source must be a regular file or a block device")
            held = _hold(fd, path)
        except BaseException:
            os.close(fd)
            raise
        source = cls(path, fd)
        source._held = held
        return source

    @property
    def size(self) -> int:
        return self._size

    @property
    def has_version_mark(self) -> bool:
        return self._is_file  # a block device is known by its name: another disk may take it

    def own_identity(self) -> dict[str, str | int]:
        ident: dict[str, str | int] = {
            "kind": "file" if self._is_file else "blockdev",
            "path": os.path.realpath(self.description),
            "size": self._size,
        }
        if self._is_file:
            ident["mtime_ns"] = self._st.st_mtime_ns
        else:
            ident.update(loop_identity(self._fd))
        return ident

    def same_identity(self, stored: dict, current: dict) -> bool:
        return same_recorded_identity(stored, current)

    async def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self._size - offset))
        try:
            data = await in_thread(self._read_unchanged, length, offset)
        except OSError as exc:
            raise SourceReadError(exc.errno, f"source read at {offset}: {exc.strerror}") from exc
        if len(data) != length:
            raise SourceReadError(5, f"short source read at {offset} ({len(data)} of {length} bytes)")
        return data

    async def extents(self, offset: int, length: int) -> list[Extent]:
        if not self._is_file:
            return [Extent(offset, length, zero=False)]
        try:
            runs = await in_thread(self._extents_unchanged, offset, length)
        except OSError as exc:
            raise SourceReadError(exc.errno, f"source extents at {offset}: {exc.strerror}") from exc
        return [Extent(o, n, zero=hole) for o, n, hole in runs]

    def holds_no_data(self) -> bool:
        return self._is_file and first_data(self._fd) is None

    def _read_unchanged(self, length: int, offset: int) -> bytes:
        data = pread_exact(self._fd, length, offset)
        self._check_unchanged()
        return data

    def _extents_unchanged(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        runs = data_extents(self._fd, offset, length)
        self._check_unchanged()
        return runs

    def _check_unchanged(self) -> None:
        """Blocking: an EIO OSError if the source file changed since it was opened, as the HTTP
        source's If-Match does. Checked after the read, so a change that reached the data read
        has moved the mtime already. Without it, a truncated file's lost end reads as a hole
        (SEEK_DATA says so), which hydration would store as zeros and mark hydrated."""
        if not self._is_file:
            return
        st = os.fstat(self._fd)
        if (st.st_size, st.st_mtime_ns) != (self._st.st_size, self._st.st_mtime_ns):
            raise OSError(errno.EIO, "the source changed since the clone began (its size or "
                          "modification time moved)")

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        claims.release(self._held)


def _hold(fd: int, path: str) -> list[int]:
    """Hold SRC shared while it is open (claims.py): no clone may take it, or a loop device
    of it, as its destination meanwhile. One that writes it already refuses it as a source."""
    try:
        return claims.hold(fd, path, exclusive=False)
    except claims.HeldError as exc:
        through = "" if exc.path == path else f" (through {exc.path})"
        raise SourceError(claims.live_log_refusal("source", path, exc.path)
                          or f"{path}: source is in use by a live clone that writes it (as its "
                          f"destination or metadata){through}") from None
