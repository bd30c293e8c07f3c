"""The one interface every source implements.

A source is read-only (SPEC invariant 4). Implementations open it read-only and never write.
All methods are trio-async. `read` may be called by many tasks at once; remote sources are
expected to keep many requests in flight.
"""

from __future__ import annotations

import abc
import errno
import hashlib
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

from ..errors import SourceError

log = logging.getLogger(__name__)

#: Bytes of each end of the image that its data sample covers: where partition tables, GPT
#: headers (with the disk's GUID) and an unpartitioned image's filesystem superblock (with its
#: UUID) lie. A partitioned disk's filesystems begin beyond (README, Limits).
SAMPLE_BYTES = 64 << 10

#: The key of the data sample in a source's identity.
SAMPLE_KEY = "sample_sha256"

#: What the sample covers, for messages.
SAMPLED = "its first and last 64 KiB"

#: The keys of a source's identity that name its version rather than the source itself: what
#: moves when the same file or object is written, grown or replaced.
VERSION_KEYS = ("size", "mtime_ns", "etag", "last_modified")

T = TypeVar("T")


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

    #: A SHA-256 of the image's first and last SAMPLE_BYTES once `take_sample` read them.
    sample: str | None = None

    @property
    def has_version_mark(self) -> bool:
        """Whether the identity tells versions of the image apart (a file's mtime, a strong
        ETag). One without (NBD, a block device known by its name) is also known by a sample
        of its data, which `open_source` takes."""
        return True

    def identity(self) -> dict[str, str | int]:
        """What identifies this source across runs: `own_identity`, and the data sample once
        taken. Stored in the metadata; a later open whose identity differs is refused
        (invariant 7)."""
        ident = self.own_identity()
        if self.sample is not None:
            ident[SAMPLE_KEY] = self.sample
        return ident

    @abc.abstractmethod
    def own_identity(self) -> dict[str, str | int]:
        """What names this source (path/URL, size, mtime or ETag...), the data sample apart."""

    def identity_matches(self, stored: dict) -> bool:
        """Whether `stored` (an identity recorded earlier) names this same source: by the
        kind's rule (`same_identity`), and with the same data sample where both have one."""
        current = self.identity()
        return (not sample_differs(stored, current)
                and self.same_identity(without_sample(stored), without_sample(current)))

    def same_identity(self, stored: dict, current: dict) -> bool:
        """The kind's rule: whether two identities (without samples) name the same source."""
        return stored == current

    def is_another_version(self, stored: dict) -> bool:
        """Whether `stored` (an identity recorded earlier that `identity_matches` refused)
        names this same source in another version: the two differ in VERSION_KEYS alone."""
        def unversioned(identity: dict) -> dict:
            return {key: value for key, value in without_sample(identity).items()
                    if key not in VERSION_KEYS}
        return self.same_identity(unversioned(stored), unversioned(self.identity()))

    async def take_sample(self) -> None:
        """Read the data sample (`sample`, see `read_sample`). Raises SourceError when it
        cannot be read: a source that does not serve its ends is not open."""
        try:
            self.sample = await self.read_sample(self.read)
        except SourceReadError as exc:
            raise SourceError(f"{self.description}: cannot read the start and end of the "
                              f"source: {exc}") from None

    async def read_sample(self, read: Callable[[int, int], Awaitable[bytes | bytearray]]) -> str:
        """A SHA-256 of the first and last SAMPLE_BYTES of the image (of the whole image when it
        is smaller), both read at once with `read`. Raises SourceReadError."""
        size = self.size
        if size <= 2 * SAMPLE_BYTES:
            spans = [(0, size)]
        else:
            spans = [(0, SAMPLE_BYTES), (size - SAMPLE_BYTES, SAMPLE_BYTES)]
        import trio  # not at import: the CLI's commands that open no source do without it

        pieces: dict[int, bytes | bytearray | SourceReadError] = {}

        async def read_piece(offset: int, length: int) -> None:
            try:
                pieces[offset] = await read(offset, length)
            except SourceReadError as exc:  # raised below, not as an ExceptionGroup
                pieces[offset] = exc

        async with trio.open_nursery() as nursery:
            for offset, length in spans:
                nursery.start_soon(read_piece, offset, length)
        digest = hashlib.sha256()
        for offset, _ in spans:
            piece = pieces[offset]
            if isinstance(piece, SourceReadError):
                raise piece
            digest.update(piece)
        return digest.hexdigest()

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

    def holds_no_data(self) -> bool:
        """Whether the source is known to hold no data at all (a local file without a data
        extent), which makes a refused new clone's SRC and DST look swapped. Default: not
        known."""
        return False

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


class SampleCheck:
    """For a source known by its data sample: nothing received after an event that may have
    brought other data (`events()` counts them: NBD connections dialled, failed HTTP requests;
    the server was away and may have come back on another image) is handed out until the
    sample has been read again, with `read`, and found equal. A differing one fails every
    later read for good (EIO), as a local file that changed does."""

    def __init__(self, source: Source, events: Callable[[], int],
                 read: Callable[[int, int], Awaitable[bytes | bytearray]]) -> None:
        import trio  # not at import: the CLI's commands that open no source do without it

        self._source = source
        self._events = events
        self._read = read
        self._trusted_events = 0  # events up to the last sample that matched
        self._checking = trio.Lock()
        self.changed: str | None = None  # why reads fail for good: the data changed

    async def taking(self, take_sample: Callable[[], Awaitable[None]]) -> None:
        """Take the source's sample with `take_sample`; what follows it is trusted."""
        await take_sample()
        self._trusted_events = self._events()

    async def trusted(self, receive: Callable[[], Awaitable[T]]) -> T:
        """What `receive()` receives, once it can be trusted; checked after receiving, so that
        an event on the way to it counts."""
        self._raise_if_changed()
        received = await receive()
        await self._check()
        return received

    def _raise_if_changed(self) -> None:
        if self.changed is not None:
            raise SourceReadError(errno.EIO, self.changed)

    async def _check(self) -> None:
        self._raise_if_changed()
        if self._source.sample is None or self._events() == self._trusted_events:
            return
        async with self._checking:
            events = self._events()
            if events == self._trusted_events:
                return  # checked meanwhile
            if await self._source.read_sample(self._read) != self._source.sample:
                self.changed = (f"{self._source.description}: the source changed since the "
                                f"clone began (the server came back with other data: {SAMPLED} "
                                "differ)")
                log.error("%s", self.changed)
                raise SourceReadError(errno.EIO, self.changed)
            self._trusted_events = events


def sample_differs(recorded: dict, current: dict) -> bool:
    """Whether two identities hold data samples that differ. One without a sample (recorded
    before samples were taken, or of a source with a version mark) differs in none."""
    then, now = recorded.get(SAMPLE_KEY), current.get(SAMPLE_KEY)
    return then is not None and now is not None and then != now


def without_sample(identity: dict) -> dict:
    """IDENTITY without its data sample."""
    return {key: value for key, value in identity.items() if key != SAMPLE_KEY}


def differences(recorded_size: int, recorded: dict, source: Source) -> str:
    """How `source` differs from what META recorded of it (`recorded`, of `recorded_size`
    bytes), field by field."""
    now = {**source.identity(), "size": source.size}
    then = {**recorded, "size": recorded_size}
    keys = sorted(key for key in now.keys() | then.keys()
                  if now.get(key) != then.get(key) and key != SAMPLE_KEY)
    fields = [f"{key} {now.get(key)} (the metadata records {then.get(key)})" for key in keys]
    if sample_differs(then, now):
        fields.append(f"its data differs from what the clone was made from ({SAMPLED})")
    return ", ".join(fields) or "the source says so"
