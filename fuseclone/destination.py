"""The destination: a local sparse file or block device that ends up a full copy of the image.

All calls here block; the engine runs them in worker threads.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
import threading
import time
from typing import Callable

from . import claims
from .blockio import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE,
                      DataSync, data_extents, fd_size, first_data, first_nonzero_sampled,
                      open_without_waiting, pread_exact, pwrite_all, read_only_device,
                      still_named, why_denied)
from .errors import CANNOT_RESUME, DestinationError, DestinationInUseError
from .identity import loop_backing, loop_devices_over, loop_identity
from .libc import libc
from .signatures import SignatureProbeError, signature

_ZEROS = bytes(1 << 20)
DIRECT_ALIGN = 4096  # offset, length and memory alignment of direct writes (any block size up to 4K)
# How long a look at DST's size (refuse_if_cut_short) stands for writes and flushes that cannot
# give DST its size back: an fstat before each one halved a database's synced writes
# (docs/benchmark/cut-short-cost.md).
SIZE_LOOK_LASTS = 0.01
WRITE_THROUGH_MAX = 1 << 20  # one FUSE request: the largest user write that write_through takes


class Destination:
    def __init__(self, path: str, fd: int, image_size: int) -> None:
        self.path = path
        self.fd = fd
        self.image_size = image_size
        st = os.fstat(fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        self._st = st
        self._direct_fd = -1
        self._held: list[int] = []  # files held beneath a block device (claims.hold)
        self.direct_bytes = 0  # written with direct I/O (hydration copies)
        # What the next datasync may have to write back or commit: bytes written, punched or
        # zeroed (not by write_through) in all, and in all when the latest finished one began.
        self._changed_bytes = self._synced_bytes = 0
        self._count_lock = threading.Lock()  # writer threads add to the counts
        self._aligned = threading.local()  # each thread's page-aligned buffer for write_through
        self._sync: DataSync | None = None  # a read-write DST's fdatasync
        # Told (from any thread) why DST is cut short, the first time a check finds it so.
        self.on_cut_short: Callable[[str], None] | None = None
        self._size_seen_whole_at = float("-inf")  # time.monotonic() of the last look that passed

    @classmethod
    def open(cls, path: str, image_size: int, *, create: bool, readonly: bool = False) -> Destination:
        """Open DST read-write (or read-only, for checks). A missing file is created sparse (only
        when `create`); a DST smaller than the image is refused. A read-write DST is claimed
        for this clone until `close` (see _claim). On refusal nothing is changed."""
        created = False
        try:
            # A FIFO is refused below; read-only, its open(2) would wait for a writer first.
            fd = open_without_waiting(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except FileNotFoundError:
            if not create:
                raise DestinationError(f"{path}: destination does not exist") from None
            fd = _create_sparse(path, image_size)
            created = True
        except PermissionError:
            raise DestinationError(f"{path}: destination is not writable ({why_denied(path)})") from None
        except IsADirectoryError:
            raise DestinationError(f"{path}: destination is a directory") from None
        except OSError as exc:
            raise DestinationError(f"{path}: cannot open destination: {exc.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise DestinationError(f"{path}: destination must be a regular file or a block device")
            if stat.S_ISBLK(mode) and not readonly and read_only_device(fd):
                # Else the mount came up and every copy and user write failed with EPERM.
                raise DestinationError(f"{path}: destination is read-only")
            size = fd_size(fd)
            if size < image_size:
                raise DestinationError(
                    f"{path}: destination is {size} bytes, smaller than the source ({image_size} bytes)")
            held: list[int] = []
            if not readonly:
                # Past this point a file we created may be another clone's: one that opened it
                # meanwhile and claimed it first, or one that removed it. Never ours to remove.
                created = False
                fd, held = _claim(fd, path, stat.S_ISBLK(mode))
                if stat.S_ISREG(mode) and not still_named(fd, path):
                    claims.release(held)
                    raise DestinationError(f"{path}: destination was removed or replaced while "
                                           "it was being opened: try again")
                if stat.S_ISREG(mode):
                    try:
                        _refuse_beneath_a_loop_device_in_use(fd, path)
                    except BaseException:
                        claims.release(held)
                        raise
        except BaseException:
            os.close(fd)
            if created:
                os.unlink(path)
            raise
        dst = cls(path, fd, image_size)
        dst._held = held
        if not readonly:  # a check reads DST front to back, where readahead pays
            dst._no_readahead()
            dst._open_direct()
            try:
                dst._sync = DataSync(dst.fd)
            except BaseException:
                dst.close()
                raise
        return dst

    def _no_readahead(self) -> None:
        """A mount reads DST in pieces the kernel asked for (misses of the image's cache,
        copy-on-read, partial writes): readahead only adds large folios to its page cache, and ext4 walks
        every buffer head of a folio on each small write into it. With readahead, 4 KiB
        direct-I/O writes to a hydrated image ran at 12k IOPS (`perf`: 67% in
        ext4_block_write_begin); without, 48k. Block devices keep their readahead."""
        if not self.is_block_device:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def _open_direct(self) -> None:
        """A second descriptor with O_DIRECT, for hydration copies; none where the filesystem
        refuses direct I/O (then every write is buffered)."""
        try:
            # Through the descriptor, not the path: the file this one has open and checked,
            # whatever DST's path names by now.
            self._direct_fd = os.open(f"/proc/self/fd/{self.fd}",
                                      os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            self._direct_fd = -1

    def identity(self) -> dict[str, str | int]:
        if not self.is_block_device:
            return file_identity(self.path, self._st)
        return {"kind": "blockdev", "path": os.path.realpath(self.path), **loop_identity(self.fd)}

    def holds(self) -> str | None:
        """What DST holds that a new clone would overwrite, for its refusal: a regular file's
        data ("data (first at offset N)"); a block device's signature (signatures.py: "a
        filesystem (ext4)", "a partition table (gpt)"...), or for a loop device over a file, that
        file's data in its span, or for another device, non-zero bytes among those it samples
        (`first_nonzero_sampled`). None for a file without data (sparse, truncated,
        fallocated), or a device without either."""
        if not self.is_block_device:
            offset = first_data(self.fd)
            return None if offset is None else f"data (first at offset {offset})"
        try:
            found = signature(self.fd)
        except SignatureProbeError as exc:
            raise DestinationError(f"{self.path}: cannot look for a filesystem or other signature "
                                   f"on the destination: {exc.strerror}") from None
        return found or self._data_on_device()

    def _data_on_device(self) -> str | None:
        """Data in no format libblkid knows (plain dm-crypt, a raw database, what `wipefs`
        leaves): overwritten as surely as the same bytes in a file, which are refused. A loop
        device's backing file tells exactly where it holds data; another device is sampled."""
        backing = loop_backing(self.fd)
        if backing is not None:
            try:
                return self._data_in_loop_backing_file(*backing)
            except PermissionError:  # a user given the device but not its file
                pass
        try:
            offset = first_nonzero_sampled(self.fd, fd_size(self.fd))
        except OSError as exc:
            raise DestinationError(f"{self.path}: cannot read the destination to look for data "
                                   f"on it: {exc.strerror}") from None
        return None if offset is None else f"data (at offset {offset}, in no format blkid knows)"

    def _data_in_loop_backing_file(self, path: str, start: int) -> str | None:
        fd = open_without_waiting(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            offset = first_data(fd, start)
        finally:
            os.close(fd)
        if offset is None or offset >= start + fd_size(self.fd):
            return None
        return f"data (first at offset {offset - start}, in its backing file {path})"

    def attributes(self) -> os.stat_result:
        """DST's stat as it is now (the image shows its owner, group and mode)."""
        return os.fstat(self.fd)

    def chmod(self, mode: int) -> None:
        os.fchmod(self.fd, mode)

    def chown(self, uid: int, gid: int) -> None:
        """-1 leaves the owner or the group as it is."""
        os.fchown(self.fd, uid, gid)

    def read(self, offset: int, length: int) -> bytes:
        data = pread_exact(self.fd, length, offset)
        if len(data) < length:
            # A DST shorter than the image is refused at open: it was truncated since, and
            # what it held there (hydrated data, users' writes) is gone. Zeros would be data
            # that is neither the source's nor a user's.
            raise OSError(errno.EIO, f"{self.path}: the destination is shorter than the image "
                          "(truncated while mounted?)")
        return data

    def read_uncached(self, offset: int, length: int) -> bytes:
        """`read`, then drop those pages from DST's page cache (for a reader that keeps its own
        copy: the image's page cache). Dirty pages are not dropped, only written back sooner."""
        data = self.read(offset, length)
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        return data

    def read_cached(self, offset: int, length: int) -> bytearray | None:
        """Non-blocking read: the bytes if they are all in the page cache, else None. Lets the
        event loop serve hot data without a thread hop (preadv2 with RWF_NOWAIT)."""
        buf = bytearray(length)
        try:
            got = os.preadv(self.fd, [buf], offset, os.RWF_NOWAIT)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EOPNOTSUPP):
                return None
            raise
        if got == length:
            return buf  # bytes-like: handed to writev as it is, no second copy
        return None  # short: past DST's end, or only partly cached; the slow path handles it

    def refuse_if_cut_short(self) -> None:
        """Raise EIO when a regular-file DST is now shorter than the image (truncated under the
        live clone: its hydrated data past the cut is gone), telling `on_cut_short` why. The
        committer looks each second, and writes and flushes through `_refuse_if_cut_short_lately`."""
        if self.is_block_device:
            return
        size = os.fstat(self.fd).st_size
        if size >= self.image_size:
            self._size_seen_whole_at = time.monotonic()
            return
        reason = (f"{self.path} was truncated to {size} bytes, shorter than the image "
                  f"({self.image_size} bytes): what it held past that is gone, and "
                  f"{CANNOT_RESUME}")
        if self.on_cut_short is not None:
            self.on_cut_short(reason)
        raise OSError(errno.EIO, reason)

    def _refuse_if_cut_short_lately(self, end: int) -> None:
        """Before a write ending at END, or a flush (END 0): refuse_if_cut_short, unless DST
        was seen whole less than SIZE_LOOK_LASTS ago and END is short of the image's end. A
        write past a cut extends DST again and the hole before it reads as zeros where hydrated
        data was; only one that reaches the image's end gives DST its size back, so that no
        later look would find it short: those are always looked at first. Others within the
        window leave DST short, and the next look (the committer's within a second) puts
        the clone in fail mode. A truncation between a look and the write is not caught."""
        if end < self.image_size and time.monotonic() - self._size_seen_whole_at < SIZE_LOOK_LASTS:
            return
        self.refuse_if_cut_short()

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._refuse_if_cut_short_lately(offset + len(data))
        pwrite_all(self.fd, data, offset)
        self._note_change(len(data))

    def can_write_direct(self, offset: int, data) -> bool:
        """Whether `data` can go to `offset` with direct I/O: a direct descriptor, and offset,
        length and memory address all DIRECT_ALIGN-aligned (only writable buffers qualify: the
        address of a bytes object cannot be taken, and its storage is never aligned)."""
        if self._direct_fd < 0 or offset % DIRECT_ALIGN or len(data) % DIRECT_ALIGN or not len(data):
            return False
        try:
            address = ctypes.addressof(ctypes.c_char.from_buffer(data))
        except TypeError:
            return False
        return address % DIRECT_ALIGN == 0

    def write_direct(self, offset: int, data) -> None:
        """Write past the page cache (see can_write_direct). Durable only after datasync(), like
        any write: the device may still cache it, and fdatasync flushes the inode's device cache
        whichever descriptor wrote."""
        self._refuse_if_cut_short_lately(offset + len(data))
        pwrite_all(self._direct_fd, data, offset)
        with self._count_lock:
            self.direct_bytes += len(data)
            self._changed_bytes += len(data)

    def can_write_through(self, offset: int, length: int) -> bool:
        """Whether `write_through` can take a write of `length` bytes at `offset`."""
        return (self._direct_fd >= 0 and 0 < length <= WRITE_THROUGH_MAX
                and not offset % DIRECT_ALIGN and not length % DIRECT_ALIGN)

    def write_through(self, offset: int, data: bytes | memoryview) -> None:
        """Write `data` (see can_write_through) with direct I/O from a copy in this thread's
        page-aligned buffer: past the page cache, so that the next fdatasync has no dirty pages
        of it to write back and wait for, only the device's cache to flush."""
        buffer = getattr(self._aligned, "buffer", None)
        if buffer is None:
            buffer = self._aligned.buffer = mmap.mmap(-1, WRITE_THROUGH_MAX)
        length = len(data)
        buffer[:length] = data
        self._refuse_if_cut_short_lately(offset + length)
        with memoryview(buffer) as view:
            pwrite_all(self._direct_fd, view[:length], offset)

    def datasync(self) -> None:
        """Make DST durable; fails, from the first writeback error on, whoever saw it."""
        began = self._changed_bytes
        self._refuse_if_cut_short_lately(0)  # what was cut off cannot be made durable
        self._sync()
        with self._count_lock:
            self._synced_bytes = max(self._synced_bytes, began)

    def unsynced_bytes(self) -> int:
        """Bytes written, punched or zeroed since the latest finished `datasync` began, other
        than by `write_through` (on the disk already): at most what the next one writes back."""
        return self._changed_bytes - self._synced_bytes

    def _note_change(self, length: int) -> None:
        with self._count_lock:
            self._changed_bytes += length

    def start_writeback(self, offset: int, length: int) -> None:
        """Start writing the range to disk now, without waiting (sync_file_range WRITE). Keeps
        dirty data small, so a commit's fdatasync has little left to do. Durability still comes
        from `datasync` only."""
        _sync_file_range(self.fd, offset, length, SYNC_FILE_RANGE_WRITE)

    def write_back(self, offset: int, length: int) -> None:
        """Write the range to disk now and wait until the disk has it (sync_file_range WRITE and
        WAIT): no more of it left in the disk's queue, ahead of whatever reads come next.
        Durability still comes from `datasync` only (the disk's cache, and the metadata)."""
        try:
            _sync_file_range(self.fd, offset, length, SYNC_FILE_RANGE_WAIT_ALL)
        except OSError as exc:
            # Its wait reports a writeback error of any part of DST, not only of this range,
            # and the kernel reports each error once per open file: the next fdatasync on
            # this descriptor would succeed although dirty data (a user's acknowledged write,
            # a copy whose bits are set) was dropped. Every later datasync fails instead, so
            # no flush says it is durable and no commit marks it hydrated (fail mode follows).
            self._sync.lost(exc)
            raise

    def forget(self, offset: int, length: int) -> None:
        """Wait for the range's writeback, then drop its clean pages from the page cache: data
        copied by hydration is not hot, and a clone of a large image should not push the
        machine's working set out."""
        self.write_back(offset, length)
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)

    def punch_hole(self, offset: int, length: int) -> None:
        """Discard passdown: afterwards the range reads as zeros and its space is freed."""
        self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def zero_range(self, offset: int, length: int) -> None:
        """Make the range read as zeros without discarding (keeps the space allocated)."""
        self._fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        self._note_change(length)
        try:
            _fallocate(self.fd, mode, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._write_zeros(offset, length)  # no fallocate here: zeros the slow way

    def _write_zeros(self, offset: int, length: int) -> None:
        self._refuse_if_cut_short_lately(offset + length)
        end = offset + length
        while offset < end:
            n = min(len(_ZEROS), end - offset)
            pwrite_all(self.fd, memoryview(_ZEROS)[:n], offset)
            offset += n

    def cut_back_growth(self) -> int:
        """A regular-file DST grown past its size at open is cut back to it; returns the bytes
        cut (0: none). Only writes that bypass the mount grow it: FUSE passthrough, where the
        kernel writes DST itself and does not know where the image ends. What is cut lies past
        the image, which never shows it (and DST alone must stay the image's size)."""
        if self.is_block_device:
            return 0
        size = os.fstat(self.fd).st_size
        if size <= self._st.st_size:
            return 0
        os.ftruncate(self.fd, self._st.st_size)
        return size - self._st.st_size

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        if self.is_block_device:
            return [(offset, length, False)]
        return data_extents(self.fd, offset, length)

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        claims.release(self._held)


def _claim(fd: int, path: str, is_block_device: bool) -> tuple[int, list[int]]:
    """Make `fd` this clone's claim on DST (SPEC invariant 9: one clone per DST); returns the
    descriptor to keep, and those of the files held beneath it (claims.hold). A file gets an
    exclusive flock, like META. A flock on a device node locks that node's inode, not the
    device, and another node of the same device would not conflict; so a block device is
    reopened with O_EXCL as well (through /proc/self/fd, the very device opened): Linux then
    refuses, with EBUSY, any other exclusive opener (a second clone, through any node) and any
    mount of the device, for as long as it stays open. The flocks of its node and of the files
    beneath it (a loop device's backing file) meet those of a clone holding them as its SRC or
    DST by a file name."""
    claimed = fd
    if is_block_device:
        try:
            claimed = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            raise DestinationInUseError(
                f"{path}: destination is in use (by another clone, or mounted)") from None
    try:
        held = claims.hold(claimed, path, exclusive=True)
    except claims.HeldError as exc:
        if claimed != fd:
            os.close(claimed)
        beneath = "" if exc.path == path else f" (through {exc.path})"
        raise DestinationInUseError(
            f"{path}: destination is in use by another clone{beneath}") from None
    if claimed != fd:
        os.close(fd)
    return claimed, held


def file_identity(path: str, st: os.stat_result) -> dict[str, str | int]:
    """How META records a regular-file DST (PATH, whose stat is ST)."""
    return {"kind": "file", "path": os.path.realpath(path), "inode": st.st_ino}


def _refuse_beneath_a_loop_device_in_use(fd: int, path: str) -> None:
    """A DST file beneath a loop device that is mounted or held (an exclusive open of it gets
    EBUSY, as a block device DST in use does) would be written under that filesystem's feet:
    refused, new clone or resumed, whatever --overwrite-dst says, as mkfs -F refuses such a
    file. One attached and unused is taken (mkfs -F takes it too)."""
    for device in loop_devices_over(fd):
        try:
            probe = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                continue  # gone meanwhile, or no node of it here
            raise DestinationInUseError(
                f"{path}: destination is in use: it is the backing file of {device}, which is "
                "mounted or held (unmount it first)") from None
        os.close(probe)


def _create_sparse(path: str, size: int) -> int:
    """A new sparse DST of SIZE bytes, which appears at PATH at its full size or not at all:
    made unnamed in PATH's directory (O_TMPFILE), sized, then linked there. A mount killed
    between creating and sizing a named file left it at 0 bytes, and every retry was refused
    (smaller than the source). Where the filesystem has no O_TMPFILE it is made by name."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)),
                     os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise DestinationError(f"{path}: cannot create destination: {exc.strerror}") from None
        return _create_named(path, size)
    try:
        _size_new(fd, path, size)
        _link(fd, path)  # EEXIST: another clone created it meanwhile
    except OSError as exc:
        os.close(fd)
        raise DestinationError(f"{path}: cannot create destination: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _link(fd: int, path: str) -> None:
    """Give the unnamed file open at FD the name PATH: linkat(2) following its /proc/self/fd
    link (os.link without a directory descriptor is link(2), which links the link itself)."""
    fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(str(fd), path, src_dir_fd=fds, follow_symlinks=True)
    finally:
        os.close(fds)


def _create_named(path: str, size: int) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise DestinationError(f"{path}: cannot create destination: {exc.strerror}") from None
    try:
        _size_new(fd, path, size)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return fd


def _size_new(fd: int, path: str, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        raise DestinationError(f"{path}: cannot size destination: {exc.strerror}") from None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _sync_file_range(fd: int, offset: int, length: int, flags: int) -> None:
    if libc.sync_file_range(fd, offset, length, flags) != 0:
        err = ctypes.get_errno()
        if err not in (errno.ESPIPE, errno.EINVAL, errno.ENOSYS):  # not for this file: no-op
            raise OSError(err, os.strerror(err))


SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4
SYNC_FILE_RANGE_WAIT_ALL = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER

