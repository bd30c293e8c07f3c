"""The one interface every source implements.

A source is read-only (SPEC invariant 4). Implementations open it read-only and never write.
All methods are trio-async. `read` may be called by many tasks at once; remote sources are
expected to keep many requests in flight.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass


@dataclass(frozen=True)
class Extent:
    """A byte range of the source and whether it is known to read as zeros (hole or zero)."""

    offset: int
    length: int
    zero: bool


@dataclass(frozen=True)
class ServerStatus:
    """One server of a source (the primary or a mirror), as status shows it."""

    source: str  # the URL or path the user gave
    role: str  # "primary" or "mirror"
    state: str  # "serving", "standby", "failing", "unreachable" or "refused"
    error: str | None = None  # why it is not serving (the last error, or the identity mismatch)


class Source(abc.ABC):
    """Async, read-only access to the source image."""

    #: The URL or path the user gave, for messages and status.
    description: str

    #: Bytes of hydration copies worth keeping in flight by default (the hydration threshold
    #: when the user sets none). A local file needs little; a remote server with latency needs
    #: enough requests outstanding to keep its disk and the link busy.
    hydration_depth: int = 16 << 20

    #: Bytes per hydration copy by default (the hydration batch size when the user sets none).
    hydration_batch: int = 4 << 20

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Size of the source in bytes (the image size)."""

    @abc.abstractmethod
    def identity(self) -> dict[str, str | int]:
        """What identifies this source across runs (path/URL, size, mtime or ETag...).

        Stored in the metadata; a later open whose identity differs is refused (invariant 7).
        """

    def identity_matches(self, stored: dict) -> bool:
        """Whether `stored` (an identity recorded earlier) names this same source."""
        return stored == self.identity()

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """Exactly `length` bytes at `offset` (clipped to the size), bytes-like and the caller's
        to keep. Raises SourceReadError."""

    async def read_for_copy(self, offset: int, length: int):
        """`read` for a hydration copy, which is written to DST and then recycled: a source may
        return page-aligned memory (an mmap) here, which DST can take with direct I/O. Such a
        buffer is bytes-like but compares by identity, so only the copy path gets one."""
        return await self.read(offset, length)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """Zero/data map of [offset, offset+length). Default: all data, nothing known."""
        return [Extent(offset, length, zero=False)]

    async def wait_usable(self) -> str | None:
        """Return once the source can serve reads: None; or why it never will (it answered
        with another image than the one recorded). A source that opened is usable at once."""
        return None

    def servers(self) -> list[ServerStatus]:
        """The servers behind the source and which one serves reads now."""
        return [ServerStatus(self.description, "primary", "serving")]

    def recycle(self, data: bytes | bytearray) -> None:
        """Hand back what `read` returned, once nothing refers to it any more; a source may
        reuse the buffer for a later read. Optional for callers; default: nothing."""

    async def aclose(self) -> None:
        """Release connections and file descriptors."""


class SourceReadError(OSError):
    """A read the source could not deliver (user reads get EIO; hydration backs off)."""
