"""The metadata file: which regions of the destination hold valid data.

Layout (little-endian, 4 KiB blocks so that every write is one aligned block):

    block 0, 1          header slots A/B   (magic, version, seq, geometry, identities, flags, CRC)
    block 2 + 2i        hydrated bitmap block i, slot A (one bit per region)
    block 3 + 2i        hydrated bitmap block i, slot B
    block W + 2j, +1    written bitmap block j, slots A/B (format 2: one bit per chunk of
                        `written_granularity` bytes that users wrote, discarded or zeroed;
                        W = 2 + 2 * hydrated bitmap blocks)

Both bitmaps follow the same rules (`_BitmapArea`). Every bitmap block holds BITS_PER_BLOCK bits
and exists twice. A commit writes each
changed block into the slot that does *not* hold its newest valid copy, tagged with a sequence
number and a CRC, so a commit costs one 4 KiB write per changed block (SPEC invariant 5), never
the whole bitmap. A torn write can only spoil the slot being written; the other slot still holds
the last completed commit. Because hydrated bits only go 0 -> 1 (SPEC invariant 2), every valid
copy of a block is a subset of the newest one, and loading ORs all valid copies together: a crash
can only lose bits set since the last completed commit, never a bit an acknowledged flush made
durable. A slot that was never written is all zeros and reads as an empty block.

Format 1 had no written bitmap. A writable open upgrades it in place (`mark_open`), with the
header flag FLAG_WRITTEN_UNKNOWN: writes made before the upgrade were not tracked.

A header flag or feature bit this release does not know is refused, like a later format
version: a release that adds one thereby keeps older ones from misreading its METAs, or
clearing the bit when they write the header again (the features are rewritten whole).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
import struct
import threading
import uuid as uuidlib
import zlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Callable, Iterator, NoReturn

from bitarray import bitarray

from .blockio import (DataSync, data_extents, open_without_waiting, pread_exact, pwrite_all,
                      still_named, why_denied)
from .errors import (CANNOT_RESUME, FusecloneError, ImageTooLargeError, MetadataError,
                     MetadataFailedError, MetadataInUseError, describe)
from .regions import CompleteMap, Geometry, RegionMap
from .identity import same_recorded_identity
from .limits import available_memory
from .sources import describe_identity
from .sources.base import SAMPLED, Source, differences, without_sample

log = logging.getLogger(__name__)

BLOCK = 4096
MAGIC = b"FUSECLN1"
VERSION = 2
VERSION_WITHOUT_WRITTEN = 1  # no written bitmap: upgraded on a writable open
BITMAP_MAGIC = 0x4D424346  # "FCBM": slots of the hydrated bitmap
WRITTEN_MAGIC = 0x57424346  # "FCBW": slots of the written bitmap
FIRST_BITMAP_BLOCK = 2
# Written bits are kept per chunk of max(region size, 64 KiB), qemu's default dirty-bitmap
# granularity: with 4 KiB regions a first write to a chunk costs a META commit 16x less often
# and the bitmap is 16x smaller (2 MiB for 1 TiB), while a 64 KiB backup granularity is fine.
MIN_WRITTEN_GRANULARITY = 64 << 10

# Header: magic, version, seq, region_size, source_size, nr_regions, flags, features,
# hydration_threshold, hydration_batch_size, uuid, identity length (+ written_granularity in
# format 2). The identity JSON follows; the last 4 bytes of the slot are the CRC32 of everything
# before them.
_HEADER_V1 = struct.Struct("<8sIQQQQIIII16sI")
_HEADER = struct.Struct("<8sIQQQQIIII16sIQ")
MAX_HYDRATION_SETTING = 2**32 - 1  # hydration_threshold and hydration_batch_size are u32 above
# Bitmap slot: magic, block index, clone id (first 8 bytes of the uuid), seq, crc, pad.
_SLOT = struct.Struct("<IIQQII")
BITS_PER_BLOCK = (BLOCK - _SLOT.size) * 8
# Changed blocks whose committed bits are kept in core (one block's worth each, 4 KiB), so that
# a flush can tell whether its own regions' bits are in META; past that many (a discard of a
# whole large image), a changed block counts as not settled, as if every bit of it had changed.
DURABLE_IMAGES_MAX = 256
_PAYLOAD = BLOCK - _SLOT.size
_ZERO_BLOCK = bytes(BLOCK)

FLAG_CLEAN = 1 << 0
FLAG_WRITTEN_UNKNOWN = 1 << 1  # upgraded from format 1: writes before the upgrade are unknown
KNOWN_FLAGS = FLAG_CLEAN | FLAG_WRITTEN_UNKNOWN

FEATURE_NO_HYDRATION = 1 << 0
FEATURE_NO_DISCARD_PASSDOWN = 1 << 1
FEATURE_NO_COPY_ON_READ = 1 << 2
_FEATURE_NAMES = {
    FEATURE_NO_HYDRATION: "no_hydration",
    FEATURE_NO_DISCARD_PASSDOWN: "no_discard_passdown",
    FEATURE_NO_COPY_ON_READ: "no_copy_on_read",
}
KNOWN_FEATURES = sum(_FEATURE_NAMES)


def feature_names(features: int) -> list[str]:
    return [name for bit, name in _FEATURE_NAMES.items() if features & bit]


class MetadataMode(StrEnum):
    """dm-clone's metadata modes, as status shows them."""

    RW = "rw"
    RO = "ro"
    FAIL = "fail"  # a write failed: nothing is written any more until the next open


def written_granularity(region_size: int) -> int:
    return max(region_size, MIN_WRITTEN_GRANULARITY)


@dataclass
class Header:
    seq: int
    region_size: int
    source_size: int
    nr_regions: int
    flags: int
    features: int
    hydration_threshold: int
    hydration_batch_size: int
    uuid: bytes
    identity: dict = field(default_factory=dict)
    written_granularity: int = 0
    version: int = VERSION

    @property
    def clean(self) -> bool:
        return bool(self.flags & FLAG_CLEAN)

    @property
    def written_unknown(self) -> bool:
        """Whether users may have written regions the written bitmap does not show."""
        return self.version == VERSION_WITHOUT_WRITTEN or bool(self.flags & FLAG_WRITTEN_UNKNOWN)

    @property
    def clone_id(self) -> int:
        return int.from_bytes(self.uuid[:8], "little")

    def pack(self) -> bytes:
        if self.version != VERSION:
            raise MetadataError(f"metadata format {self.version} is only read, never written")
        ident = json.dumps(self.identity, sort_keys=True, separators=(",", ":")).encode()
        body = _HEADER.pack(
            MAGIC, VERSION, self.seq, self.region_size, self.source_size, self.nr_regions,
            self.flags, self.features, self.hydration_threshold, self.hydration_batch_size,
            self.uuid, len(ident), self.written_granularity,
        ) + ident
        if len(body) > BLOCK - 4:
            raise MetadataError("source/destination identity too long for the metadata header")
        body = body.ljust(BLOCK - 4, b"\0")
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def unpack(cls, block: bytes) -> Header | None:
        """The header in a slot, or None if the slot is empty, torn or not ours."""
        if len(block) < BLOCK or block[:8] != MAGIC:
            return None
        body, (crc,) = block[: BLOCK - 4], struct.unpack("<I", block[BLOCK - 4 : BLOCK])
        if zlib.crc32(body) != crc:
            return None
        (version,) = struct.unpack_from("<I", body, 8)
        if version == VERSION:
            layout, granularity = _HEADER, _HEADER.unpack_from(body)[-1]
        elif version == VERSION_WITHOUT_WRITTEN:
            layout, granularity = _HEADER_V1, 0
        else:
            raise MetadataError(f"metadata format version {version} is not supported (expected {VERSION})")
        (_, _, seq, region_size, source_size, nr_regions, flags, features, threshold,
         batch, uuid, ident_len) = layout.unpack_from(body)[:12]
        _refuse_unknown_bits(flags, features)
        ident = _parse_identity(body[layout.size : layout.size + ident_len])
        return cls(seq, region_size, source_size, nr_regions, flags, features, threshold, batch,
                   uuid, ident, granularity, version)


def _parse_identity(text: bytes) -> dict:
    """The header's identity: a JSON object, its source and destination objects too. A slot
    whose CRC holds may still carry another one (another writer's, or a crafted file)."""
    try:
        ident = json.loads(text)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep
        ident = None
    if not isinstance(ident, dict) or not all(isinstance(ident.get(role, {}), dict)
                                              for role in ("source", "destination")):
        raise MetadataError("corrupt header (its identity is not the JSON object fuseclone writes)")
    return ident


def _refuse_unknown_bits(flags: int, features: int) -> None:
    unknown = [f"{what} 0x{bits:x}" for what, bits in (("flags", flags & ~KNOWN_FLAGS),
                                                      ("features", features & ~KNOWN_FEATURES))
               if bits]
    if unknown:
        raise MetadataError(f"metadata header {' and '.join(unknown)} unknown to this release "
                            "(written by a later fuseclone?): use that release or a later one")


@dataclass
class SlotWrite:
    """One bitmap block of a commit: its 4 KiB slot image and where it goes."""

    area: _BitmapArea
    block: int
    slot: int  # 0/1
    image: bytes

    @property
    def offset(self) -> int:
        return self.area.slot_offset(self.block, self.slot)


@dataclass
class CommitBatch:
    """The changed bitmap blocks of one commit, copied out of the live maps."""

    seq: int
    writes: list[SlotWrite]

    @property
    def nbytes(self) -> int:
        return len(self.writes) * BLOCK


def _bitmap_blocks(nr_bits: int) -> int:
    return (nr_bits + BITS_PER_BLOCK - 1) // BITS_PER_BLOCK


def _slot_offset(block: int, slot: int) -> int:
    """Where a hydrated-bitmap slot lives (the written bitmap's come after them)."""
    return (FIRST_BITMAP_BLOCK + 2 * block + slot) * BLOCK


class _BitmapArea:
    """One crash-safe bitmap in the META file: `len(map)` bits in blocks of BITS_PER_BLOCK, each
    block in two slots from `first_block` on, slots tagged with `magic`, the block index, the
    clone id, a sequence number and a CRC. Bits only go 0 -> 1; `dirty` holds the blocks
    changed since their last commit, `current_slot` the slot of each block's newest copy
    (2 = none yet), `durable` the bits META holds for sure of each block changed since its
    last finished commit (its newest committed image; a block without one is as in core)."""

    def __init__(self, magic: int, first_block: int, nr_bits: int, clone_id: int,
                 bits: bitarray | None = None, current_slot: bytearray | None = None) -> None:
        self.magic = magic
        self.first_block = first_block
        self.clone_id = clone_id
        self.map: RegionMap = RegionMap(nr_bits, bits)
        self.nblocks = _bitmap_blocks(nr_bits)
        self.current_slot = current_slot if current_slot is not None else bytearray(b"\2" * self.nblocks)
        self.dirty: set[int] = set()
        self.durable: dict[int, bitarray | None] = {}  # None: too many to keep, not known

    def settled(self, bits: range) -> bool:
        """Whether META holds these bits as the core does. Per bit, not per block: a block
        covers BITS_PER_BLOCK regions (~128 MiB of 4 KiB ones), so while hydrating, the block
        of a region a user writes nearly always holds bits that hydration set since."""
        for block in _blocks_of(bits):
            if block not in self.durable:
                continue  # neither changed nor being committed
            durable = self.durable[block]
            if durable is None:
                return False  # not known bit by bit
            start = block * BITS_PER_BLOCK
            lo, hi = max(bits.start, start), min(bits.stop, start + BITS_PER_BLOCK)
            if durable.count(1, lo - start, hi - start) != self.map.count_hydrated(range(lo, hi)):
                return False  # bits only go 0 -> 1: a count tells whether any is missing
        return True

    @property
    def end_block(self) -> int:
        """One past the area's last file block."""
        return self.first_block + 2 * self.nblocks

    def slot_offset(self, block: int, slot: int) -> int:
        return (self.first_block + 2 * block + slot) * BLOCK

    def set(self, bits: range) -> int:
        """Set bits in core; returns how many were newly set."""
        if self.map.all_hydrated(bits):
            return 0
        blocks = _blocks_of(bits)
        for block in blocks:
            if block not in self.durable:  # what META holds of it, taken before the change
                fits = len(self.durable) < DURABLE_IMAGES_MAX
                self.durable[block] = self._block_bits(block) if fits else None
        self.dirty.update(blocks)
        return self.map.set_hydrated(bits)

    def prepare(self, seq: int) -> list[SlotWrite]:
        """Slot images of the dirty blocks, each for the slot not holding its newest copy."""
        writes = [SlotWrite(self, block, 1 if self.current_slot[block] == 0 else 0,
                            self._slot_image(block, seq)) for block in sorted(self.dirty)]
        self.dirty.clear()
        return writes

    def finish(self, write: SlotWrite) -> None:
        self.current_slot[write.block] = write.slot
        if write.block in self.dirty:  # changed since its image was taken
            self.durable[write.block] = self.bits_of(write)[1]
        else:
            self.durable.pop(write.block, None)

    def abort(self, write: SlotWrite) -> None:
        self.dirty.add(write.block)  # a later commit retries it

    def bits_of(self, write: SlotWrite) -> tuple[int, bitarray]:
        """(first bit, bits) that a slot image holds."""
        bits = bitarray(endian="little")
        bits.frombytes(write.image[_SLOT.size :])
        start = write.block * BITS_PER_BLOCK
        return start, bits[: min(BITS_PER_BLOCK, len(self.map) - start)]

    def _block_bits(self, block: int) -> bitarray:
        """A copy of the block's bits in core."""
        start = block * BITS_PER_BLOCK
        return self.map.bits[start : min(start + BITS_PER_BLOCK, len(self.map))]

    def _slot_image(self, block: int, seq: int) -> bytes:
        payload = self._block_bits(block).tobytes().ljust(_PAYLOAD, b"\0")
        head = _SLOT.pack(self.magic, block, self.clone_id, seq, 0, 0)
        crc = zlib.crc32(payload, zlib.crc32(head))
        return _SLOT.pack(self.magic, block, self.clone_id, seq, crc, 0) + payload

    @classmethod
    def load(cls, fd: int, path: str, name: str, magic: int, first_block: int, nr_bits: int,
             clone_id: int) -> tuple[_BitmapArea, int]:
        """Read the area: every valid copy of a block ORed together (bits are monotonic, so each
        valid copy is a subset of the newest). Returns the area and the newest seq found."""
        area = cls(magic, first_block, 0, clone_id)  # bitless: its slot layout reads the file
        nblocks = _bitmap_blocks(nr_bits)
        bits = bitarray(nblocks * BITS_PER_BLOCK, endian="little")
        bits.setall(0)
        current = bytearray(b"\2" * nblocks)
        max_seq = 0
        chunk_blocks = 256  # read 2 MiB at a time
        for first in range(0, nblocks, chunk_blocks):
            count = min(chunk_blocks, nblocks - first)
            data = os.pread(fd, 2 * count * BLOCK, area.slot_offset(first, 0))
            for i in range(count):
                block = first + i
                slots = [area._parse_slot(data[(2 * i + s) * BLOCK : (2 * i + s + 1) * BLOCK], block)
                         for s in (0, 1)]
                valid = [(s, v) for s, v in enumerate(slots) if v is not None]
                if not valid:
                    raise MetadataError(
                        f"{path}: corrupt metadata ({name} bitmap block {block} unreadable in both copies)")
                if len(valid) == 1:
                    log.warning("%s: %s bitmap block %d has one torn copy (interrupted commit); "
                                "using the other", path, name, block)
                block_bits = bits[block * BITS_PER_BLOCK : (block + 1) * BITS_PER_BLOCK]
                for _, (_, payload) in valid:
                    copy = bitarray(endian="little")
                    copy.frombytes(payload)
                    block_bits |= copy
                bits[block * BITS_PER_BLOCK : (block + 1) * BITS_PER_BLOCK] = block_bits
                newest_slot, (newest_seq, _) = max(valid, key=lambda sv: sv[1][0])
                if newest_seq:
                    current[block] = newest_slot
                    max_seq = max(max_seq, newest_seq)
        del bits[nr_bits:]
        return cls(magic, first_block, nr_bits, clone_id, bits, current), max_seq

    def _parse_slot(self, image: bytes, block: int) -> tuple[int, bytes] | None:
        """(seq, payload) of a valid slot; (0, zeros) for a never-written slot; None if torn."""
        if image == _ZERO_BLOCK:
            return 0, _ZERO_BLOCK[:_PAYLOAD]
        magic, index, cid, seq, crc, _ = _SLOT.unpack_from(image)
        payload = image[_SLOT.size :]
        head = _SLOT.pack(magic, index, cid, seq, 0, 0)
        if ((magic, index, cid) != (self.magic, block, self.clone_id)
                or zlib.crc32(payload, zlib.crc32(head)) != crc):
            return None
        return seq, payload


def _blocks_of(bits: range) -> range:
    """The bitmap blocks that hold these bits."""
    if not bits:
        return range(0)
    return range(bits.start // BITS_PER_BLOCK, (bits.stop - 1) // BITS_PER_BLOCK + 1)


def _written_geometry(header: Header) -> Geometry:
    """Chunks of the written bitmap (as regions of their own size)."""
    return Geometry(header.source_size, header.written_granularity)


def _needed_bytes(header: Header) -> int:
    """The least size of a META file with this header, of either format."""
    if header.version == VERSION:
        return _file_blocks(header) * BLOCK
    return (FIRST_BITMAP_BLOCK + 2 * _bitmap_blocks(header.nr_regions)) * BLOCK


def _file_blocks(header: Header) -> int:
    """File size in blocks of a format-2 META with this header."""
    hydrated = FIRST_BITMAP_BLOCK + 2 * _bitmap_blocks(header.nr_regions)
    return hydrated + 2 * _bitmap_blocks(_written_geometry(header).nr_regions)


class Metadata:
    """An open metadata file: header, in-core region maps, and crash-safe commits.

    The file is locked for as long as it is open (SPEC invariant 6): exclusively when writable,
    shared when read-only, so a live mount refuses any second opener.
    """

    def __init__(self, path: str, fd: int, header: Header, header_slot: int,
                 hydrated: _BitmapArea, written: _BitmapArea, writable: bool) -> None:
        self.path = path
        self._fd = fd
        # Commits of hydrated and of written bits, and header writes, may sync META at once.
        self._sync = DataSync(fd) if writable else None
        self.header = header
        self.geometry = Geometry(header.source_size, header.region_size)
        self.written_geometry = _written_geometry(header)
        self._hydrated = hydrated
        self._written = written
        self._seq = header.seq
        self._seq_lock = threading.Lock()
        # The slot of the newest valid header. The next header goes to the other one, whatever
        # the seq's parity (bitmap commits share the counter): a torn header write must fall
        # back to the header just before it, never to one two writes old (the last mount's
        # clean one, say).
        self._header_slot = header_slot
        # What both header slots hold, as this process last read or wrote them: a writer that
        # finds anything else there (META written over while open) writes no more.
        self._header_images = _header_slots(fd) if writable else None
        self._header_writing: int | None = None  # the slot a header write is changing now
        self.writable = writable
        self.mode = MetadataMode.RW if writable else MetadataMode.RO
        self.failure: str | None = None  # why the mode is FAIL
        self.on_fail: Callable[[], None] | None = None  # told once, when fail mode begins
        self.bytes_written = 0  # metadata bytes written by commits, for tests and status
        self._usage_at_close = (0, 0)  # block_usage() once the file is closed
        self._name_lock = threading.Lock()
        # META lost its name while open (check_named). A file just opened by its name has a
        # link: a filesystem that says 0 (some FUSE ones) counts no links, and is not asked.
        self._renamed = os.fstat(fd).st_nlink == 0
        if self._map.complete:
            hydrated.map = CompleteMap(header.nr_regions)

    @property
    def _map(self) -> RegionMap:
        """The hydrated bitmap: one bit per region (private: callers use the queries)."""
        return self._hydrated.map

    @property
    def _written_map(self) -> RegionMap:
        """The written bitmap: one bit per chunk of `written_geometry`."""
        return self._written.map

    # ---- opening -------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, geometry: Geometry, identity: dict, *, features: int = 0,
               hydration_threshold: int = 1, hydration_batch_size: int = 1) -> Metadata:
        """Create a new metadata file (it must not exist, or be empty, or be what a creation cut
        short leaves: see `exists`). Nothing is left behind on failure."""
        existed = os.path.exists(path)
        fd = _open_locked(path, os.O_RDWR | os.O_CREAT, exclusive=True)
        created_ok = formatted = False
        try:
            size = os.fstat(fd).st_size
            if size:
                existed = True  # never remove a file we did not make
                if not _creation_cut_short(fd):
                    raise MetadataError(f"{path}: refusing to format a non-empty metadata file")
            header = Header(seq=1, region_size=geometry.region_size,
                            source_size=geometry.image_size, nr_regions=geometry.nr_regions,
                            flags=0, features=features, hydration_threshold=hydration_threshold,
                            hydration_batch_size=hydration_batch_size,
                            uuid=uuidlib.uuid4().bytes, identity=identity,
                            written_granularity=written_granularity(geometry.region_size))
            formatted = True
            try:
                os.ftruncate(fd, _file_blocks(header) * BLOCK)  # sparse: never-written slots read as empty
                # A header in both slots, so that a torn first header write of a mount (a
                # power cut) still leaves one. Both written here, where a failure (a
                # full filesystem) is undone: a second write after create returned, which
                # failed, left this META behind while the new DST was removed, and every
                # retry was refused ("destination does not exist").
                for slot in (1, 0):  # seq 1 in slot 1, then the newest, seq 2, in slot 0
                    header.seq = 2 - slot
                    os.pwrite(fd, header.pack(), _header_offset(slot))
                os.fsync(fd)
            except OSError as exc:
                raise _unwritable(path, exc) from None
            hydrated, written = _empty_areas(header)
            meta = cls(path, fd, header, 0, hydrated, written, True)
            created_ok = True
            return meta
        finally:
            if not created_ok:
                # Undone while still locked: no other opener has taken the file meanwhile.
                if not existed:
                    _unlink_quietly(path)
                elif formatted:  # back to the SIZE zeros it was before we began
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, size)
                os.close(fd)

    @classmethod
    def open(cls, path: str, *, writable: bool = True, other_bitmaps: int = 0) -> Metadata:
        """Open and validate an existing metadata file. Changes nothing on disk until the caller
        calls mark_open() (which upgrades a format-1 file). `other_bitmaps`: see
        refuse_bitmaps_beyond_memory."""
        flags = os.O_RDWR if writable else os.O_RDONLY
        fd = _open_locked(path, flags, exclusive=writable)
        try:
            header, header_slot = _read_header(fd, path)
            refuse_bitmaps_beyond_memory(Geometry(header.source_size, header.region_size),
                                         header.written_granularity if header.version == VERSION else None,
                                         other_bitmaps)
            clone_id = header.clone_id
            hydrated, seq = _load_hydrated(fd, path, header)
            if header.version == VERSION:
                written, written_seq = _BitmapArea.load(
                    fd, path, "written", WRITTEN_MAGIC, hydrated.end_block,
                    _written_geometry(header).nr_regions, clone_id)
                seq = max(seq, written_seq)
            else:
                # Format 1 tracked no writes: an empty written bitmap, and `written_unknown`.
                header.written_granularity = written_granularity(header.region_size)
                written = _empty_areas(header)[1]
            header.seq = max(header.seq, seq)
            return cls(path, fd, header, header_slot, hydrated, written, writable)
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def read_header(path: str) -> Header:
        """The header of an existing metadata file, without its bitmaps (refused like `open`
        while a mount holds the file)."""
        fd = _open_locked(path, os.O_RDONLY, exclusive=False)
        try:
            return _read_header(fd, path)[0]
        finally:
            os.close(fd)

    @staticmethod
    def exists(path: str) -> bool:
        """Whether PATH holds metadata to resume (or a file that is no new META's to format):
        not a missing file, an empty one, nor what a mount killed while creating META (or a
        power cut before its fsync) leaves: sized, zeros where the header goes and holes past
        it. Such a file was never used (its header is durable before any other write), so
        formatting it again loses nothing; refused, it stopped every retry. (A file written
        full of zeros is not taken for one: it may be something else given as META.)"""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return st.st_size > 0
        try:
            fd = open_without_waiting(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return True  # the open that follows refuses it, with the reason
        try:
            return not _creation_cut_short(fd)
        finally:
            os.close(fd)

    @staticmethod
    def in_use(path: str) -> bool:
        """Whether a process holds the metadata file open (its lock), e.g. a mount still
        committing on its way out."""
        try:
            os.close(_open_locked(path, os.O_RDONLY, exclusive=False))
        except MetadataInUseError:
            return True
        except MetadataError:
            return False
        return False

    # ---- identity (SPEC invariant 7) --------------------------------------------------------

    def check_source(self, source: Source) -> None:
        """Refuse a metadata file that belongs to another source, or to another image the same
        source served (its data sample differs). The source decides whether a recorded identity
        names it (`Source.identity_matches`: an HTTP object behind a re-issued pre-signed URL
        does). The same source in another version (a file written or grown, an object
        replaced) is said to have changed, not to be another clone's."""
        recorded = self.header.identity.get("source")
        if not isinstance(recorded, dict):
            self._refuse_another("source", source.identity())
        same_size = self.header.source_size == source.size
        if same_size and source.identity_matches(recorded):
            return
        if same_size and source.identity_matches(without_sample(recorded)):
            raise MetadataError(
                f"{source.description}: its data differs from what the clone was made from "
                f"({SAMPLED} are not those {self.path} records): another image of the same size")
        if source.is_another_version(recorded):
            raise MetadataError(
                f"{source.description}: the source changed since the clone began: "
                f"{differences(self.header.source_size, recorded, source)}; the clone cannot "
                "resume from this version (its hydrated regions hold the earlier one's data)")
        if not same_size:
            raise MetadataError(
                f"{self.path} records a source of {self.header.source_size} bytes, but the source "
                f"has {source.size}: it belongs to another clone")
        self._refuse_another("source", source.identity())

    def check_destination(self, identity: dict) -> None:
        """Refuse a metadata file that belongs to another destination."""
        if not same_recorded_identity(self.header.identity.get("destination"), identity):
            self._refuse_another("destination", identity)

    def _refuse_another(self, role: str, identity: dict) -> NoReturn:
        raise MetadataError(
            f"{self.path} belongs to another clone: its {role} was "
            f"{describe_identity(self.header.identity.get(role))}, now {describe_identity(identity)}")

    # ---- region bits ---------------------------------------------------------------------

    def set_hydrated(self, regions: range) -> None:
        """Mark regions hydrated in core. The caller must have written their data to the
        destination already; it becomes durable at the next commit (invariant 1)."""
        self._hydrated.set(regions)

    def hydrated_bytes(self) -> int:
        """Bytes of the image in hydrated regions (a partial last region counts its part)."""
        return _bytes_set(self._map, self.geometry)

    # ---- hydrated bits: queries (the bitmap itself stays in here) ---------------------------

    @property
    def nr_regions(self) -> int:
        return len(self._hydrated.map)

    @property
    def hydrated_count(self) -> int:
        return self._hydrated.map.hydrated_count

    @property
    def complete(self) -> bool:
        """Whether every region is hydrated."""
        return self._hydrated.map.complete

    def is_hydrated(self, region: int) -> bool:
        return self._hydrated.map.is_hydrated(region)

    def all_hydrated(self, regions: range) -> bool:
        return self._hydrated.map.all_hydrated(regions)

    def all_unhydrated(self, regions: range) -> bool:
        return self._hydrated.map.all_unhydrated(regions)

    def hydrated_in(self, regions: range) -> int:
        """How many of `regions` are hydrated."""
        return self._hydrated.map.count_hydrated(regions)

    def next_unhydrated(self, start: int, stop: int | None = None) -> int:
        """The first unhydrated region in [start, stop), or -1."""
        return self._hydrated.map.next_unhydrated(start, stop)

    def next_hydrated(self, start: int, stop: int) -> int:
        """The first hydrated region in [start, stop), or -1."""
        return self._hydrated.map.next_hydrated(start, stop)

    def runs(self, regions: range) -> Iterator[tuple[bool, range]]:
        """`regions` split into maximal runs of equal state: (hydrated, run)."""
        return self._hydrated.map.runs(regions)

    @property
    def dirty(self) -> bool:
        """Whether hydrated bits wait for a commit."""
        return bool(self._hydrated.dirty)

    @property
    def written_dirty(self) -> bool:
        """Whether written bits wait for a commit."""
        return bool(self._written.dirty)

    def hydrated_settled(self, regions: range) -> bool:
        """Whether META already holds these regions' hydrated bits as the core does (bit by
        bit; False for every bit of a changed block whose image was not kept, past
        DURABLE_IMAGES_MAX)."""
        return self._hydrated.settled(regions)

    # ---- written bits (changed-block tracking) ---------------------------------------------

    def written_chunks(self, offset: int, length: int) -> range:
        """Chunks of the written bitmap that the byte range touches inside the image."""
        return self.written_geometry.region_span(offset, min(length, self.geometry.image_size - offset))

    def written_durable(self, offset: int, length: int) -> bool:
        """Whether every chunk of the byte range is marked written in META for sure: a user
        write may reach DST only then (write-ahead, see mark_written)."""
        chunks = self.written_chunks(offset, length)
        return not chunks or (self._written.map.all_hydrated(chunks) and self._written.settled(chunks))

    def mark_written(self, offset: int, length: int) -> None:
        """Mark the chunks of a user write, discard or zeroing written in core. Write-ahead:
        the caller lets the data reach DST only once `written_durable` (a commit of
        `prepare_written_commit`), or a crash could leave user data in DST that `check
        --verify` takes for a corrupt copy of the source."""
        self._written.set(self.written_chunks(offset, length))

    def prepare_written_commit(self) -> CommitBatch | None:
        """The changed written-bitmap blocks. Their commit needs no DST sync: the bits must
        reach META *before* the data they cover reaches DST."""
        return self._prepare([self._written])

    @property
    def written_extents(self) -> list[tuple[int, int]]:
        """(offset, length) of the written parts of the image, adjacent chunks merged."""
        g = self.written_geometry
        return [g.byte_range(run) for written, run in self.written_runs(range(g.nr_regions)) if written]

    def written_runs(self, chunks: range) -> Iterator[tuple[bool, range]]:
        """`chunks` (of `written_geometry`) split into maximal runs of equal state: (written, run)."""
        return self._written_map.runs(chunks)

    def is_written(self, chunk: int) -> bool:
        """Whether users wrote the chunk (of `written_geometry`), as the core knows it."""
        return self._written_map.is_hydrated(chunk)

    def written_bytes(self) -> int:
        return _bytes_set(self._written_map, self.written_geometry)

    def written_regions(self) -> int:
        """Regions inside written chunks (the ones `check --verify` does not compare)."""
        g = self.geometry
        per_chunk = self.written_geometry.region_size // g.region_size
        count = self._written_map.hydrated_count * per_chunk
        last = self.written_geometry.nr_regions - 1
        if last >= 0 and self.is_written(last):
            count -= per_chunk - len(g.region_span(*self.written_geometry.byte_range(range(last, last + 1))))
        return count

    # ---- commits -------------------------------------------------------------------------

    def prepare_commit(self) -> CommitBatch | None:
        """Copy the changed hydrated blocks out of the live map. Call it *before* making the
        destination durable: only bits whose data writes had completed are in the copy
        (invariant 1)."""
        return self._prepare([self._hydrated])

    def _prepare(self, areas: list[_BitmapArea]) -> CommitBatch | None:
        if not any(area.dirty for area in areas):
            return None
        seq = self._next_seq()
        return CommitBatch(seq, [w for area in areas for w in area.prepare(seq)])

    def write_commit(self, batch: CommitBatch) -> None:
        """Blocking: write the batch and fdatasync the metadata. Run it in a worker thread; a
        batch of hydrated bits only after the destination has been made durable (invariant 1)."""
        self.refuse_if_failed()
        self.check_named()
        try:
            for write in batch.writes:
                os.pwrite(self._fd, write.image, write.offset)
            self._sync()
        except OSError as exc:
            self.fail(f"a failed write of {self.path} ({describe(exc)})")
            raise
        # Looked at again once written: META may have lost its name meanwhile, and a commit
        # beside this one (written bits beside hydrated ones) have found that first and
        # written META's copy before these slots were written into the lost file. Only a
        # commit made while META had its name is in every copy made after it.
        self.check_named()
        self.bytes_written += batch.nbytes

    def finish_commit(self, batch: CommitBatch) -> None:
        for write in batch.writes:
            write.area.finish(write)
        if self._map.complete and not isinstance(self._map, CompleteMap):
            self._hydrated.map = CompleteMap(len(self._map))  # release the bitmap's memory

    def abort_commit(self, batch: CommitBatch) -> None:
        """The commit failed: its blocks stay dirty so a later commit retries them."""
        for write in batch.writes:
            write.area.abort(write)

    # ---- header updates ------------------------------------------------------------------

    def mark_open(self, identity: dict | None = None, *, features: int | None = None,
                  hydration_threshold: int | None = None,
                  hydration_batch_size: int | None = None) -> None:
        """Record that a writer has the file (clean flag cleared), and the settings it runs
        with (what offline status shows). The first change on disk; a format-1 file is upgraded
        here. IDENTITY (one `check_source` and `check_destination` accepted) replaces a
        recorded identity of another form: an older version kept a pre-signed URL's signature
        in it, a secret, which then goes from both header slots."""
        try:
            if self.header.version == VERSION_WITHOUT_WRITTEN:
                self._upgrade()
            self._set_settings(features, hydration_threshold, hydration_batch_size)
            rewrite = identity is not None and identity != self.header.identity
            if rewrite:
                self.header.identity = identity
            self._put_header(flags=self.header.flags & ~FLAG_CLEAN)
            if rewrite:  # the other slot still holds the old form
                self._put_header(flags=self.header.flags)
        except OSError as exc:
            raise _unwritable(self.path, exc) from None

    def _upgrade(self) -> None:
        """Format 1 -> 2, crash-safe in this order: first extend the file by the written bitmap
        (zero blocks read as empty slots) and make that durable, then write the format-2
        header. A crash before the header leaves a valid format-1 file that is merely longer
        (format 1 accepts extra length); the header write is the one switch. The upgraded
        header says that writes before it are unknown."""
        if not self.writable:
            raise MetadataError(f"{self.path} is open read-only")
        log.info("%s: upgrading metadata format %d to %d (changed-block tracking; writes made "
                 "before now are unknown)", self.path, VERSION_WITHOUT_WRITTEN, VERSION)
        os.ftruncate(self._fd, max(os.fstat(self._fd).st_size, _file_blocks(self.header) * BLOCK))
        os.fsync(self._fd)
        self.header.version = VERSION
        self.header.flags |= FLAG_WRITTEN_UNKNOWN

    def mark_clean(self) -> None:
        """Record a clean shutdown. Call after the last commit."""
        self._write_header(flags=self.header.flags | FLAG_CLEAN)

    def set_settings(self, *, features: int | None = None, hydration_threshold: int | None = None,
                     hydration_batch_size: int | None = None) -> None:
        """The settings in the header in core: written by the next `write_settings` (or the
        close's `mark_clean`)."""
        self._set_settings(features, hydration_threshold, hydration_batch_size)

    def write_settings(self) -> None:
        """Blocking: write the header with its settings as they are now, and fdatasync META.
        One header write at a time (each writes the slot the last one did not)."""
        self._write_header(flags=self.header.flags)

    def _set_settings(self, features: int | None, hydration_threshold: int | None,
                      hydration_batch_size: int | None) -> None:
        h = self.header
        if features is not None:
            h.features = features
        if hydration_threshold is not None:
            h.hydration_threshold = hydration_threshold
        if hydration_batch_size is not None:
            h.hydration_batch_size = hydration_batch_size

    def _write_header(self, *, flags: int) -> None:
        """Write the header of a clone in use; a failure is fail mode."""
        try:
            self._put_header(flags=flags)
        except OSError as exc:
            self.fail(f"a failed write of {self.path} ({describe(exc)})")
            raise

    def _put_header(self, *, flags: int) -> None:
        if not self.writable:
            raise MetadataError(f"{self.path} is open read-only")
        self.refuse_if_failed()
        self.check_named()
        self.header.seq = self._next_seq()
        self.header.flags = flags
        slot = 1 - self._header_slot
        image = self.header.pack()
        with self._name_lock:  # check_named compares the slots: not this one meanwhile
            self._header_writing = slot
        written = False
        try:
            written = os.pwrite(self._fd, image, _header_offset(slot)) == len(image)
            self._sync()
        finally:
            with self._name_lock:
                self._header_writing = None
                _set_slot(self._header_images, slot,
                          image if written else _slot(_header_slots(self._fd), slot))
        self._header_slot = slot

    def _next_seq(self) -> int:
        """The next sequence number: commits take theirs on the event loop, a header write in
        a worker thread."""
        with self._seq_lock:
            self._seq += 1
            return self._seq

    def block_usage(self) -> tuple[int, int]:
        """(used, total) 4 KiB blocks of the META file, dm-clone's "#used/#total metadata
        blocks": the file is laid out at full size but sparse, so the blocks a header or bitmap
        slot was ever written to are the ones it holds on disk (what `du` counts)."""
        if self._fd < 0:
            return self._usage_at_close
        st = os.fstat(self._fd)
        total = -(-st.st_size // BLOCK)
        return min(total, st.st_blocks * 512 // BLOCK), total

    # ---- fail mode -----------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """Enter fail mode: nothing is written any more, so META stays at its last good commit
        and a new open resumes from there. The first reason sticks; there is no way back."""
        if self.mode is MetadataMode.FAIL:
            return
        self.mode = MetadataMode.FAIL
        self.failure = reason
        log.error("%s", MetadataFailedError(reason))
        if self.on_fail is not None:
            self.on_fail()

    def fall_back_to_last_commit(self) -> None:
        """Blocking, in fail mode after DST lost data (its fdatasync failed): the hydrated bits
        in core become those of META's last good commit again. The kernel may have dropped
        copies whose bits were set since, and DST reads zeros or stale data there once their
        pages leave its cache; those regions are read from the source again, as the next mount
        would read them. The one way a bit goes back to 0, and only in core: nothing is
        committed in fail mode."""
        try:
            hydrated, _ = _load_hydrated(self._fd, self.path, self.header)
        except (OSError, MetadataError):
            log.exception("%s: cannot read the last good commit back: the regions hydrated "
                          "since are still read from the destination", self.path)
            return
        self._hydrated = hydrated

    def check_named(self) -> None:
        """Blocking: make sure META still has a name (before each write, after each commit,
        and every second while nothing is committed). One deleted, or renamed over, while
        mounted would take every commit with it at close, and the next mount would start a
        new clone over DST's data (hydration copying the source over users' writes). So its
        last good commit is written again under its name (or PATH.saved, when another file
        has the name now) and META goes to fail mode: that commit is what the next mount
        resumes from, and nothing is acknowledged that the copy does not hold. One truncated,
        or written over, while mounted goes to fail mode too (see below). Raises EIO in fail
        mode."""
        with self._name_lock:  # one copy, though a commit and the periodic look both ask
            st = os.fstat(self._fd)
            if not self._renamed and st.st_nlink == 0:
                self._renamed = True
                self.fail(f"{self.path} was {self._write_again()}")
            elif st.st_size < _needed_bytes(self.header):
                # Its bitmaps are gone; a commit past the cut would make the file whole again,
                # zeros for them, which the next mount would take for unhydrated regions and
                # copy the source over users' writes. Written no more, it stays short: refused.
                self.fail(f"{self.path} was truncated to {st.st_size} bytes while mounted (it "
                          f"needs {_needed_bytes(self.header)}): the bitmaps it held are gone, "
                          f"and {CANNOT_RESUME}")
            elif self._header_overwritten():
                # Written over in place (`dd if=/dev/zero of=META conv=notrunc`): its size
                # stays, and the bitmap blocks no commit rewrites would read as never written
                # (zeros) once a header write made the file valid again: the next mount would
                # copy the source over users' writes there. Written no more, it is refused.
                self.fail(f"{self.path} was overwritten while mounted (its header is not the one "
                          f"this mount wrote): the bitmaps it held may be gone too, and "
                          f"{CANNOT_RESUME}")
        self.refuse_if_failed()

    def _header_overwritten(self) -> bool:
        """Whether the header slots hold anything but what this writer last read or wrote
        there (but the one a header write is changing now). Under _name_lock."""
        if self._header_images is None:
            return False
        now = _header_slots(self._fd)
        return any(_slot(now, slot) != _slot(self._header_images, slot)
                   for slot in range(FIRST_BITMAP_BLOCK) if slot != self._header_writing)

    def current_name(self) -> str | None:
        """The path META has now (it may have been moved while open); None when it has none
        (deleted) or it cannot be told."""
        try:
            name = os.readlink(f"/proc/self/fd/{self._fd}")
        except OSError:
            return None
        return None if name.endswith(" (deleted)") or not name.startswith("/") else name

    def path_names_another_clone(self) -> bool:
        """Whether META's path names another clone's metadata now (one made there after this
        file was moved away, say): not this file, nor the copy check_named wrote there (the
        same clone), nor nothing or a file that is no metadata."""
        try:
            return Metadata.read_header(self.path).uuid != self.header.uuid
        except MetadataInUseError:  # a live mount's
            return True
        except (FusecloneError, OSError):
            return False

    def _write_again(self) -> str:
        how = "replaced" if os.path.lexists(self.path) else "deleted"
        try:
            where = _save_copy(self._fd, self.path)
        except OSError as exc:
            log.exception("%s: cannot write the metadata again", self.path)
            return f"{how} while mounted; its last good commit could not be written again ({describe(exc)})"
        return f"{how} while mounted; its last good commit was written again at {where}"

    def refuse_if_failed(self) -> None:
        """Raise EIO, with the reason, in fail mode."""
        if self.failure is not None:
            raise OSError(errno.EIO, str(MetadataFailedError(self.failure)))

    def close(self) -> None:
        if self._fd >= 0:
            self._usage_at_close = self.block_usage()  # status of a clone that has ended
            if self._sync is not None:
                self._sync.close()
            os.close(self._fd)  # also drops the lock
            self._fd = -1

    def __enter__(self) -> Metadata:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- helpers -------------------------------------------------------------------------------


def refuse_bitmaps_beyond_memory(geometry: Geometry, granularity: int | None = None,
                                 other_bitmaps: int = 0) -> None:
    """Refuse a clone whose in-core bitmaps (hydrated and written, `granularity` being the
    written one's chunk, and `other_bitmaps` more of one bit per region: an access trace's
    recorder) need more memory than this process may still use (`limits.available_memory`:
    the machine's, or its cgroup's): allocated, they fail with a MemoryError (2^63 bytes in
    4 KiB regions is 256 TiB of bitmap), or, when the kernel lets the allocation through, they
    push the machine, or the cgroup, into the OOM killer as they fill."""
    written = Geometry(geometry.image_size, granularity or written_granularity(geometry.region_size))
    needed = (geometry.nr_regions * (1 + other_bitmaps) + written.nr_regions) // 8
    available, bound = available_memory()
    if needed > available:
        from .status import human_bytes  # status imports this module
        raise ImageTooLargeError(
            f"an image of {geometry.image_size} bytes in regions of "
            f"{human_bytes(geometry.region_size)} needs {human_bytes(needed)} of memory for its "
            f"bitmaps, more than the {human_bytes(available)} {bound}: use a larger "
            "--region-size (it is fixed when META is created)")


def _load_hydrated(fd: int, path: str, header: Header) -> tuple[_BitmapArea, int]:
    """The hydrated bitmap as last committed; a complete one as a CompleteMap (no bitmap's
    memory held)."""
    hydrated, seq = _BitmapArea.load(fd, path, "hydrated", BITMAP_MAGIC, FIRST_BITMAP_BLOCK,
                                     header.nr_regions, header.clone_id)
    if hydrated.map.complete:
        hydrated.map = CompleteMap(header.nr_regions)
    return hydrated, seq


def _empty_areas(header: Header) -> tuple[_BitmapArea, _BitmapArea]:
    hydrated = _BitmapArea(BITMAP_MAGIC, FIRST_BITMAP_BLOCK, header.nr_regions, header.clone_id)
    written = _BitmapArea(WRITTEN_MAGIC, hydrated.end_block, _written_geometry(header).nr_regions,
                          header.clone_id)
    return hydrated, written


def _bytes_set(bits: RegionMap, geometry: Geometry) -> int:
    """Bytes of the image in the regions whose bit is set (the last region may be partial)."""
    nbytes = bits.hydrated_count * geometry.region_size
    last = geometry.nr_regions - 1
    if last >= 0 and bits.is_hydrated(last):
        nbytes -= geometry.region_size - (geometry.image_size - geometry.region_start(last))
    return nbytes


def _header_offset(slot: int) -> int:
    return slot * BLOCK


def _header_slots(fd: int) -> bytearray:
    """Both header slots as the file holds them."""
    return bytearray(os.pread(fd, FIRST_BITMAP_BLOCK * BLOCK, _header_offset(0)))


def _slot(slots: bytearray, slot: int) -> bytearray:
    return slots[_header_offset(slot):_header_offset(slot + 1)]


def _set_slot(slots: bytearray, slot: int, image: bytes) -> None:
    slots[_header_offset(slot):_header_offset(slot + 1)] = image


def _open_locked(path: str, flags: int, *, exclusive: bool) -> int:
    try:
        fd = open_without_waiting(path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        if flags & os.O_CREAT:  # a new META in a directory that does not exist
            raise MetadataError(f"{path}: cannot create metadata file: No such file or directory") from None
        raise MetadataError(f"{path}: metadata file does not exist") from None
    except IsADirectoryError:
        raise MetadataError(f"{path}: is a directory, not a metadata file") from None
    except PermissionError:
        raise MetadataError(f"{path}: {why_denied(path)}") from None
    except OSError as exc:  # a read-only filesystem, say
        raise MetadataError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a device's size is 0: it would be "formatted"
        os.close(fd)
        raise MetadataError(f"{path}: metadata must be a regular file")
    try:
        # Invariant 6: one process per metadata file.
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        looks_like_metadata = _has_a_header(fd)
        os.close(fd)
        if not looks_like_metadata:  # a live clone's destination, say, which it holds too
            raise MetadataError(f"{path}: not a fuseclone metadata file (a live clone holds it: "
                                "its destination?)") from None
        raise MetadataInUseError(
            f"{path}: metadata file is in use by another fuseclone process") from None
    if not still_named(fd, path):  # locked after its last holder removed it (a failed create)
        os.close(fd)
        raise MetadataError(f"{path}: metadata file was removed or replaced while it was being "
                            "opened: try again")
    return fd


def _creation_cut_short(fd: int) -> bool:
    """Whether the file is what a META's creation cut short leaves (see Metadata.exists):
    sized, and nothing but zeros in its header slots and holes past them."""
    header_end = FIRST_BITMAP_BLOCK * BLOCK
    if os.pread(fd, header_end, 0).strip(b"\0"):
        return False  # a header (every META in use): no need to walk its extents
    past = data_extents(fd, header_end, max(0, os.fstat(fd).st_size - header_end))
    return all(hole for _, _, hole in past)


def format_1_identity(path: str) -> dict | None:
    """The identities (source, destination) a format-1 META at PATH records, read without its
    lock (a live mount holds it); None for any other file, or one that cannot be read."""
    try:
        fd = open_without_waiting(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        header = _read_header(fd, path)[0]
    except (OSError, MetadataError, ValueError):  # another mount's META: never fail this one
        return None
    finally:
        os.close(fd)
    if header.version != VERSION_WITHOUT_WRITTEN:
        return None
    return header.identity


def _has_a_header(fd: int) -> bool:
    """Whether the file holds a valid header in either slot (read without its lock)."""
    if os.fstat(fd).st_size < FIRST_BITMAP_BLOCK * BLOCK:
        return False
    try:
        return any(Header.unpack(os.pread(fd, BLOCK, slot * BLOCK)) is not None for slot in (0, 1))
    except MetadataError:  # a header of a later release
        return True


def _read_header(fd: int, path: str) -> tuple[Header, int]:
    """The newest valid header and its slot."""
    size = os.fstat(fd).st_size
    if size < FIRST_BITMAP_BLOCK * BLOCK:
        raise MetadataError(f"{path}: not a fuseclone metadata file (too short)")
    try:
        candidates = [Header.unpack(os.pread(fd, BLOCK, slot * BLOCK)) for slot in (0, 1)]
    except MetadataError as exc:  # a format this release does not know
        raise MetadataError(f"{path}: {exc}") from None
    valid = [(slot, h) for slot, h in enumerate(candidates) if h is not None]
    if not valid:
        if _creation_cut_short(fd):  # see Metadata.exists
            raise MetadataError(f"{path}: holds no clone yet (a mount killed while creating it?); "
                                "`fuseclone mount` formats it as a new one")
        raise MetadataError(f"{path}: not a fuseclone metadata file, or its header is corrupt")
    slot, header = max(valid, key=lambda sh: sh[1].seq)
    try:
        geometry = Geometry(header.source_size, header.region_size)
        if header.version == VERSION:
            _written_geometry(header)
    except Exception as exc:
        raise MetadataError(f"{path}: corrupt header ({exc})") from None
    if header.version == VERSION and header.written_granularity < header.region_size:
        raise MetadataError(f"{path}: corrupt header (written granularity below the region size)")
    if geometry.nr_regions != header.nr_regions:
        raise MetadataError(f"{path}: corrupt header (region count does not match sizes)")
    needed = _needed_bytes(header)
    if size < needed:
        raise MetadataError(f"{path}: corrupt metadata (file is {size} bytes, needs {needed})")
    return header, slot



def _unwritable(path: str, exc: OSError) -> MetadataError:
    return MetadataError(f"{path}: cannot write the metadata file ({exc.strerror})")


def _save_copy(fd: int, path: str) -> str:
    """Blocking: copy the file open at FD (its data runs: META is sparse) to a new file at PATH,
    or at PATH.saved when PATH is taken; return where. Made durable under a temporary name
    first and linked into place, so a crash leaves no half-written META and nothing is
    overwritten."""
    target = path + ".saved" if os.path.lexists(path) else path
    temporary = f"{target}.{os.getpid()}.tmp"
    # Left by a daemon killed while it copied, which had this pid: no live process has it now.
    _unlink_quietly(temporary)
    out = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                  stat.S_IMODE(os.fstat(fd).st_mode))
    try:
        size = os.fstat(fd).st_size
        os.ftruncate(out, size)
        for offset, length, hole in data_extents(fd, 0, size):
            if hole:
                continue  # left a hole in the copy too (ftruncate above)
            for at in range(offset, offset + length, 1 << 20):
                pwrite_all(out, pread_exact(fd, min(1 << 20, offset + length - at), at), at)
        os.fsync(out)
        os.link(temporary, target)
    finally:
        os.close(out)
        _unlink_quietly(temporary)
    directory = os.open(os.path.dirname(os.path.abspath(target)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return target


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("could not remove half-created %s: %s", path, exc)
