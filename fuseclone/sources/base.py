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
#: UUID) lie.
SAMPLE_BYTES = 64 << 10

#: Bytes of the start of each partition (of the MBR or GPT in the first SAMPLE_BYTES) that the
#: partitions' sample covers: a partitioned disk's filesystems begin beyond its ends, and keep
#: their superblocks here (ext4's at 1 KiB, XFS's at 0, btrfs's at 64 KiB; FAT's tables).
PARTITION_SAMPLE_BYTES = 128 << 10
MAX_SAMPLED_PARTITIONS = 16

#: The keys of the data samples in a source's identity: of the ends, and of the partitions'
#: starts (only an image that begins with a partition table has that one).
SAMPLE_KEY = "sample_sha256"
PARTITIONS_KEY = "partitions_sha256"
SAMPLE_KEYS = (SAMPLE_KEY, PARTITIONS_KEY)

#: What the samples cover, for messages.
SAMPLED = "its first and last 64 KiB and the start of each partition"

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

    #: A SHA-256 of the image's first and last SAMPLE_BYTES once `take_sample` read them, and
    #: of its partitions' starts when it has a partition table (see `read_sample`).
    sample: str | None = None
    partitions_sample: str | None = None

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
        if self.partitions_sample is not None:
            ident[PARTITIONS_KEY] = self.partitions_sample
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
        """Read the data samples (`sample` and `partitions_sample`, see `read_sample`). Raises
        SourceError when they cannot be read: a source that does not serve them is not open."""
        try:
            self.sample, self.partitions_sample = await self.read_sample(self.read)
        except SourceReadError as exc:
            raise SourceError(f"{self.description}: cannot read the start and end of the "
                              f"source: {exc}") from None

    async def read_sample(self, read: Callable[[int, int], Awaitable[bytes | bytearray]]
                          ) -> tuple[str, str | None]:
        """The data samples, read with `read`: a SHA-256 of the first and last SAMPLE_BYTES of
        the image (of the whole image when it is smaller), both read at once; and when the
        first begin with a partition table, a SHA-256 of the first PARTITION_SAMPLE_BYTES of
        each partition, read at once after (None without one). Raises SourceReadError."""
        size = self.size
        if size <= 2 * SAMPLE_BYTES:
            ends = [(0, size)]
        else:
            ends = [(0, SAMPLE_BYTES), (size - SAMPLE_BYTES, SAMPLE_BYTES)]
        pieces = await _read_spans(read, ends)
        starts = partition_starts(pieces[0], size)
        if not starts:
            return _sha256(pieces), None
        partitions = await _read_spans(read, [(start, min(PARTITION_SAMPLE_BYTES, size - start))
                                              for start in starts])
        return _sha256(pieces), _sha256(partitions)

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
            if await self._source.read_sample(self._read) != (self._source.sample,
                                                               self._source.partitions_sample):
                self.changed = (f"{self._source.description}: the source changed since the "
                                f"clone began (the server came back with other data: {SAMPLED} "
                                "differ)")
                log.error("%s", self.changed)
                raise SourceReadError(errno.EIO, self.changed)
            self._trusted_events = events


def sample_differs(recorded: dict, current: dict) -> bool:
    """Whether two identities hold data samples that differ. One without a sample (recorded
    before samples were taken, or of a source with a version mark) differs in none; one
    without the partitions' sample (recorded before those were taken) differs in its ends'."""
    return any(recorded.get(key) is not None and current.get(key) is not None
               and recorded[key] != current[key] for key in SAMPLE_KEYS)


def without_sample(identity: dict) -> dict:
    """IDENTITY without its data samples."""
    return {key: value for key, value in identity.items() if key not in SAMPLE_KEYS}


def partition_starts(head: bytes | bytearray, size: int) -> list[int]:
    """Where the partitions of the GPT or MBR at the start of an image (`head`, its first
    bytes) begin, in bytes: those inside its `size`, at most MAX_SAMPLED_PARTITIONS; [] when
    it has no partition table. Extended MBR partitions are left out (their logical ones
    begin further on)."""
    if len(head) < 512 or head[510:512] != b"\x55\xaa":
        return []
    starts = _gpt_starts(head)
    if starts is None:
        starts = []
        for entry in range(446, 510, 16):
            kind = head[entry + 4]
            first = int.from_bytes(head[entry + 8:entry + 12], "little")
            sectors = int.from_bytes(head[entry + 12:entry + 16], "little")
            if kind not in _NOT_A_PARTITION and first and sectors:
                starts.append(first * 512)
    return sorted({start for start in starts if 0 < start < size})[:MAX_SAMPLED_PARTITIONS]


# MBR partition types that hold no filesystem of their own: none, extended (CHS, LBA, Linux),
# GPT's protective one.
_NOT_A_PARTITION = frozenset({0x00, 0x05, 0x0F, 0x85, 0xEE})
_GPT_ENTRY = 48  # the bytes of a GPT entry read here: type GUID, partition GUID, first LBA...


def _gpt_starts(head: bytes | bytearray) -> list[int] | None:
    """The first byte of each used entry of the GPT in `head` (its header in LBA 1 of 512- or
    4096-byte sectors; entries beyond `head` are not seen), or None without a GPT."""
    for sector in (512, 4096):
        if head[sector:sector + 8] != b"EFI PART" or len(head) < sector + 88:
            continue
        entries = int.from_bytes(head[sector + 72:sector + 80], "little") * sector
        count = int.from_bytes(head[sector + 80:sector + 84], "little")
        entry_size = int.from_bytes(head[sector + 84:sector + 88], "little")
        if entry_size < _GPT_ENTRY:
            return []
        starts = []
        for at in range(entries, entries + count * entry_size, entry_size):
            if at + _GPT_ENTRY > len(head):
                break
            if any(head[at:at + 16]):  # a type GUID of zeros: an unused entry
                starts.append(int.from_bytes(head[at + 32:at + 40], "little") * sector)
        return starts
    return None


async def _read_spans(read: Callable[[int, int], Awaitable[bytes | bytearray]],
                      spans: list[tuple[int, int]]) -> list[bytes | bytearray]:
    """The (offset, length) `spans`, read all at once with `read`, in their order. Raises
    the SourceReadError of the first that failed."""
    import trio  # not at import: the CLI's commands that open no source do without it

    pieces: list[bytes | bytearray | SourceReadError] = [b""] * len(spans)

    async def read_piece(index: int, offset: int, length: int) -> None:
        try:
            pieces[index] = await read(offset, length)
        except SourceReadError as exc:  # raised below, not as an ExceptionGroup
            pieces[index] = exc

    async with trio.open_nursery() as nursery:
        for index, (offset, length) in enumerate(spans):
            nursery.start_soon(read_piece, index, offset, length)
    for piece in pieces:
        if isinstance(piece, SourceReadError):
            raise piece
    return pieces  # type: ignore[return-value]


def _sha256(pieces: list[bytes | bytearray]) -> str:
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


def differences(recorded_size: int, recorded: dict, source: Source) -> str:
    """How `source` differs from what META recorded of it (`recorded`, of `recorded_size`
    bytes), field by field."""
    now = {**source.identity(), "size": source.size}
    then = {**recorded, "size": recorded_size}
    keys = sorted(key for key in now.keys() | then.keys()
                  if now.get(key) != then.get(key) and key not in SAMPLE_KEYS)
    fields = [f"{key} {now.get(key)} (the metadata records {then.get(key)})" for key in keys]
    if sample_differs(then, now):
        fields.append(f"its data differs from what the clone was made from ({SAMPLED})")
    return ", ".join(fields) or "the source says so"
