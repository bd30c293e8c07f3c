"""Small blocking helpers for the files a mount opens: the local source, the destination, and
the files it opens by path after its checks."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import threading

BLKGETSIZE64 = 0x80081272
BLKROGET = 0x125E
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FS_IOC_GETFLAGS = 0x80086601
FS_IMMUTABLE_FL = 0x10
FS_APPEND_FL = 0x20


def fd_size(fd: int) -> int:
    """Size in bytes of a regular file or a block device."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("<Q", buf)[0]
    return st.st_size


def read_only_device(fd: int) -> bool:
    """Whether the block device open at FD is read-only (`blockdev --setro`, a write-protected
    disk): Linux lets root open one for writing, and only the writes fail."""
    buf = fcntl.ioctl(fd, BLKROGET, b"\0" * 4)
    return struct.unpack("<i", buf)[0] != 0


def why_denied(path: str) -> str:
    """Why open(2) of PATH failed with EACCES or EPERM, for an error line: what forbids it that
    its mode does not show (root is refused these too), else "permission denied"."""
    try:
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode):
            if os.statvfs(path).f_flag & os.ST_NODEV:
                return "a device node on a filesystem mounted nodev"
        elif stat.S_ISREG(st.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                flags = struct.unpack("<I", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 8)[:4])[0]
            finally:
                os.close(fd)
            if flags & FS_IMMUTABLE_FL:
                return "it is immutable: chattr -i allows writes"
            if flags & FS_APPEND_FL:
                return "it is append-only: chattr -a allows writes in place"
    except OSError:
        pass  # no attributes to tell (or not readable at all)
    return "permission denied"


def open_without_waiting(path: str, flags: int, mode: int = 0o600) -> int:
    """os.open that never waits for a FIFO's other end: opened O_NONBLOCK, which is then
    cleared, so that a caller's check of the file's type refuses a FIFO instead of hanging."""
    fd = os.open(path, flags | os.O_NONBLOCK, mode)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def open_regular_file(path: str, flags: int, mode: int = 0o600, *,
                      char_device_ok: bool = False) -> int:
    """A file the mount opens by path after its checks (a trace, the log, a header file):
    opened without waiting, then refused with an OSError ("not a regular file") unless it is a
    regular file (or, with CHAR_DEVICE_OK, a character device: a log to /dev/null). What the
    checks saw may since have been swapped for a FIFO, whose open(2) would wait for its other
    end forever, or a device."""
    try:
        fd = open_without_waiting(path, flags | os.O_NOCTTY, mode)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads, opened for writing (or a device)
            raise _not_a_regular_file(path) from None
        raise
    file_mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(file_mode) or (char_device_ok and stat.S_ISCHR(file_mode))):
        os.close(fd)
        raise _not_a_regular_file(path)
    return fd


def read_regular_text(path: str) -> str:
    """The UTF-8 text of a small file the mount reads by path after its checks (a trace, the
    header file): opened as open_regular_file does. OSError or UnicodeDecodeError."""
    with os.fdopen(open_regular_file(path, os.O_RDONLY | os.O_CLOEXEC), encoding="utf-8") as f:
        return f.read()


def _not_a_regular_file(path: str) -> OSError:
    return OSError(errno.EINVAL, "not a regular file", path)


def still_named(fd: int, path: str) -> bool:
    """Whether PATH still names the file open at FD (not removed, nor replaced, since)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (opened.st_dev, opened.st_ino)


def is_block_device(fd: int) -> bool:
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """pread that retries short reads; returns fewer bytes only at end of file."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def first_data(fd: int, start: int = 0) -> int | None:
    """Where the regular file open at FD first holds data from START on (SEEK_DATA), or None
    when it holds none there: a sparse or `truncate`d file, or one whose extents are allocated
    but unwritten (`fallocate`: ext4 and xfs report those as holes). A filesystem that cannot
    tell holes from data reports all of a file as data."""
    try:
        return os.lseek(fd, start, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # only a hole remains from START on (or START is past the end)
            return None
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return start if os.fstat(fd).st_size > start else None
        raise


_ENDS_READ = 1 << 20  # a device's first and last MiB, read whole
_SAMPLES_BETWEEN = 30
_SAMPLE = 64 << 10


def first_nonzero_sampled(fd: int, size: int) -> int | None:
    """Where the device open at FD (SIZE bytes) holds a non-zero byte among what is looked at:
    its first and last MiB (where formats keep their headers and backups) and 30 samples of
    64 KiB evenly between; None when all of that reads as zeros. A device cannot tell where
    it holds data, and reading all of it would take as long as the clone. What it reads is
    dropped from the page cache again."""
    try:
        for offset, length in _sampled_ranges(size):
            data = pread_exact(fd, length, offset)
            stripped = data.lstrip(b"\0")
            if stripped:
                return offset + len(data) - len(stripped)
        return None
    finally:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _sampled_ranges(size: int) -> list[tuple[int, int]]:
    if size <= 2 * _ENDS_READ:
        return [(0, size)]
    tail = size - _ENDS_READ
    between = tail - _ENDS_READ - _SAMPLE
    samples = [(_ENDS_READ + between * i // (_SAMPLES_BETWEEN - 1)) // 4096 * 4096
               for i in range(_SAMPLES_BETWEEN)] if between > 0 else []
    return [(0, _ENDS_READ), *((offset, _SAMPLE) for offset in samples), (tail, _ENDS_READ)]


def data_extents(fd: int, offset: int, length: int) -> list[tuple[int, int, bool]]:
    """(offset, length, is_hole) runs of [offset, offset+length) from SEEK_DATA/SEEK_HOLE.

    Files or filesystems that cannot tell report one data run."""
    end = offset + length
    runs: list[tuple[int, int, bool]] = []
    pos = offset
    try:
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == 6:  # ENXIO: only a hole remains
                    data = end
                else:
                    raise
            data = min(data, end)
            if data > pos:
                runs.append((pos, data - pos, True))
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            runs.append((data, hole - data, False))
            pos = hole
    except OSError as exc:
        if exc.errno in (22, 95):  # EINVAL/EOPNOTSUPP: no hole information here
            return [(offset, length, False)]
        raise
    return runs


# Threads that may sync one file at once. DST: a commit's, and an FSYNC's on the event loop and
# on the session's job thread. META: a commit of hydrated bits, one of written bits, a header.
SYNC_CALLERS = 3


class DataSync:
    """fdatasync of one open file, for callers in several threads at once, each told of every
    writeback error. The kernel reports a writeback error once per open file (errseq): of two
    fdatasyncs of one descriptor at once, one fails and the other returns 0, although the
    data it waited for was dropped (a user's FSYNC beside a commit would be acknowledged).
    So each call syncs through a descriptor of its own, all opened together at the start
    (a file opened after an error was reported is not told of it), and an error, once seen,
    fails every later call: the kernel does not repeat it."""

    def __init__(self, fd: int, callers: int = SYNC_CALLERS) -> None:
        self._free: list[int] = []
        try:
            for _ in range(callers):  # the very file open at FD, whatever its path names now
                self._free.append(os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC))
        except BaseException:
            self.close()
            raise
        self._available = threading.Condition()
        self.error: OSError | None = None

    def __call__(self) -> None:
        self._refuse_if_lost()
        with self._available:
            self._available.wait_for(lambda: self._free)
            fd = self._free.pop()
        try:
            os.fdatasync(fd)
        except OSError as exc:
            self.lost(exc)
            raise
        finally:
            with self._available:
                self._free.append(fd)
                self._available.notify()
        self._refuse_if_lost()  # seen meanwhile by another call: maybe of what this one waited for

    def _refuse_if_lost(self) -> None:
        if self.error is not None:
            raise OSError(self.error.errno, f"an earlier writeback failed: {self.error.strerror}")

    def lost(self, exc: OSError) -> None:
        """A writeback error of the file seen elsewhere (sync_file_range's wait reports them
        too, and takes them from the next fdatasync of its descriptor): every later call
        fails with it."""
        self.error = self.error or exc

    def close(self) -> None:
        while self._free:
            os.close(self._free.pop())
