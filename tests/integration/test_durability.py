"""The ways a client asks for durability besides fsync, and what it is told when durability
fails: each acknowledged durable write survives a SIGKILL of the daemon and a remount."""

import errno
import mmap
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from fuseclone.destination import Destination
from tests.integration.conftest import MiB, daemon_pid, fuseclone, random_source  # noqa: F401
from tests.integration.test_metadata_failure import fill, small_tmpfs
from tests.integration.test_fuse_crash import _wait_gone

SYNC_WAYS = {
    "O_DSYNC": (os.O_DSYNC, 0),
    "O_SYNC": (os.O_SYNC, 0),
    "RWF_DSYNC": (0, os.RWF_DSYNC),
    "RWF_SYNC": (0, os.RWF_SYNC),
}


def _kill_daemon_and_remount(rig, fd, *options):
    """SIGKILL the mount's daemon, close the image's FD (its FLUSH finds no daemon), clean the
    stale mount, mount again."""
    pid = daemon_pid(rig.mnt)
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)
    with pytest.raises(OSError, match="not connected"):
        os.close(fd)
    assert "stale" in fuseclone("unmount", rig.mnt).stderr
    rig.mount(*options)


def _aligned(data: bytes) -> mmap.mmap:
    buffer = mmap.mmap(-1, len(data))
    buffer[:] = data
    return buffer


@pytest.mark.parametrize("way, length, direct, cache", [
    ("O_DSYNC", 4096, True, []),
    ("O_SYNC", MiB, True, ["--write-cache", "0"]),
    ("RWF_DSYNC", MiB, True, []),
    ("RWF_SYNC", 4096, True, ["--write-cache", "0"]),
    ("O_DSYNC", MiB, False, []),
    ("RWF_DSYNC", 4096, False, ["--write-cache", "0"]),
], ids=["O_DSYNC-4K-direct", "O_SYNC-1M-direct-write-through", "RWF_DSYNC-1M-direct",
        "RWF_SYNC-4K-direct-write-through", "O_DSYNC-1M-buffered",
        "RWF_DSYNC-4K-buffered-write-through"])
def test_a_synchronous_write_survives_a_sigkill_without_fsync(rig, random_source, way, length,  # noqa: F811
                                                               direct, cache):
    """An O_SYNC/O_DSYNC open or a RWF_SYNC/RWF_DSYNC write is durable when it returns, no
    fsync needed. Whole unhydrated regions are written, which are marked hydrated without a
    copy: until a commit, a crash leaves them unhydrated (read from the source again). An
    O_DIRECT opener's write (FOPEN_DIRECT_IO) gets no FSYNC from the kernel after it: it was
    answered before its commit, and read as the source's data after the kill."""
    options = ["--no-hydration", "--no-copy-on-read", *cache]
    rig.mount(*options)
    open_flag, rwf = SYNC_WAYS[way]
    data = os.urandom(length)
    offset = 5 * MiB
    fd = os.open(rig.image, os.O_RDWR | open_flag | (os.O_DIRECT if direct else 0))
    assert os.pwritev(fd, [_aligned(data)], offset, rwf) == length
    _kill_daemon_and_remount(rig, fd, *options)
    with open(rig.image, "rb") as image:
        image.seek(offset)
        assert image.read(length) == data, f"an acknowledged {way} write was lost"
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()


def test_two_syncs_of_dst_at_once_are_both_told_of_a_lost_writeback(rig):
    """The kernel reports a writeback error once per open file: of two fdatasyncs of one
    descriptor at once, one failed and the other returned 0, so a user's FSYNC beside a
    commit's (or a flush on the loop beside one on the job thread) was acknowledged for data
    the kernel had dropped. DST here is a loop device over a tmpfs that has no room left, as
    a thin-provisioned volume that ran out."""
    room = small_tmpfs(rig, "room", "4M")
    backing = room / "dst.raw"
    backing.write_bytes(b"")
    os.truncate(backing, 8 * MiB)  # sparse: DST's blocks need room in the tmpfs when written
    dst = Destination.open(rig.losetup(str(backing)), 8 * MiB, create=False)
    try:
        fill(room)
        dst.write(MiB, os.urandom(MiB))  # into the device's page cache: its writeback fails
        both = threading.Barrier(2)

        def datasync(_):
            both.wait()
            try:
                dst.datasync()
            except OSError as exc:
                return exc.errno
            return 0

        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(datasync, range(2))) == [errno.EIO, errno.EIO]
        with pytest.raises(OSError) as later:  # and every one after
            dst.datasync()
        assert later.value.errno == errno.EIO
    finally:
        dst.close()
