"""Kinds of sources and destinations: a block device is known by more than its name, since a
name such as /dev/loop0 comes back holding other data once its loop device is set up again."""

import errno
import fcntl
import json
import mmap
import os
import struct
import time

import pytest

from tests.engine.conftest import make_source_file
from tests.integration.conftest import MiB, fuseclone, sh

LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_CHANGE_FD = 0x4C06
_LOOP_INFO64 = 232  # sizeof(struct loop_info64); lo_offset is its fourth __u64


def move_loop_offset(loop: str, offset: int) -> None:
    """What `losetup -o OFFSET` on a fresh setup of the same file would give, on LOOP's node."""
    fd = os.open(loop, os.O_RDONLY)
    try:
        info = bytearray(fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64)))
        struct.pack_into("=Q", info, 24, offset)
        fcntl.ioctl(fd, LOOP_SET_STATUS64, bytes(info))
    finally:
        os.close(fd)


def swap_loop_file(loop: str, path: str) -> None:
    """Put another file of the same size beneath read-only loop device LOOP (LOOP_CHANGE_FD), as
    `losetup -d` and a `losetup` of another file that got the same node would."""
    fd, new = os.open(loop, os.O_RDONLY), os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, LOOP_CHANGE_FD, new)
    finally:
        os.close(new)
        os.close(fd)


def test_a_loop_device_destination_that_now_shows_other_data_is_refused(rig):
    make_source_file(rig.src, 2 * MiB, seed=3)
    with open(rig.dst, "wb") as f:
        f.write(os.urandom(4 * MiB))
    loop = rig.losetup(rig.dst)
    # Random data beyond the image, so that each offset into the file shows other data
    fuseclone("mount", rig.src, loop, rig.meta, rig.mnt, "--overwrite-dst")
    rig.stack.callback(rig._force_unmount, rig.mnt)
    fuseclone("wait", rig.mnt, "--timeout", "60")
    fuseclone("unmount", rig.mnt)
    move_loop_offset(loop, 1 * MiB)  # the same node and file, other data at each offset
    result = fuseclone("mount", rig.src, loop, rig.meta, rig.mnt, check=False)
    assert result.returncode == 1, result.stdout
    assert "belongs to another clone: its destination was" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    check = fuseclone("check", rig.meta, "--src", rig.src, "--dst", loop, check=False)
    assert check.returncode == 1 and "MISMATCH" in check.stdout


def test_a_loop_device_source_now_backed_by_another_file_is_refused(rig):
    make_source_file(rig.src, 2 * MiB, seed=4)
    other = str(rig.tmp / "other.img")
    make_source_file(other, 2 * MiB, seed=5)
    loop = rig.losetup(rig.src, "--read-only")
    rig.mount("--no-hydration", src=loop)
    fuseclone("unmount", rig.mnt)
    swap_loop_file(loop, other)
    result = fuseclone("mount", loop, rig.dst, rig.meta, rig.mnt, check=False)
    assert result.returncode == 1, result.stdout
    assert "belongs to another clone: its source was" in result.stderr


def test_a_block_device_source_that_now_holds_other_data_is_refused(rig):
    """A block device is known by its name (a loop device by its backing file too): a disk
    written over with another image keeps both; its data sample tells them apart."""
    make_source_file(rig.src, 2 * MiB, seed=4)
    loop = rig.losetup(rig.src, "--read-only")
    rig.mount("--no-hydration", src=loop)
    fuseclone("unmount", rig.mnt)
    with open(rig.src, "r+b") as f:  # the same file and node, another image
        f.write(open(make_source_file(str(rig.tmp / "other.img"), 2 * MiB, seed=5), "rb").read())
    sh("blockdev", "--flushbufs", loop)  # the loop device's page cache held the old data
    meta_before = open(rig.meta, "rb").read()
    result = fuseclone("mount", loop, rig.dst, rig.meta, rig.mnt, check=False)
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{loop}: its data differs from what the clone was made" in lines[0]
    assert open(rig.meta, "rb").read() == meta_before


def test_a_read_only_block_device_destination_is_refused_with_one_line(rig):
    make_source_file(rig.src, 2 * MiB, seed=6)
    with open(rig.dst, "wb") as f:
        f.truncate(4 * MiB)
    loop = rig.losetup(rig.dst)
    sh("blockdev", "--setro", loop)
    # The flag stays with the device node after `losetup -d`: the next user would inherit it.
    rig.stack.callback(lambda: sh("blockdev", "--setrw", loop, check=False))
    result = fuseclone("mount", rig.src, loop, rig.meta, rig.mnt, check=False)
    rig.stack.callback(rig._force_unmount, rig.mnt)
    assert result.returncode == 1, result.stdout
    assert result.stderr.strip() == f"fuseclone: error: {loop}: destination is read-only"
    assert not os.path.exists(rig.meta)


def test_reads_of_a_destination_truncated_under_a_live_clone_fail_instead_of_reading_zeros(
        rig):
    """Its hydrated regions past the new end are gone: zeros would be data that is neither the
    source's nor a user's."""
    make_source_file(rig.src, 4 * MiB, seed=7, zero_every=0, hole_every=0)
    rig.mount()
    fuseclone("wait", rig.mnt, "--timeout", "60")
    os.truncate(rig.dst, 2 * MiB)
    buffer = mmap.mmap(-1, 4096)
    fd = os.open(rig.image, os.O_RDONLY | os.O_DIRECT)  # past the image's page cache
    try:
        assert os.preadv(fd, [buffer], MiB) == 4096  # still there
        with pytest.raises(OSError) as failed:
            os.preadv(fd, [buffer], 3 * MiB)
        assert failed.value.errno == errno.EIO
    finally:
        os.close(fd)
    # Its last commit is refused (what it would mark is gone): no clean stop to ask for
    fuseclone("unmount", rig.mnt, check=False)


def _direct_io(path, flags):
    return os.open(path, flags | os.O_DIRECT)


def test_a_write_past_the_end_of_a_truncated_destination_does_not_bring_back_zeros(rig):
    """A write past the cut (a user's, a copy's) would extend DST again, and its hole would read
    as zeros where hydrated data was, now and at every later mount, which the size check could
    no longer refuse. The write is refused, DST stays short, the clone goes to fail mode and
    the next mount refuses the short DST."""
    make_source_file(rig.src, 4 * MiB, seed=7, zero_every=0, hole_every=0)
    rig.mount()
    fuseclone("wait", rig.mnt, "--timeout", "60")
    os.truncate(rig.dst, 2 * MiB)
    buffer = mmap.mmap(-1, 4096)
    buffer.write(b"w" * 4096)
    fd = _direct_io(rig.image, os.O_RDWR)
    try:
        with pytest.raises(OSError) as failed:
            os.pwritev(fd, [buffer], 4 * MiB - 4096)
        assert failed.value.errno == errno.EIO
        assert os.path.getsize(rig.dst) == 2 * MiB
        with pytest.raises(OSError) as failed:
            os.preadv(fd, [buffer], 3 * MiB)
        assert failed.value.errno == errno.EIO
    finally:
        os.close(fd)
    status = json.loads(fuseclone("status", rig.mnt, "--json").stdout)
    assert status["metadata_mode"] == "fail"
    assert "truncated" in status["metadata_error"], status["metadata_error"]
    fuseclone("unmount", rig.mnt, check=False)
    rig.wait_unmounted()
    again = fuseclone("mount", rig.src, rig.dst, rig.meta, rig.mnt, check=False)
    assert again.returncode == 1, again.stdout
    assert "truncated since the clone began" in again.stderr, again.stderr
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr


def test_a_destination_truncated_under_an_idle_clone_puts_it_in_fail_mode(rig):
    """Nothing writes DST, yet what was cut off is gone: status says so within seconds (as for
    a META deleted while idle), not only once a read of the lost part fails."""
    make_source_file(rig.src, 4 * MiB, seed=7, zero_every=0, hole_every=0)
    rig.mount()
    fuseclone("wait", rig.mnt, "--timeout", "60")
    os.truncate(rig.dst, 2 * MiB)
    deadline = time.monotonic() + 10
    while (status := json.loads(fuseclone("status", rig.mnt, "--json").stdout))[
            "metadata_mode"] != "fail":
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert "truncated" in status["metadata_error"], status["metadata_error"]
    fuseclone("unmount", rig.mnt, check=False)
