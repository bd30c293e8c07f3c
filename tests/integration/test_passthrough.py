"""`mount --passthrough` for real: a clone complete at mount is read and written by the kernel
straight from DST (the daemon sees no READ or WRITE), a writable open first marks the whole image
written for `diff`, a clone still hydrating is served by the daemon, and a DST the kernel cannot
pass through to is refused with one line."""

import errno
import json
import os

import pytest

from tests.integration.conftest import MiB, fuseclone, sh, sha256, status_json

SIZE = 32 * MiB


@pytest.fixture
def complete_clone(rig, random_source):
    """The random source cloned and hydrated by one mount, then unmounted: complete at the
    next mount."""
    rig.mount()
    fuseclone("wait", rig.mnt, "--timeout", "120")
    fuseclone("unmount", rig.mnt)
    return rig


def test_a_complete_clone_is_read_and_written_without_the_daemon(complete_clone):
    rig = complete_clone
    rig.mount("--passthrough")
    st = status_json(rig.mnt)
    if not st["passthrough"]:
        pytest.skip("this kernel offers no FUSE passthrough (see the mount's log)")

    for flags in (["-r", "--direct-io=on"], ["-r"]):  # read-only opens, direct and buffered
        loop = rig.losetup(None, *flags)
        assert sha256(loop) == sha256(rig.src)
        sh("losetup", "-d", loop)
    st = status_json(rig.mnt)
    assert (st["user_read_bytes"], st["written_bytes"]) == (0, 0)  # not one READ, nothing marked

    data = os.urandom(64 * 1024)
    fd = os.open(rig.image, os.O_RDWR)  # a writable open: the whole image is marked written first
    try:
        assert status_json(rig.mnt)["written_bytes"] == SIZE
        os.pwrite(fd, data, 5 * MiB)
        os.fsync(fd)  # still comes to the daemon, which syncs DST
    finally:
        os.close(fd)
    st = status_json(rig.mnt)
    assert (st["user_read_bytes"], st["user_write_bytes"]) == (0, 0)
    fuseclone("unmount", rig.mnt)

    with open(rig.dst, "rb") as f:
        f.seek(5 * MiB)
        assert f.read(len(data)) == data
    doc = json.loads(fuseclone("diff", rig.meta, "--json").stdout)
    assert [(e["offset"], e["length"]) for e in doc["extents"]] == [(0, SIZE)]


def test_a_clone_still_hydrating_is_served_by_the_daemon(rig, random_source):
    rig.mount("--passthrough", "--no-hydration")
    loop = rig.losetup(None, "-r")
    assert sha256(loop) == sha256(rig.src)
    st = status_json(rig.mnt)
    assert not st["passthrough"] and st["user_read_bytes"] == SIZE
    assert "passthrough" in open(st["log_file"]).read()


def test_a_block_device_destination_is_refused(rig, random_source):
    with open(rig.dst, "wb") as f:
        f.truncate(SIZE)
    dst_device = rig.losetup(rig.dst)
    result = fuseclone("mount", rig.src, dst_device, rig.meta, rig.mnt, "--passthrough", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"fuseclone: error: {dst_device}: --passthrough needs a destination that is a regular file "
        "(the kernel passes FUSE I/O through to files only)"]
    assert not os.path.exists(rig.meta)


def test_a_write_past_the_end_is_refused_at_fsync_and_leaves_dst_its_size(complete_clone):
    """The kernel writes DST itself and does not know where the image ends: a write past it
    grew DST, and fsync said nothing, while the image never showed those bytes again."""
    rig = complete_clone
    rig.mount("--passthrough")
    if not status_json(rig.mnt)["passthrough"]:
        pytest.skip("this kernel offers no FUSE passthrough (see the mount's log)")
    fd = os.open(rig.image, os.O_RDWR)
    try:
        os.pwrite(fd, b"in", SIZE - 2)
        os.fsync(fd)
        os.pwrite(fd, b"straddles", SIZE - 4)  # the kernel takes it whole
        with pytest.raises(OSError) as refused:
            os.fsync(fd)
        assert refused.value.errno == errno.ENOSPC
        os.fsync(fd)  # reported once, like a failed writeback
        assert os.path.getsize(rig.dst) == SIZE
        os.pwrite(fd, b"beyond", SIZE + MiB)
    finally:
        with pytest.raises(OSError) as refused:
            os.close(fd)  # the close's FLUSH finds it
    assert refused.value.errno == errno.ENOSPC
    assert os.path.getsize(rig.dst) == SIZE
    fuseclone("unmount", rig.mnt)
    with open(rig.dst, "rb") as f:
        f.seek(SIZE - 4)
        assert f.read() == b"stra"


def test_a_destination_longer_than_the_image_is_not_passed_through(complete_clone):
    """The kernel reads DST itself up to DST's end, not the image's: a reader of the image
    (cat, cp, sha256sum read to EOF) got DST's bytes past it, more than the image's size.
    Such a DST (a file given longer than the image; one grown by a passthrough write past the
    end whose mount was killed before the close cut it back) is served by the daemon, and
    left as it is."""
    rig = complete_clone
    with open(rig.dst, "r+b") as f:
        f.seek(SIZE + 4096)
        f.write(b"past the image")
    rig.mount("--passthrough")
    with open(rig.image, "rb") as f:
        assert len(f.read()) == SIZE
    assert sha256(rig.image) == sha256(rig.src)
    assert not status_json(rig.mnt)["passthrough"]
    fuseclone("unmount", rig.mnt)
    assert os.path.getsize(rig.dst) == SIZE + 4096 + len(b"past the image")
