"""The metadata file: which regions of the destination hold valid data.

Layout (little-endian, 4 KiB blocks so that every write is one aligned block):

    block 0, 1      header slots A/B   (magic, version, seq, geometry, identities, flags, CRC)
    block 2 + 2i    bitmap block i, slot A
    block 3 + 2i    bitmap block i, slot B

Every bitmap block holds BITS_PER_BLOCK region bits and exists twice. A commit writes each
changed block into the slot that does *not* hold its newest valid copy, tagged with a sequence
number and a CRC, so a commit costs one 4 KiB write per changed block (SPEC invariant 5), never
the whole bitmap. A torn write can only spoil the slot being written; the other slot still holds
the last completed commit. Because hydrated bits only go 0 -> 1 (SPEC invariant 2), every valid
copy of a block is a subset of the newest one, and loading ORs all valid copies together: a crash
can only lose bits set since the last completed commit, never a bit an acknowledged flush made
durable. A slot that was never written is all zeros and reads as an empty block.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import struct
import uuid as uuidlib
import zlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Callable

from bitarray import bitarray

from .errors import MetadataError, MetadataFailedError, MetadataInUseError, describe
from .regions import CompleteMap, Geometry, RegionMap

log = logging.getLogger(__name__)

BLOCK = 4096
MAGIC = b"FUSECLN1"
VERSION = 1
BITMAP_MAGIC = 0x4D424346  # "FCBM"
FIRST_BITMAP_BLOCK = 2

# Header: magic, version, seq, region_size, source_size, nr_regions, flags, features,
# hydration_threshold, hydration_batch_size, uuid, identity length. The identity JSON follows;
# the last 4 bytes of the slot are the CRC32 of everything before them.
_HEADER = struct.Struct("<8sIQQQQIIII16sI")
# Bitmap slot: magic, block index, clone id (first 8 bytes of the uuid), seq, crc, pad.
_SLOT = struct.Struct("<IIQQII")
BITS_PER_BLOCK = (BLOCK - _SLOT.size) * 8
_PAYLOAD = BLOCK - _SLOT.size
_ZERO_BLOCK = bytes(BLOCK)

FLAG_CLEAN = 1 << 0

FEATURE_NO_HYDRATION = 1 << 0
FEATURE_NO_DISCARD_PASSDOWN = 1 << 1
FEATURE_NO_COPY_ON_READ = 1 << 2
_FEATURE_NAMES = {
    FEATURE_NO_HYDRATION: "no_hydration",
    FEATURE_NO_DISCARD_PASSDOWN: "no_discard_passdown",
    FEATURE_NO_COPY_ON_READ: "no_copy_on_read",
}


def feature_names(features: int) -> list[str]:
    return [name for bit, name in _FEATURE_NAMES.items() if features & bit]


class MetadataMode(StrEnum):
    """dm-clone's metadata modes, as status shows them."""

    RW = "rw"
    RO = "ro"
    FAIL = "fail"  # a write failed: nothing is written any more until the next open


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

    @property
    def clean(self) -> bool:
        return bool(self.flags & FLAG_CLEAN)

    @property
    def clone_id(self) -> int:
        return int.from_bytes(self.uuid[:8], "little")

    def pack(self) -> bytes:
        ident = json.dumps(self.identity, sort_keys=True, separators=(",", ":")).encode()
        body = _HEADER.pack(
            MAGIC, VERSION, self.seq, self.region_size, self.source_size, self.nr_regions,
            self.flags, self.features, self.hydration_threshold, self.hydration_batch_size,
            self.uuid, len(ident),
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
        (_, version, seq, region_size, source_size, nr_regions, flags, features, threshold,
         batch, uuid, ident_len) = _HEADER.unpack_from(body)
        if version != VERSION:
            raise MetadataError(f"metadata format version {version} is not supported (expected {VERSION})")
        ident = json.loads(body[_HEADER.size : _HEADER.size + ident_len])
        return cls(seq, region_size, source_size, nr_regions, flags, features, threshold, batch,
                   uuid, ident)


@dataclass
class CommitBatch:
    """The changed bitmap blocks of one commit, copied out of the live map."""

    seq: int
    writes: list[tuple[int, int, bytes]]  # (block index, slot 0/1, 4 KiB slot image)

    @property
    def nbytes(self) -> int:
        return len(self.writes) * BLOCK


def _bitmap_blocks(nr_regions: int) -> int:
    return (nr_regions + BITS_PER_BLOCK - 1) // BITS_PER_BLOCK


def _slot_offset(block: int, slot: int) -> int:
    return (FIRST_BITMAP_BLOCK + 2 * block + slot) * BLOCK


class Metadata:
    """An open metadata file: header, in-core region map, and crash-safe commits.

    The file is locked for as long as it is open (SPEC invariant 6): exclusively when writable,
    shared when read-only, so a live mount refuses any second opener.
    """

    def __init__(self, path: str, fd: int, header: Header, bits: bitarray,
                 current_slot: bytearray, writable: bool) -> None:
        self.path = path
        self._fd = fd
        self.header = header
        self.geometry = Geometry(header.source_size, header.region_size)
        self.map: RegionMap = RegionMap(header.nr_regions, bits)
        # current_slot[i]: slot holding block i's newest valid copy (2 = none yet).
        self._current_slot = current_slot
        self._dirty: set[int] = set()
        self._seq = header.seq
        self.writable = writable
        self.mode = MetadataMode.RW if writable else MetadataMode.RO
        self.failure: str | None = None  # why the mode is FAIL
        self.bytes_written = 0  # metadata bytes written by commits, for tests and status
        if self.map.complete:
            self.map = CompleteMap(header.nr_regions)

    # ---- opening -------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, geometry: Geometry, identity: dict, *, features: int = 0,
               hydration_threshold: int = 1, hydration_batch_size: int = 1) -> Metadata:
        """Create a new metadata file (it must not exist or be empty). Nothing is left behind
        on failure."""
        existed = os.path.exists(path)
        fd = _open_locked(path, os.O_RDWR | os.O_CREAT, exclusive=True)
        created_ok = formatted = False
        try:
            if os.fstat(fd).st_size != 0:
                existed = True  # never remove a file we did not make
                raise MetadataError(f"{path}: refusing to format a non-empty metadata file")
            header = Header(seq=1, region_size=geometry.region_size,
                            source_size=geometry.image_size, nr_regions=geometry.nr_regions,
                            flags=0, features=features, hydration_threshold=hydration_threshold,
                            hydration_batch_size=hydration_batch_size,
                            uuid=uuidlib.uuid4().bytes, identity=identity)
            total = (FIRST_BITMAP_BLOCK + 2 * _bitmap_blocks(geometry.nr_regions)) * BLOCK
            formatted = True
            try:
                os.ftruncate(fd, total)  # sparse: never-written slots read as empty blocks
                os.pwrite(fd, header.pack(), _header_offset(header.seq))
                os.fsync(fd)
            except OSError as exc:
                raise _unwritable(path, exc) from None
            bits = bitarray(geometry.nr_regions, endian="little")
            bits.setall(0)
            meta = cls(path, fd, header, bits, bytearray(b"\2" * _bitmap_blocks(geometry.nr_regions)), True)
            created_ok = True
            return meta
        finally:
            if not created_ok:
                os.close(fd)
                if not existed:
                    _unlink_quietly(path)
                elif formatted:
                    os.truncate(path, 0)  # it was an empty file before we began

    @classmethod
    def open(cls, path: str, *, writable: bool = True) -> Metadata:
        """Open and validate an existing metadata file. Changes nothing on disk until the caller
        calls mark_open()."""
        flags = os.O_RDWR if writable else os.O_RDONLY
        fd = _open_locked(path, flags, exclusive=writable)
        try:
            header = _read_header(fd, path)
            bits, current, seq = _read_bitmap(fd, path, header)
            header.seq = max(header.seq, seq)
            return cls(path, fd, header, bits, current, writable)
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def exists(path: str) -> bool:
        try:
            return os.stat(path).st_size > 0
        except FileNotFoundError:
            return False

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

    def check_matches(self, geometry_image_size: int, identity: dict,
                      source_matches: Callable[[dict], bool] | None = None) -> None:
        """Refuse a metadata file that belongs to another source or destination.
        `source_matches(stored)` decides for the source when the source knows better than
        equality (an HTTP object behind a re-issued pre-signed URL)."""
        if self.header.source_size != geometry_image_size:
            raise MetadataError(
                f"{self.path} records a source of {self.header.source_size} bytes, but the source "
                f"has {geometry_image_size}: it belongs to another clone")
        stored = self.header.identity
        for role in ("source", "destination"):
            recorded = stored.get(role)
            if role == "source" and source_matches is not None and isinstance(recorded, dict):
                same = source_matches(recorded)
            else:
                same = recorded == identity.get(role)
            if not same:
                raise MetadataError(
                    f"{self.path} belongs to another clone: its {role} was "
                    f"{_describe(stored.get(role))}, now {_describe(identity.get(role))}")

    # ---- region bits ---------------------------------------------------------------------

    def set_hydrated(self, regions: range) -> None:
        """Mark regions hydrated in core. The caller must have written their data to the
        destination already; it becomes durable at the next commit (invariant 1)."""
        if self.map.set_hydrated(regions):
            first = regions.start // BITS_PER_BLOCK
            last = (regions.stop - 1) // BITS_PER_BLOCK
            self._dirty.update(range(first, last + 1))

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    # ---- commits -------------------------------------------------------------------------

    def prepare_commit(self) -> CommitBatch | None:
        """Copy the changed blocks out of the live map. Call it *before* making the destination
        durable: only bits whose data writes had completed are in the copy (invariant 1)."""
        if not self._dirty:
            return None
        self._seq += 1
        writes = []
        for block in sorted(self._dirty):
            slot = 1 if self._current_slot[block] == 0 else 0
            writes.append((block, slot, self._slot_image(block, self._seq)))
        self._dirty.clear()
        return CommitBatch(self._seq, writes)

    def write_commit(self, batch: CommitBatch) -> None:
        """Blocking: write the batch and fdatasync the metadata. Run it in a worker thread,
        only after the destination has been made durable (invariant 1)."""
        self.refuse_if_failed()
        try:
            for block, slot, image in batch.writes:
                os.pwrite(self._fd, image, _slot_offset(block, slot))
            os.fdatasync(self._fd)
        except OSError as exc:
            self.fail(f"a failed write of {self.path} ({describe(exc)})")
            raise
        self.bytes_written += batch.nbytes

    def finish_commit(self, batch: CommitBatch) -> None:
        for block, slot, _ in batch.writes:
            self._current_slot[block] = slot
        if self.map.complete and not isinstance(self.map, CompleteMap):
            self.map = CompleteMap(len(self.map))  # release the bitmap's memory

    def abort_commit(self, batch: CommitBatch) -> None:
        """The commit failed: its blocks stay dirty so a later commit retries them."""
        self._dirty.update(block for block, _, _ in batch.writes)

    def _slot_image(self, block: int, seq: int) -> bytes:
        start = block * BITS_PER_BLOCK
        stop = min(start + BITS_PER_BLOCK, len(self.map))
        payload = self.map.bits[start:stop].tobytes().ljust(_PAYLOAD, b"\0")
        head = _SLOT.pack(BITMAP_MAGIC, block, self.header.clone_id, seq, 0, 0)
        crc = zlib.crc32(payload, zlib.crc32(head))
        return _SLOT.pack(BITMAP_MAGIC, block, self.header.clone_id, seq, crc, 0) + payload

    # ---- header updates ------------------------------------------------------------------

    def mark_open(self) -> None:
        """Record that a writer has the file (clean flag cleared). The first change on disk."""
        try:
            self._put_header(flags=self.header.flags & ~FLAG_CLEAN)
        except OSError as exc:
            raise _unwritable(self.path, exc) from None

    def mark_clean(self) -> None:
        """Record a clean shutdown. Call after the last commit."""
        self._write_header(flags=self.header.flags | FLAG_CLEAN)

    def update_settings(self, *, features: int | None = None, hydration_threshold: int | None = None,
                        hydration_batch_size: int | None = None) -> None:
        h = self.header
        if features is not None:
            h.features = features
        if hydration_threshold is not None:
            h.hydration_threshold = hydration_threshold
        if hydration_batch_size is not None:
            h.hydration_batch_size = hydration_batch_size
        self._write_header(flags=h.flags)

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
        self._seq += 1
        self.header.seq = self._seq
        self.header.flags = flags
        os.pwrite(self._fd, self.header.pack(), _header_offset(self._seq))
        os.fdatasync(self._fd)

    # ---- fail mode -----------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """Enter fail mode: nothing is written any more, so META stays at its last good commit
        and a new open resumes from there. The first reason sticks; there is no way back."""
        if self.mode is MetadataMode.FAIL:
            return
        self.mode = MetadataMode.FAIL
        self.failure = reason
        log.error("%s", MetadataFailedError(reason))

    def refuse_if_failed(self) -> None:
        """Raise EIO, with the reason, in fail mode."""
        if self.failure is not None:
            raise OSError(errno.EIO, str(MetadataFailedError(self.failure)))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # also drops the lock
            self._fd = -1

    def __enter__(self) -> Metadata:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- helpers -------------------------------------------------------------------------------


def _header_offset(seq: int) -> int:
    return (seq % 2) * BLOCK


def _open_locked(path: str, flags: int, *, exclusive: bool) -> int:
    try:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        raise MetadataError(f"{path}: metadata file does not exist") from None
    except IsADirectoryError:
        raise MetadataError(f"{path}: is a directory, not a metadata file") from None
    except PermissionError:
        raise MetadataError(f"{path}: permission denied") from None
    except OSError as exc:  # a read-only filesystem, say
        raise MetadataError(f"{path}: {exc.strerror}") from None
    try:
        # Invariant 6: one process per metadata file.
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MetadataInUseError(
            f"{path}: metadata file is in use by another fuseclone process") from None
    return fd


def _read_header(fd: int, path: str) -> Header:
    size = os.fstat(fd).st_size
    if size < FIRST_BITMAP_BLOCK * BLOCK:
        raise MetadataError(f"{path}: not a fuseclone metadata file (too short)")
    candidates = [Header.unpack(os.pread(fd, BLOCK, slot * BLOCK)) for slot in (0, 1)]
    valid = [h for h in candidates if h is not None]
    if not valid:
        raise MetadataError(f"{path}: not a fuseclone metadata file, or its header is corrupt")
    header = max(valid, key=lambda h: h.seq)
    try:
        geometry = Geometry(header.source_size, header.region_size)
    except Exception as exc:
        raise MetadataError(f"{path}: corrupt header ({exc})") from None
    if geometry.nr_regions != header.nr_regions:
        raise MetadataError(f"{path}: corrupt header (region count does not match sizes)")
    needed = (FIRST_BITMAP_BLOCK + 2 * _bitmap_blocks(header.nr_regions)) * BLOCK
    if size < needed:
        raise MetadataError(f"{path}: corrupt metadata (file is {size} bytes, needs {needed})")
    return header


def _parse_slot(image: bytes, block: int, clone_id: int) -> tuple[int, bytes] | None:
    """(seq, payload) of a valid slot; (0, zeros) for a never-written slot; None if torn."""
    if image == _ZERO_BLOCK:
        return 0, _ZERO_BLOCK[:_PAYLOAD]
    magic, index, cid, seq, crc, _ = _SLOT.unpack_from(image)
    payload = image[_SLOT.size :]
    head = _SLOT.pack(magic, index, cid, seq, 0, 0)
    if (magic, index, cid) != (BITMAP_MAGIC, block, clone_id) or zlib.crc32(payload, zlib.crc32(head)) != crc:
        return None
    return seq, payload


def _read_bitmap(fd: int, path: str, header: Header) -> tuple[bitarray, bytearray, int]:
    nblocks = _bitmap_blocks(header.nr_regions)
    bits = bitarray(nblocks * BITS_PER_BLOCK, endian="little")
    bits.setall(0)
    current = bytearray(b"\2" * nblocks)
    max_seq = 0
    chunk_blocks = 256  # read 2 MiB at a time
    for first in range(0, nblocks, chunk_blocks):
        count = min(chunk_blocks, nblocks - first)
        data = os.pread(fd, 2 * count * BLOCK, _slot_offset(first, 0))
        for i in range(count):
            block = first + i
            slots = [_parse_slot(data[(2 * i + s) * BLOCK : (2 * i + s + 1) * BLOCK], block,
                                 header.clone_id) for s in (0, 1)]
            valid = [(s, v) for s, v in enumerate(slots) if v is not None]
            if not valid:
                raise MetadataError(f"{path}: corrupt metadata (bitmap block {block} unreadable in both copies)")
            if len(valid) == 1:
                log.warning("%s: bitmap block %d has one torn copy (interrupted commit); "
                            "using the other", path, block)
            # Bits only go 0 -> 1, so every valid copy is a subset of the newest: OR them all.
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
    del bits[header.nr_regions :]
    return bits, current, max_seq


def _unwritable(path: str, exc: OSError) -> MetadataError:
    return MetadataError(f"{path}: cannot write the metadata file ({exc.strerror})")


def _describe(identity: object) -> str:
    if isinstance(identity, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(identity.items()))
    return str(identity)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("could not remove half-created %s: %s", path, exc)
