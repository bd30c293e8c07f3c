"""Every FUSE operation through the real kernel, reached the way users and the loop driver reach
it: fallocate(1) and xfs_io on the image, blkdiscard and losetup on a loop device over it,
lseek(SEEK_DATA/SEEK_HOLE), truncate, chmod, touch, directory listings, other users, signals to
blocked callers, and shutdown while the image is in use. Mounts go through `fuseclone mount`
(plus one trio test of the fusermount3 path with an in-memory image).

Every test leaves nothing behind, even when it fails: the autouse `leaves_nothing_behind` fixture
fails a test that left a mount, a loop device or an nbdkit over its files (and cleans them)."""

import contextlib
import errno
import functools
import mmap
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest
import trio

from fuseclone import control
from fuseclone.fuse.backend import Continue, Permissions
from fuseclone.fuse.fs import ImageFilesystem
from fuseclone.fuse.mount import _unescape, is_fuseclone_mount, unmount
from fuseclone.fuse.session import serve
from fuseclone.metadata import Metadata
from tests.integration.conftest import MiB, fuseclone, sh

KiB = 1024
RS = 64 * KiB  # region size wherever partly covered regions matter
NBD_DELAY = 3.0  # seconds each read of the slow NBD source takes


# ---- fixtures and helpers ---------------------------------------------------------------------


def _mounts_under(roots):
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            where = _unescape(line.split()[1])
            if any(where == r or where.startswith(r + "/") for r in roots):
                found.append(where)
    return found


def _loops_under(roots):
    found = []
    for name in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().strip()
        except OSError:
            continue
        if any(backing.startswith(r + "/") for r in roots):
            found.append(f"/dev/{name}")
    return found


class Leftovers:
    """Directories a test uses outside tmp_path, and the nbdkit processes it started."""

    def __init__(self, tmp_path):
        self.roots = [os.path.realpath(tmp_path)]
        self.processes = []

    def public_dir(self):
        """A directory every user may traverse (pytest's tmp_path is 0700)."""
        path = tempfile.mkdtemp(prefix="fc-ops-")
        os.chmod(path, 0o755)
        self.roots.append(os.path.realpath(path))
        return path


@pytest.fixture(autouse=True)
def leaves_nothing_behind(tmp_path):
    """Set up before `rig`, so it checks after rig's own cleanup ran."""
    left = Leftovers(tmp_path)
    yield left
    problems = []
    for loop in _loops_under(left.roots):
        problems.append(f"loop device {loop}")
        sh("losetup", "-d", loop, check=False, timeout=30)
    for where in reversed(_mounts_under(left.roots)):
        problems.append(f"mount at {where}")
        sh("umount", "-l", where, check=False, timeout=30)
    for proc in left.processes:
        if proc.poll() is None:
            problems.append(f"process {proc.pid} ({proc.args[0]})")
            proc.kill()
            proc.wait()
    for root in left.roots[1:]:
        shutil.rmtree(root, ignore_errors=True)
    assert not problems, f"left behind: {', '.join(problems)}"


def make_random(path, size):
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


def live_status(rig):
    reply = control.request(rig.meta, {"op": "status"})
    assert reply is not None and reply["ok"], reply
    return reply["status"]


def pread(path, offset, length, *, direct=False):
    """Up to `length` bytes at `offset` (fewer only at the end), optionally with O_DIRECT."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        buf = mmap.mmap(-1, length)  # page aligned, as O_DIRECT wants
        got = 0
        while got < length:
            n = os.preadv(fd, [memoryview(buf)[got:]], offset + got)
            if n == 0:
                break
            got += n
        return bytes(buf[:got])
    finally:
        os.close(fd)


def drop_caches():
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def allocated(path):
    return os.stat(path).st_blocks * 512


def next_data(path, offset):
    """SEEK_DATA on a file, None for ENXIO."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise
    finally:
        os.close(fd)


def mount_options(mountpoint):
    real = os.path.realpath(mountpoint)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[1]) == real:
                return _unescape(fields[0]), fields[2], set(fields[3].split(","))
    raise AssertionError(f"{mountpoint} is not mounted")


# ---- PUNCH_HOLE and ZERO_RANGE on the image -------------------------------------------------


@pytest.mark.parametrize("tool", ["fallocate", "xfs_io"])
def test_punch_hole_marks_covered_regions_and_punches_dst(rig, tool):
    data = bytearray(make_random(rig.src, 4 * MiB))
    rig.mount("--region-size", "64K", "--no-hydration", "--no-copy-on-read")
    # regions 3 and 13 are partly covered, 4..12 wholly
    off, length = 3 * RS + 1000, 10 * RS
    before = live_status(rig)
    if tool == "fallocate":
        sh("fallocate", "-p", "-o", off, "-l", length, rig.image)
    else:
        sh("xfs_io", "-c", f"fpunch {off} {length}", rig.image)
    after = live_status(rig)
    assert after["hydrated_regions"] - before["hydrated_regions"] == 11, after
    # only the two partly covered regions were copied from the source
    assert after["source_bytes_read"] - before["source_bytes_read"] == 2 * RS, after
    data[off : off + length] = bytes(length)
    assert os.path.getsize(rig.image) == len(data)
    assert pread(rig.image, 0, len(data)) == data
    drop_caches()
    assert pread(rig.image, 0, len(data)) == data
    assert pread(rig.image, 2 * RS, 3 * RS, direct=True) == data[2 * RS : 5 * RS]
    # discard passdown: DST has a hole from the first whole block of the range to region 13,
    # which was copied (the partial block at the range's end stays allocated, zeroed)
    assert next_data(rig.dst, (off + 4095) // 4096 * 4096) == 13 * RS
    assert allocated(rig.dst) <= 2 * RS
    with open(rig.dst, "rb") as f:
        f.seek(3 * RS)
        assert f.read(11 * RS) == data[3 * RS : 14 * RS]
    # punching hydrated data frees its blocks in DST
    held = allocated(rig.dst)
    with open(rig.image, "r+b") as f:
        f.seek(20 * RS)
        f.write(b"\xa5" * 4 * RS)
        os.fsync(f.fileno())
    assert allocated(rig.dst) >= held + 4 * RS
    sh("fallocate", "-p", "-o", 20 * RS, "-l", 4 * RS, rig.image)
    assert allocated(rig.dst) == held
    assert pread(rig.image, 20 * RS, 4 * RS) == bytes(4 * RS)
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    with Metadata.open(rig.meta, writable=False) as meta:
        assert meta.header.clean
        assert [r for r in range(meta.nr_regions) if meta.is_hydrated(r)] == [
            *range(3, 14), *range(20, 24)]


def test_punch_hole_without_discard_passdown_zeroes_dst(rig):
    data = bytearray(make_random(rig.src, 4 * MiB))
    rig.mount("--region-size", "64K", "--no-hydration", "--no-copy-on-read",
              "--no-discard-passdown")
    assert "no_discard_passdown" in live_status(rig)["features"]
    # hydrate regions 8..15 with a write, then punch them and the unhydrated 16..23
    with open(rig.image, "r+b") as f:
        f.seek(8 * RS)
        f.write(b"\x5a" * 8 * RS)
        os.fsync(f.fileno())
    held = allocated(rig.dst)
    assert held >= 8 * RS
    before = live_status(rig)
    sh("fallocate", "-p", "-o", 8 * RS, "-l", 16 * RS, rig.image)
    after = live_status(rig)
    assert after["hydrated_regions"] - before["hydrated_regions"] == 8
    assert after["source_bytes_read"] == before["source_bytes_read"]
    data[8 * RS : 24 * RS] = bytes(16 * RS)
    drop_caches()
    assert pread(rig.image, 0, len(data)) == data
    # DST holds zeros there, and keeps its space: nothing was punched
    with open(rig.dst, "rb") as f:
        f.seek(8 * RS)
        assert f.read(16 * RS) == bytes(16 * RS)
    assert allocated(rig.dst) >= held


@pytest.mark.parametrize("tool", ["fallocate", "xfs_io"])
def test_zero_range_reads_zeros_and_keeps_the_rest(rig, tool):
    data = bytearray(make_random(rig.src, 4 * MiB))
    rig.mount("--region-size", "64K", "--no-hydration", "--no-copy-on-read")
    first = pread(rig.image, 0, len(data))  # page cache full of source data
    assert first == data
    off, length = 5 * RS + 333, 3 * RS + 4444
    before = live_status(rig)
    if tool == "fallocate":
        sh("fallocate", "-z", "-o", off, "-l", length, rig.image)
    else:
        sh("xfs_io", "-c", f"fzero -k {off} {length}", rig.image)
    after = live_status(rig)
    # 5 and 8 partly covered (copied), 6 and 7 wholly
    assert after["hydrated_regions"] - before["hydrated_regions"] == 4, after
    assert after["source_bytes_read"] - before["source_bytes_read"] == 2 * RS, after
    data[off : off + length] = bytes(length)
    assert os.path.getsize(rig.image) == len(data)
    assert pread(rig.image, 0, len(data)) == data  # the kernel dropped the stale pages
    drop_caches()
    assert pread(rig.image, 0, len(data)) == data
    with open(rig.dst, "rb") as f:
        f.seek(5 * RS)
        assert f.read(4 * RS) == data[5 * RS : 9 * RS]


def test_fallocate_cannot_grow_the_image(rig):
    data = make_random(rig.src, 1 * MiB)
    rig.mount()
    size = len(data)
    r = sh("fallocate", "-o", size - 4096, "-l", 8192, rig.image, check=False)
    assert r.returncode != 0
    r = sh("fallocate", "-l", 2 * MiB, rig.image, check=False)
    assert r.returncode != 0
    sh("fallocate", "-n", "-o", size - 4096, "-l", 8192, rig.image)  # keep size: accepted
    sh("fallocate", "-o", 0, "-l", 4096, rig.image)  # preallocation inside: a no-op
    assert os.path.getsize(rig.image) == size
    assert pread(rig.image, 0, size) == data


# ---- the loop driver: discard granularity, blkdiscard, write zeroes ---------------------------


def test_blkdiscard_through_a_loop_device(rig):
    data = bytearray(make_random(rig.src, 8 * MiB))
    rig.mount("--region-size", "64K", "--no-hydration", "--no-copy-on-read")
    loop = rig.losetup()
    queue = f"/sys/block/{os.path.basename(loop)}/queue"
    # the loop driver offers discard only when statfs answers; f_bsize is the granularity
    assert open(f"{queue}/discard_granularity").read().strip() == "4096"
    assert int(open(f"{queue}/discard_max_bytes").read()) > 0
    # blkdiscard probes the device for signatures first, and udev may probe it at any time:
    # hydrate everything around the discarded range by writing it back, so only a read of the
    # discarded range itself could still reach the source
    assert pread(rig.image, 0, len(data)) == data
    fd = os.open(rig.image, os.O_WRONLY)
    try:
        os.pwrite(fd, data[:1 * MiB], 0)
        os.pwrite(fd, data[3 * MiB:], 3 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    before = live_status(rig)
    assert before["hydrated_regions"] == (8 - 2) * MiB // (64 * KiB)
    sh("blkdiscard", "-o", 1 * MiB, "-l", 2 * MiB, loop)
    after = live_status(rig)
    assert after["hydrated_regions"] - before["hydrated_regions"] == 32, after
    assert after["source_bytes_read"] == before["source_bytes_read"]
    data[1 * MiB : 3 * MiB] = bytes(2 * MiB)
    assert next_data(rig.dst, 1 * MiB) == 3 * MiB  # punched: no data in DST there
    # write zeroes (BLKZEROOUT) reaches the image as ZERO_RANGE or as written zeros
    sh("blkdiscard", "-z", "-o", 5 * MiB, "-l", 1 * MiB, loop)
    data[5 * MiB : 6 * MiB] = bytes(1 * MiB)
    assert live_status(rig)["source_bytes_read"] == before["source_bytes_read"]
    assert pread(loop, 0, len(data), direct=True) == data
    assert pread(rig.image, 0, len(data)) == data
    drop_caches()
    assert pread(rig.image, 0, len(data)) == data


# ---- SEEK_DATA / SEEK_HOLE ------------------------------------------------------------------


def test_seek_data_and_hole_follow_the_sparse_source(rig):
    size = 8 * MiB
    with open(rig.src, "wb") as f:  # data [0,1M) [3M,4M), holes elsewhere
        f.truncate(size)
        f.write(os.urandom(1 * MiB))
        f.seek(3 * MiB)
        f.write(os.urandom(1 * MiB))
    rig.mount("--no-hydration", "--no-copy-on-read", "--write-cache", "0")  # see the test below

    def layout():
        fd = os.open(rig.image, os.O_RDONLY)
        try:
            found = [os.lseek(fd, 0, os.SEEK_DATA), os.lseek(fd, 0, os.SEEK_HOLE),
                     os.lseek(fd, 1 * MiB + 5, os.SEEK_DATA), os.lseek(fd, 3 * MiB, os.SEEK_HOLE),
                     os.lseek(fd, size - 1, os.SEEK_HOLE)]
            for offset, whence in [(4 * MiB, os.SEEK_DATA), (size, os.SEEK_DATA),
                                   (size, os.SEEK_HOLE), (size + 4096, os.SEEK_HOLE)]:
                with pytest.raises(OSError) as exc:
                    os.lseek(fd, offset, whence)
                assert exc.value.errno == errno.ENXIO, (offset, whence)
            return found
        finally:
            os.close(fd)

    expected = [0, 1 * MiB, 3 * MiB, 4 * MiB, size - 1]
    assert layout() == expected  # unhydrated: the source's holes
    assert live_status(rig)["hydrated_regions"] == 0
    with open(rig.image, "r+b") as f:  # data in a hole
        f.seek(2 * MiB)
        f.write(b"\x01" * 4096)
    fd = os.open(rig.image, os.O_RDONLY)
    try:
        assert os.lseek(fd, 1 * MiB, os.SEEK_DATA) == 2 * MiB
        assert os.lseek(fd, 2 * MiB, os.SEEK_HOLE) == 2 * MiB + 4096
    finally:
        os.close(fd)
    fuseclone("message", rig.mnt, "enable_hydration")
    fuseclone("wait", rig.mnt, "--timeout", "30")
    expected[2] = 2 * MiB
    assert layout() == expected  # hydrated: DST's holes, the source's kept as holes


# ---- size, mode, owner and times ------------------------------------------------------------


def test_size_changes_are_refused_and_change_nothing(rig):
    data = make_random(rig.src, 2 * MiB)
    size = len(data)
    rig.mount()

    def refused(action):
        with pytest.raises(OSError) as exc:
            action()
        assert exc.value.errno == errno.EPERM, exc.value

    refused(lambda: os.truncate(rig.image, 0))
    refused(lambda: os.truncate(rig.image, size + 4096))
    refused(lambda: os.truncate(rig.image, size - 1))
    refused(lambda: os.open(rig.image, os.O_WRONLY | os.O_TRUNC))
    refused(lambda: open(rig.image, "wb"))
    fd = os.open(rig.image, os.O_RDWR)
    try:
        refused(lambda: os.ftruncate(fd, 4096))
    finally:
        os.close(fd)
    assert sh("truncate", "-s", "0", rig.image, check=False).returncode != 0
    os.truncate(rig.image, size)  # the same size is not a change
    assert os.path.getsize(rig.image) == size
    drop_caches()
    assert os.path.getsize(rig.image) == size
    assert pread(rig.image, 0, size + 10) == data


def test_writes_past_the_end(rig):
    data = bytearray(make_random(rig.src, 1 * MiB))
    size = len(data)
    rig.mount("--write-cache", "0")  # write-through: every write gets the daemon's answer
    fd = os.open(rig.image, os.O_RDWR)
    try:
        for offset in (size, size + 1, size + 10 * MiB):
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"x" * 4096, offset)
            assert exc.value.errno == errno.ENOSPC
        assert os.pwrite(fd, b"y" * 8192, size - 4096) == 4096  # straddling: short
        assert os.pwrite(fd, b"z" * 100, size - 10) == 10
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"w", size)
        assert exc.value.errno == errno.ENOSPC
        data[size - 4096 :] = b"y" * 4086 + b"z" * 10
        os.fsync(fd)
    finally:
        os.close(fd)
    # O_DIRECT: past the end ENOSPC; straddling it, the kernel turns the short answer of its
    # asynchronous direct I/O into EIO (the bytes inside the image are written)
    buf = mmap.mmap(-1, 8192)
    buf.write(b"d" * 8192)
    fd = os.open(rig.image, os.O_RDWR | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as exc:
            os.pwritev(fd, [buf], size)
        assert exc.value.errno == errno.ENOSPC
        try:
            assert os.pwritev(fd, [buf], size - 4096) == 4096
        except OSError as exc:
            assert exc.errno == errno.EIO
        data[size - 4096 :] = b"d" * 4096
    finally:
        os.close(fd)
    assert os.path.getsize(rig.image) == size
    assert pread(rig.image, 0, size + 8192) == data
    drop_caches()
    assert os.path.getsize(rig.image) == size
    assert pread(rig.image, 0, size + 8192) == data


def test_seek_hole_never_hides_cached_writes(rig):
    """The kernel asks for SEEK_DATA/SEEK_HOLE without writing its cached pages back, so with
    the write cache the image answers as all data: a sparse copy then never skips a write."""
    size = 4 * MiB
    with open(rig.src, "wb") as f:
        f.truncate(size)  # all hole
    rig.mount("--no-hydration", "--no-copy-on-read")
    fd = os.open(rig.image, os.O_RDWR)
    try:
        os.pwrite(fd, b"\x07" * 4096, 2 * MiB)  # cached, not written back
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == size
        assert os.lseek(fd, 1 * MiB, os.SEEK_DATA) == 1 * MiB
    finally:
        os.close(fd)
    assert pread(rig.image, 2 * MiB, 4096) == b"\x07" * 4096


def test_writes_past_the_end_with_the_write_cache(rig):
    """The kernel accepts a cached write past the end; the daemon refuses it at writeback, so
    fsync and close report ENOSPC and neither DST nor the image's data changes."""
    data = make_random(rig.src, 1 * MiB)
    size = len(data)
    rig.mount()
    fd = os.open(rig.image, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"x" * 4096, size + 4096) == 4096
        with pytest.raises(OSError) as exc:
            os.fsync(fd)
        assert exc.value.errno == errno.ENOSPC
        # straddling the end: written back as one request, the daemon keeps what fits and
        # still reports the rest, or it would be lost silently
        assert os.pwrite(fd, b"y" * 8192, size - 4096) == 8192
        with pytest.raises(OSError) as exc:
            os.fsync(fd)
        assert exc.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    fd = os.open(rig.image, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"appended")
    with pytest.raises(OSError) as exc:
        os.close(fd)
    assert exc.value.errno == errno.ENOSPC
    fuseclone("unmount", rig.mnt)
    assert os.path.getsize(rig.dst) == size
    rig.mount()
    assert os.path.getsize(rig.image) == size
    assert pread(rig.image, 0, size + 8192) in (data, data[: size - 4096] + b"y" * 4096)


def test_the_write_cache_limit_is_set_on_the_mount(rig):
    make_random(rig.src, 1 * MiB)
    rig.mount("--write-cache", "256M")
    dev = os.stat(rig.mnt).st_dev
    with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/max_bytes") as f:
        limit = int(f.read())
    # the kernel keeps it as a fraction of the dirtyable memory of the moment, which moves
    assert abs(limit - 256 * MiB) < 256 * MiB // 10


def test_regular_file_mountpoint_operations(rig):
    data = bytearray(make_random(rig.src, 2 * MiB))
    target = str(rig.tmp / "clone.img")
    open(target, "w").close()
    assert fuseclone("mount", "--region-size", "64K", "--no-hydration", "--no-copy-on-read",
                     rig.src, rig.dst, rig.meta, target).stdout.strip() == target
    rig.stack.callback(rig._force_unmount, target)
    assert os.path.getsize(target) == len(data) and stat.S_ISREG(os.stat(target).st_mode)
    with pytest.raises(NotADirectoryError):
        os.listdir(target)
    with pytest.raises(NotADirectoryError):
        os.stat(os.path.join(target, "image"))
    with pytest.raises(PermissionError):
        os.truncate(target, 0)
    os.chmod(target, 0o640)  # the image's mode is DST's
    assert stat.S_IMODE(os.stat(rig.dst).st_mode) == 0o640
    os.utime(target)
    sh("fallocate", "-p", "-o", 4 * RS, "-l", 2 * RS, target)
    data[4 * RS : 6 * RS] = bytes(2 * RS)
    fd = os.open(target, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 4 * RS  # the punched hole, in DST
        assert os.lseek(fd, 4 * RS, os.SEEK_DATA) == 6 * RS
        assert os.lseek(fd, 6 * RS, os.SEEK_HOLE) == len(data)  # the source has no holes
        with pytest.raises(OSError) as exc:
            os.lseek(fd, len(data), os.SEEK_DATA)
        assert exc.value.errno == errno.ENXIO
    finally:
        os.close(fd)
    assert pread(target, 0, len(data)) == data
    assert os.statvfs(target).f_bsize == 4096
    loop = rig.losetup(target)
    assert open(f"/sys/block/{os.path.basename(loop)}/queue/discard_granularity").read().strip() == "4096"
    sh("blkdiscard", "-o", 1 * MiB, "-l", 64 * KiB, loop)
    data[1 * MiB : 1 * MiB + 64 * KiB] = bytes(64 * KiB)
    assert pread(loop, 0, len(data), direct=True) == data
    sh("losetup", "-d", loop)
    fuseclone("unmount", target)
    assert not _mounts_under([target])


def test_mode_and_owner_are_dsts_times_accepted(rig):
    make_random(rig.src, 1 * MiB)
    rig.mount()
    st = os.stat(rig.image)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600  # a DST we created
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    with pytest.raises(OSError) as exc:  # chmod and chown: test_permissions.py
        os.chmod(rig.image, 0o4755)
    assert exc.value.errno == errno.EPERM
    sh("touch", rig.image)
    os.utime(rig.image, (1_000_000, 2_000_000))
    sh("touch", "-d", "2001-02-03", rig.image)
    after = os.stat(rig.image)
    assert (after.st_mode, after.st_uid, after.st_gid, after.st_size) == (
        st.st_mode, st.st_uid, st.st_gid, st.st_size)


# ---- the directory --------------------------------------------------------------------------


@pytest.mark.parametrize("name", [None, "disk.raw"])
def test_directory_holds_exactly_the_image(rig, name):
    data = make_random(rig.src, 1 * MiB)
    out = rig.mount(*(["--name", name] if name else []))
    name = name or "image"
    assert out == os.path.join(rig.mnt, name)
    assert os.listdir(rig.mnt) == [name]
    assert sorted(sh("ls", "-a", rig.mnt).stdout.split()) == sorted([".", "..", name])
    with os.scandir(rig.mnt) as entries:
        (entry,) = list(entries)
        assert entry.name == name and entry.is_file() and entry.stat().st_size == len(data)
    assert pread(out, 0, len(data)) == data
    for other in ("image2", "x", "disk.raw" if name == "image" else "image", ".hidden"):
        with pytest.raises(FileNotFoundError):
            os.stat(os.path.join(rig.mnt, other))
    refusals = [
        lambda: open(os.path.join(rig.mnt, "new"), "wb"),
        lambda: os.mkdir(os.path.join(rig.mnt, "dir")),
        lambda: os.symlink(out, os.path.join(rig.mnt, "link")),
        lambda: os.link(out, os.path.join(rig.mnt, "hard")),
        lambda: os.rename(out, os.path.join(rig.mnt, "moved")),
        lambda: os.unlink(out),
        lambda: os.mknod(os.path.join(rig.mnt, "fifo"), 0o600 | stat.S_IFIFO),
    ]
    for action in refusals:
        with pytest.raises(PermissionError):  # not ENOSYS's "Function not implemented"
            action()
    assert os.listdir(rig.mnt) == [name]
    with pytest.raises(NotADirectoryError):
        os.listdir(out)
    with pytest.raises(IsADirectoryError):
        open(rig.mnt, "rb")
    st = os.statvfs(rig.mnt)
    assert st.f_bsize == 4096 and st.f_blocks * st.f_frsize >= len(data)


# ---- mount options and other users ------------------------------------------------------------


def _as_nobody(*argv, timeout=30):
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
                          capture_output=True, timeout=timeout)


@pytest.mark.parametrize("allow_other", [False, True])
def test_mount_options_and_other_users(rig, leaves_nothing_behind, allow_other):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    data = make_random(rig.src, 1 * MiB)
    with open(rig.dst, "wb") as f:
        f.truncate(len(data))
    os.chmod(rig.dst, 0o644)  # the image's mode: without --allow-other the mount refuses anyway
    mnt = os.path.join(leaves_nothing_behind.public_dir(), "mnt")
    os.mkdir(mnt)
    image = fuseclone("mount", rig.src, rig.dst, rig.meta, mnt,
                      *(["--allow-other"] if allow_other else [])).stdout.strip()
    rig.stack.callback(rig._force_unmount, mnt)
    source, fstype, options = mount_options(mnt)
    assert fstype == "fuse.fuseclone" and source == "fuseclone:" + os.path.abspath(rig.meta)
    assert {"nosuid", "nodev", "default_permissions"} <= options, options
    assert ("allow_other" in options) == allow_other, options
    assert pread(image, 0, len(data)) == data
    r = _as_nobody("cat", image)
    if allow_other:
        assert r.returncode == 0, r.stderr
        assert r.stdout == data
        assert stat.S_IMODE(os.stat(image).st_mode) == 0o644
    else:
        assert r.returncode != 0 and b"Permission denied" in r.stderr, r
        r = _as_nobody("stat", mnt)  # the kernel refuses other users the whole mount
        assert r.returncode != 0 and b"Permission denied" in r.stderr, r
        r = _as_nobody("dd", f"of={image}", "conv=notrunc", "count=0")
        assert r.returncode != 0
    assert pread(image, 0, len(data)) == data
    fuseclone("unmount", mnt)
    assert not _mounts_under([mnt])


# ---- the fusermount3 path, with an in-memory image ------------------------------------------


@contextlib.contextmanager
def watchdog(mountpoint, seconds=20):
    """The test serves the mount on its own event loop: a bug that touches the mount from that
    thread would wait for itself forever. After `seconds`, abort the connection (umount -f) so
    the stuck call returns, and fail."""
    import threading

    fired = threading.Event()

    def abort():
        fired.set()
        sh("umount", "-f", mountpoint, check=False, timeout=30)
        sh("umount", "-l", mountpoint, check=False, timeout=30)

    timer = threading.Timer(seconds, abort)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    assert not fired.is_set(), "the in-process mount deadlocked; the watchdog aborted it"


class MemoryImage:
    """An ImageBackend over a bytearray."""

    def __init__(self, data):
        self.buf = bytearray(data)
        self.flushes = 0
        self.perm = Permissions(0o640, os.getuid(), os.getgid())

    def permissions(self):
        return self.perm

    async def set_permissions(self, mode, uid, gid):
        self.perm = Permissions(self.perm.mode if mode is None else mode,
                                self.perm.uid if uid == -1 else uid, self.perm.gid if gid == -1 else gid)

    @property
    def size(self):
        return len(self.buf)

    async def read(self, offset, length):
        return bytes(self.buf[offset : offset + length])

    def read_now(self, offset, length, *, kernel_keeps):
        return Continue(functools.partial(self.read, offset, length))  # always in a task

    def write_now(self, offset, data, *, direct=False):
        return Continue(functools.partial(self.write, offset, data))

    async def write(self, offset, data, *, direct=False):
        self.buf[offset : offset + len(data)] = data

    async def discard(self, offset, length):
        self.buf[offset : offset + length] = bytes(length)

    write_zeroes = discard

    async def flush(self):
        self.flushes += 1

    def flush_now(self):
        return None  # always the async path

    def flush_is_short(self):
        return False

    async def seek(self, offset, whence):
        if offset >= self.size:
            raise OSError(errno.ENXIO, "past the end")
        return offset if whence == os.SEEK_DATA else self.size


def _blocking_io(image, data):
    with open(image, "rb") as f:
        assert f.read() == data
    with open(image, "r+b") as f:
        f.seek(4096)
        f.write(b"via fusermount3")
        os.fsync(f.fileno())
    sh("fallocate", "-p", "-o", 8192, "-l", 4096, image)
    with open(image, "rb") as f:
        return f.read()


@pytest.mark.parametrize("how", ["cancel", "fusermount3 -u"])
async def test_fusermount3_mount(tmp_path, how):
    if shutil.which("fusermount3") is None or not os.path.exists("/dev/fuse"):
        pytest.skip("needs fusermount3 and /dev/fuse")
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    data = os.urandom(64 * KiB)
    backend = MemoryImage(data)
    fs = ImageFilesystem(backend, name="image")
    fsname = f"fuseclone:{tmp_path}/odd, name.meta"  # a comma and a space survive the trip
    with watchdog(mnt):
        await _serve_and_use(fs, backend, mnt, fsname, data, how)
    assert not _mounts_under([mnt])
    assert os.listdir(mnt) == []
    with pytest.raises(OSError) as exc:
        unmount(mnt, use_fusermount=True)
    assert exc.value.errno == errno.EINVAL, exc.value  # nothing mounted there any more


async def _serve_and_use(fs, backend, mnt, fsname, data, how):
    """Everything that touches the mount runs in a worker thread, never on the serving loop."""
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(serve, fs, mnt, fsname=fsname, use_fusermount=True))
        try:
            source, fstype, options = await trio.to_thread.run_sync(mount_options, mnt)
            assert fstype == "fuse.fuseclone" and source == fsname
            assert {"nosuid", "nodev", "default_permissions"} <= options, options
            assert "allow_other" not in options, options
            assert await trio.to_thread.run_sync(is_fuseclone_mount, mnt)
            image = os.path.join(mnt, "image")
            got = await trio.to_thread.run_sync(_blocking_io, image, data)
            want = bytearray(data)
            want[4096 : 4096 + 15] = b"via fusermount3"
            want[8192 : 12288] = bytes(4096)
            assert got == want and backend.buf == want and backend.flushes >= 1
            if how == "cancel":
                nursery.cancel_scope.cancel()
            else:
                # the non-root unmount: EBUSY while the image is open, like umount2's, so the
                # session can fall back to a lazy unmount
                held = await trio.to_thread.run_sync(open, image, "rb")
                try:
                    with pytest.raises(OSError) as exc:
                        await trio.to_thread.run_sync(
                            functools.partial(unmount, mnt, use_fusermount=True))
                    assert exc.value.errno == errno.EBUSY, exc.value
                finally:
                    await trio.to_thread.run_sync(held.close)  # close(2) sends FLUSH
                await trio.to_thread.run_sync(functools.partial(unmount, mnt, use_fusermount=True))
        except BaseException:
            nursery.cancel_scope.cancel()
            raise


async def test_fusermount3_allow_other(tmp_path):
    if shutil.which("fusermount3") is None or not os.path.exists("/dev/fuse"):
        pytest.skip("needs fusermount3 and /dev/fuse")
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    fs = ImageFilesystem(MemoryImage(bytes(8192)), name="image")
    with watchdog(mnt):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve, fs, mnt, fsname="fuseclone:mem",
                                                  allow_other=True, use_fusermount=True))
            try:
                _, _, options = await trio.to_thread.run_sync(mount_options, mnt)
                assert {"nosuid", "nodev", "allow_other"} <= options, options
                st = await trio.to_thread.run_sync(os.stat, os.path.join(mnt, "image"))
                assert stat.S_IMODE(st.st_mode) == 0o640  # the backend's
            finally:
                nursery.cancel_scope.cancel()
    assert not _mounts_under([mnt])


@pytest.mark.parametrize("failing", ["top_mount", "set_dirty_limit"])
async def test_a_session_that_fails_after_mounting_unmounts(tmp_path, monkeypatch, failing):
    """Between mount(2) and INIT the session reads mountinfo (its mount's id, the dirty limit's
    bdi); out of descriptors (`ulimit -n`) that failed and left a mount without a daemon."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")

    def out_of_descriptors(*args):
        raise OSError(errno.EMFILE, "Too many open files", "/proc/self/mountinfo")

    from fuseclone.fuse import session

    monkeypatch.setattr(session, failing, out_of_descriptors)
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    fs = ImageFilesystem(MemoryImage(bytes(8192)), name="image")
    with watchdog(mnt):
        with pytest.raises(BaseException) as failed:
            async with trio.open_nursery() as nursery:
                await nursery.start(functools.partial(serve, fs, mnt, fsname="fuseclone:emfile",
                                                      write_cache=1 << 20))
    assert "Too many open files" in repr(failed.value)
    assert not _mounts_under([mnt]), "a mount without a daemon was left behind"


async def test_non_root_session_detaches_a_busy_mount(tmp_path, monkeypatch):
    """As a non-root user the session mounts and unmounts with fusermount3; an unmount while
    the image is open must fall back to a lazy one, as umount2's EBUSY does for root."""
    if shutil.which("fusermount3") is None or not os.path.exists("/dev/fuse"):
        pytest.skip("needs fusermount3 and /dev/fuse")
    monkeypatch.setattr(os, "geteuid", lambda: 65534)  # fusermount3 for mount and unmount
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    fs = ImageFilesystem(MemoryImage(os.urandom(8192)), name="image")
    # Another process holds the image: a file of this process on the mount would be closed
    # in the fusermount3 child at exec, and its FLUSH would wait for this very loop.
    holder = None
    with watchdog(mnt):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve, fs, mnt, fsname="fuseclone:busy"))
            try:
                _, fstype, _ = await trio.to_thread.run_sync(mount_options, mnt)
                assert fstype == "fuse.fuseclone"
                holder = await trio.to_thread.run_sync(functools.partial(
                    _start, "import sys; f = open(sys.argv[1], 'rb'); print('ready', flush=True); "
                            "sys.stdin.read()", os.path.join(mnt, "image"), stdin=subprocess.PIPE))
            finally:
                nursery.cancel_scope.cancel()  # the session unmounts on its way out
        try:
            assert not _mounts_under([mnt]), "the busy mount was left behind"
        finally:
            if holder is not None:
                holder.kill()
                holder.wait()


# ---- a slow NBD source: INTERRUPT, and unmount while a caller is blocked -----------------------


@pytest.fixture
def slow_nbd(rig, leaves_nothing_behind):
    """nbd+unix URL of rig.src (4 MiB random) behind nbdkit's delay filter."""
    pytest.importorskip("fuseclone.sources.nbd", reason="the NBD source is not importable")
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed")
    rig.data = make_random(rig.src, 4 * MiB)
    sock = os.path.join(leaves_nothing_behind.public_dir(), "nbd.sock")
    proc = subprocess.Popen(["nbdkit", "-f", "-r", "-U", sock, "--filter=delay", "file", rig.src,
                             f"rdelay={int(NBD_DELAY * 1000)}ms"], stderr=subprocess.PIPE)
    leaves_nothing_behind.processes.append(proc)

    def stop():
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    rig.stack.callback(stop)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "nbdkit did not start"
        time.sleep(0.02)
    return f"nbd+unix:///?socket={sock}"


_WRITER = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited ignored
fd = os.open(sys.argv[1], os.O_WRONLY)
print("ready", flush=True)
os.pwrite(fd, b"w" * 4096, int(sys.argv[2]))
print("written", flush=True)
"""

_READER = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited ignored
fd = os.open(sys.argv[1], os.O_RDONLY)
print("ready", flush=True)
try:
    data = os.pread(fd, 4096, int(sys.argv[2]))
    print("read", len(data), flush=True)
except OSError as exc:
    print("error", exc.errno, flush=True)
"""


def _start(script, *args, stdin=None):
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _wait_blocked(rig, proc, predicate=lambda st: True, timeout=NBD_DELAY * 0.6):
    """Until the daemon works on proc's request (predicate over live status) — proc still
    blocked."""
    deadline = time.monotonic() + timeout
    while not predicate(live_status(rig)):
        assert time.monotonic() < deadline, "the request did not reach the daemon"
        time.sleep(0.02)
    time.sleep(0.1)
    assert proc.poll() is None, "the caller was not blocked"


@contextlib.contextmanager
def _reaped(proc):
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL])
def test_interrupt_of_a_write_blocked_on_a_slow_source(rig, slow_nbd, signum):
    # write-through: with the write cache a buffered write returns before it reaches the daemon
    rig.mount("--region-size", "64K", "--no-hydration", "--no-copy-on-read", "--write-cache", "0",
              src=slow_nbd)
    offset = 7 * RS  # a partial write: the region must be copied from the source first
    with _reaped(_start(_WRITER, rig.image, offset)) as writer:
        _wait_blocked(rig, writer, lambda st: st["hydrating_regions"] >= 1)
        sent = time.monotonic()
        writer.send_signal(signum)
        # the kernel sends INTERRUPT; the daemon answers EINTR at once instead of after the
        # source's delay
        writer.wait(timeout=NBD_DELAY * 3)
        elapsed = time.monotonic() - sent
        assert writer.returncode != 0 and "written" not in writer.stdout.read()
        assert elapsed < NBD_DELAY * 0.5, f"the writer took {elapsed:.1f} s to die"
    st = live_status(rig)
    assert st["hydrating_regions"] == 0 and st["hydrated_regions"] == 0, st
    # the mount and its source connection stay usable: the same write again, uninterrupted
    with _reaped(_start(_WRITER, rig.image, offset)) as writer:
        assert writer.wait(timeout=NBD_DELAY * 4) == 0, writer.stderr.read()
    expected = rig.data[RS * 7 : RS * 8]
    expected = b"w" * 4096 + expected[4096:]
    assert pread(rig.image, 7 * RS, RS) == expected
    assert live_status(rig)["hydrated_regions"] == 1


_GATED_WRITER = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited ignored
fd = os.open(sys.argv[1], os.O_WRONLY)
print("ready", flush=True)
sys.stdin.readline()
os.pwrite(fd, b"w" * 4096, int(sys.argv[2]))
print("written", flush=True)
"""


def test_interrupt_of_a_write_signalled_before_the_daemon_read_it(rig, slow_nbd):
    rig.mount("--region-size", "64K", "--no-hydration", "--no-copy-on-read", "--write-cache", "0",
              src=slow_nbd)
    daemon = control.request(rig.meta, {"op": "status"})["pid"]
    with _reaped(_start(_GATED_WRITER, rig.image, 7 * RS, stdin=subprocess.PIPE)) as writer:
        os.kill(daemon, signal.SIGSTOP)  # the WRITE waits in the kernel's queue, unread
        try:
            writer.stdin.write("go\n")
            writer.stdin.flush()
            time.sleep(0.3)
            writer.send_signal(signal.SIGINT)  # FR_INTERRUPTED before FR_SENT
            time.sleep(0.2)
            assert writer.poll() is None
        finally:
            os.kill(daemon, signal.SIGCONT)
        sent = time.monotonic()
        writer.wait(timeout=NBD_DELAY * 3)
        elapsed = time.monotonic() - sent
        assert elapsed < NBD_DELAY * 0.5, f"the writer took {elapsed:.1f} s to die"


_MMAP_READER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
m.madvise(mmap.MADV_RANDOM)  # no readahead: the fault reads its page with a synchronous READ
print("ready", flush=True)
print("read", m[int(sys.argv[2])], flush=True)
"""


def test_killing_a_copy_on_read_does_not_fail_a_writer_waiting_for_it(rig, slow_nbd):
    rig.mount("--region-size", "64K", "--no-hydration", "--write-cache", "0",
              src=slow_nbd)  # copy-on-read on; write-through, so the writer waits on the copy
    with _reaped(_start(_MMAP_READER, rig.image, 7 * RS + 100)) as reader:
        _wait_blocked(rig, reader, lambda st: st["hydrating_regions"] >= 1)  # its claim
        # a partial write to the same region waits for that copy-on-read
        with _reaped(_start(_WRITER, rig.image, 7 * RS + 8192)) as writer:
            time.sleep(0.3)
            assert writer.poll() is None
            sent = time.monotonic()
            reader.kill()  # INTERRUPT: the copy-on-read is cancelled
            reader.wait(timeout=NBD_DELAY * 3)
            assert time.monotonic() - sent < NBD_DELAY * 0.5
            # the writer copies the region itself instead of failing
            assert writer.wait(timeout=NBD_DELAY * 4) == 0, writer.stderr.read()
    expected = bytearray(rig.data[7 * RS : 8 * RS])
    expected[8192 : 8192 + 4096] = b"w" * 4096
    assert pread(rig.image, 7 * RS, RS) == expected


def test_killed_reader_dies_promptly_and_the_mount_stays_usable(rig, slow_nbd):
    rig.mount("--region-size", "64K", "--no-hydration", "--no-copy-on-read", src=slow_nbd)
    with _reaped(_start(_READER, rig.image, 3 * RS)) as reader:
        time.sleep(0.5)
        assert reader.poll() is None, "the read did not block"
        sent = time.monotonic()
        reader.kill()
        reader.wait(timeout=NBD_DELAY * 3)
        assert time.monotonic() - sent < NBD_DELAY * 0.5
    with _reaped(_start(_READER, rig.image, 11 * RS)) as reader:
        assert reader.wait(timeout=NBD_DELAY * 4) == 0
        assert reader.stdout.read().split() == ["read", "4096"]
    assert pread(rig.image, 11 * RS, 4096) == rig.data[11 * RS : 11 * RS + 4096]


def test_stop_while_a_reader_is_blocked(rig, slow_nbd):
    """A read waiting on a slow source hangs neither `fuseclone unmount` (refused at once: the
    image is open) nor a SIGTERM, which stops the mount with the read answered."""
    rig.mount("--region-size", "64K", "--no-hydration", "--no-copy-on-read", src=slow_nbd)
    daemon = control.request(rig.meta, {"op": "status"})["pid"]
    with _reaped(_start(_READER, rig.image, 5 * RS)) as reader:
        time.sleep(0.5)
        assert reader.poll() is None, "the read did not block"
        started = time.monotonic()
        refused = fuseclone("unmount", rig.mnt, "--timeout", "20", check=False, timeout=30)
        assert refused.returncode == 1 and "is in use by" in refused.stderr
        os.kill(daemon, signal.SIGTERM)
        rig.wait_unmounted(timeout=10)
        took = time.monotonic() - started
        reader.wait(timeout=NBD_DELAY * 3)  # answered (data or an error), never hung
        assert reader.returncode == 0, reader.stderr.read()
        assert reader.stdout.read().split()[0] in ("read", "error")
    assert took < NBD_DELAY * 3, f"stopping took {took:.1f} s"
    _wait_for_clean(rig.meta)


def _wait_for_clean(meta_path, timeout=10):
    """The stopping daemon commits and marks META clean after the unmount itself."""
    deadline = time.monotonic() + timeout
    while Metadata.in_use(meta_path):
        assert time.monotonic() < deadline, "META still in use"
        time.sleep(0.05)
    with Metadata.open(meta_path, writable=False) as meta:
        assert meta.header.clean


# ---- SIGTERM while a loop device holds the image ---------------------------------------------


def _write_direct(device, offset, data, fsync=False):
    """An O_DIRECT write to a device, from page-aligned memory."""
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(data))
        buf.write(data)
        os.pwritev(fd, [buf], offset)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _assert_in_dst_on_a_clean_stop(rig, offset, data):
    """META was left clean with the write's region hydrated, and DST holds the write."""
    with Metadata.open(rig.meta, writable=False) as meta:
        assert meta.header.clean
        assert meta.is_hydrated(offset // meta.header.region_size)
    with open(rig.dst, "rb") as f:
        f.seek(offset)
        assert f.read(len(data)) == data


@contextlib.contextmanager
def _foreground_mount(rig, *options, src=None):
    """`fuseclone mount --foreground` as a child process, once the image is mounted."""
    proc = subprocess.Popen([sys.executable, "-m", "fuseclone", "mount", "--foreground", *options,
                             src or rig.src, rig.dst, rig.meta, rig.mnt], stderr=subprocess.PIPE,
                            text=True)
    with _reaped(proc):
        rig.stack.callback(rig._force_unmount, rig.mnt)
        deadline = time.monotonic() + 30
        while not is_fuseclone_mount(rig.mnt):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield proc


def test_a_second_signal_stops_without_waiting_for_cached_writes(rig, slow_nbd):
    # A cached whole-page write into part of an unhydrated region: handing it over waits for
    # that region's copy from the slow source.
    with _foreground_mount(rig, "--region-size", "64K", "--no-hydration", "--no-copy-on-read",
                           src=slow_nbd) as proc:
        fd = os.open(rig.image, os.O_RDWR)
        try:
            os.pwrite(fd, b"\x33" * 4096, 0)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None  # still handing the write over
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=NBD_DELAY * 3)
            elapsed = time.monotonic() - started
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
    assert elapsed < NBD_DELAY * 0.5, f"the second signal took {elapsed:.1f} s"
    assert "again" in proc.stderr.read()


def test_a_stop_goes_on_without_cached_writes_that_wait_for_a_silent_source(rig, slow_nbd):
    """The other side of waiting out a frozen DST or META (test_stopping): a cached write that
    waits for the source is given up after WRITE_BACK_TIMEOUT, so a stop never hangs on a
    source that does not answer."""
    from tests.integration.test_stopping import (foreground_mount_with_write_back_timeout,
                                                 wait_for_line)

    log = str(rig.tmp / "mount.log")
    proc = foreground_mount_with_write_back_timeout(
        rig, 0.5, log, "--region-size", "64K", "--no-hydration", "--no-copy-on-read",
        src=slow_nbd)
    fd = os.open(rig.image, os.O_RDWR)
    try:
        os.pwrite(fd, b"\x33" * 4096, 0)  # part of an unhydrated region: waits for its copy
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        wait_for_line(log, "waiting for the source: going on without them")
        proc.wait(timeout=NBD_DELAY * 3)
        elapsed = time.monotonic() - started
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    assert elapsed < NBD_DELAY, f"the stop took {elapsed:.1f} s"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: a terminal closed
def test_sigterm_hands_cached_writes_over_before_it_stops(rig, signum):
    """A buffered loop device's writes sit in the kernel's cache of the image; a SIGTERM while
    the loop device still holds it must write them to DST before the session ends."""
    data = make_random(rig.src, 8 * MiB)
    with _foreground_mount(rig, "--no-hydration") as proc:
        loop = rig.losetup(None, "--direct-io=off")
        _write_direct(loop, 3 * MiB, b"\x5a" * 64 * 1024)  # no fsync: the kernel holds it
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        sh("losetup", "-d", loop, timeout=30)
    _assert_in_dst_on_a_clean_stop(rig, 3 * MiB, b"\x5a" * 64 * 1024)
    assert data[3 * MiB : 3 * MiB + 16] != b"\x5a" * 16


def test_sigterm_while_a_loop_device_holds_the_image(rig):
    data = make_random(rig.src, 8 * MiB)
    with _foreground_mount(rig, "--no-hydration") as proc:
        loop = rig.losetup()
        assert pread(loop, 0, 1 * MiB, direct=True) == data[: 1 * MiB]
        _write_direct(loop, 2 * MiB, b"\x42" * 4096, fsync=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    # the daemon is gone: the loop device gets errors, it does not hang
    # (7 MiB: not in the image's page cache, which still serves what was read before)
    r = sh("dd", f"if={loop}", "of=/dev/null", "bs=4096", "count=1", f"skip={7 * MiB // 4096}",
           "iflag=direct", check=False, timeout=30)
    assert r.returncode != 0
    assert not is_fuseclone_mount(rig.mnt)
    sh("losetup", "-d", loop, timeout=30)
    _assert_in_dst_on_a_clean_stop(rig, 2 * MiB, b"\x42" * 4096)
    # and the clone resumes
    rig.mount()
    expected = bytearray(data)
    expected[2 * MiB : 2 * MiB + 4096] = b"\x42" * 4096
    assert pread(rig.image, 0, len(expected)) == expected


def test_direct_and_buffered_openers_see_each_others_writes(rig):
    """A direct opener's I/O skips the image's page cache (FOPEN_DIRECT_IO): the kernel must
    still write back a buffered writer's dirty pages before a direct read or write of their
    range, and drop pages a buffered reader cached before a direct write replaced them."""
    data = bytearray(make_random(rig.src, 1 * MiB))
    rig.mount()  # the write cache: buffered writes stay dirty in the kernel
    assert pread(rig.image, 0, 64 * KiB) == data[: 64 * KiB]  # cached by a buffered reader
    _write_direct(rig.image, 8 * KiB, b"d" * 4096)
    data[8 * KiB : 12 * KiB] = b"d" * 4096
    assert pread(rig.image, 0, 64 * KiB) == data[: 64 * KiB]
    fd = os.open(rig.image, os.O_RDWR)
    try:
        os.pwrite(fd, b"b" * 4096, 16 * KiB)  # dirty in the page cache, no fsync
        data[16 * KiB : 20 * KiB] = b"b" * 4096
        assert pread(rig.image, 0, 64 * KiB, direct=True) == data[: 64 * KiB]
        os.pwrite(fd, b"c" * 4096, 24 * KiB)
        _write_direct(rig.image, 24 * KiB, b"e" * 4096)  # the dirty page must not win later
        data[24 * KiB : 28 * KiB] = b"e" * 4096
        os.fsync(fd)
    finally:
        os.close(fd)
    assert pread(rig.image, 0, 64 * KiB) == data[: 64 * KiB]
    assert pread(rig.image, 0, 64 * KiB, direct=True) == data[: 64 * KiB]
    fd = os.open(rig.image, os.O_RDWR | os.O_DIRECT)  # and a direct opener may map it shared
    try:
        with mmap.mmap(fd, 64 * KiB, mmap.MAP_SHARED) as mapped:
            assert mapped[:] == data[: 64 * KiB]
    finally:
        os.close(fd)
    fuseclone("unmount", rig.mnt)
    with open(rig.dst, "rb") as f:
        assert f.read(64 * KiB) == data[: 64 * KiB]


def test_a_direct_writers_commit_sends_no_times(rig):
    """With the write cache the kernel kept the image's times itself and sent them as a SETATTR
    before the next FSYNC, inside the inode lock that a database's writes wait for. A direct
    opener's writes stamp none (the times the daemon reports stay)."""
    make_random(rig.src, 1 * MiB)
    rig.mount()
    before = os.stat(rig.image).st_mtime_ns
    time.sleep(0.05)  # past the kernel's coarse clock tick
    fd = os.open(rig.image, os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)
        buf.write(b"t" * 4096)
        os.pwritev(fd, [buf], 0)
        os.fsync(fd)
        assert os.fstat(fd).st_mtime_ns == before
    finally:
        os.close(fd)
    assert pread(rig.image, 0, 4096) == b"t" * 4096
