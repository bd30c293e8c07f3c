"""Edges a user reaches by doing something unusual to a live clone's files: whatever happens,
the clone never ends up claiming data it does not have."""

import errno
import os
import shutil
import time

import pytest

from tests.integration.conftest import MiB, fuseclone, status_json


def poll_status(mnt, predicate, timeout=30):
    """The mount's `status --json` once PREDICATE holds for it."""
    deadline = time.monotonic() + timeout
    while True:
        st = status_json(mnt)
        if predicate(st):
            return st
        assert time.monotonic() < deadline, f"status never matched: {st}"
        time.sleep(0.1)


def test_a_source_file_truncated_under_a_live_clone_fails_instead_of_hydrating_zeros(
        rig, random_source):
    saved = rig.tmp / "saved.img"
    shutil.copyfile(rig.src, saved)
    stamp = os.stat(rig.src)
    rig.mount("--no-hydration")
    os.truncate(rig.src, 8 * MiB)  # its end, with data, is gone

    fuseclone("message", rig.mnt, "enable_hydration")
    st = poll_status(rig.mnt, lambda st: st["complete"] or st["hydration_retry"])
    assert not st["complete"]
    assert "source changed" in st["hydration_retry"]
    fd = os.open(rig.image, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            os.pread(fd, 4096, 20 * MiB)
        assert info.value.errno == errno.EIO
    finally:
        os.close(fd)
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    # Put SRC back as it was: whatever was hydrated is the source's own data.
    shutil.copyfile(saved, rig.src)
    os.utime(rig.src, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    fuseclone("check", rig.meta, "--src", rig.src, "--dst", rig.dst, "--verify")
