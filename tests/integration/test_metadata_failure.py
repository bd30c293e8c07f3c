"""META or DST out of space, through the real CLI: the failure is loud (status, wait, messages
say why), user I/O gets the errno, and the clone recovers once the space is back."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import MiB, fuseclone, sh, status_json

RESUME_HINT = "unmount and mount again to resume from the last good commit"


def small_tmpfs(rig, name, size):
    """A tmpfs of SIZE at rig.tmp/NAME, unmounted after everything mounted later in the test."""
    where = rig.tmp / name
    where.mkdir()
    sh("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where)
    rig.stack.callback(lambda: sh("umount", "-l", where, check=False))
    return where


def hydrate_once_space_is_back(rig, filesystem, size, lost=None):
    """Grow the tmpfs at FILESYSTEM to SIZE, resume hydration, let it complete, unmount, and
    check the clone against the source. LOST: the cached writes the unmount reports lost."""
    sh("mount", "-o", f"remount,size={size}", filesystem)
    fuseclone("message", rig.mnt, "enable_hydration")
    fuseclone("wait", rig.mnt, "--timeout", "120")
    unmounted = fuseclone("unmount", rig.mnt, check=lost is None)
    if lost is not None:
        assert unmounted.returncode == 1 and lost in unmounted.stderr, unmounted.stderr
    rig.wait_unmounted()
    fuseclone("check", rig.meta, "--src", rig.src, "--dst", rig.dst, "--verify")


def fill(directory):
    """Write a file in DIRECTORY until its filesystem is full; returns the file's path."""
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (bytes(MiB), bytes(4096)):
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return path


def write_source_bytes(rig, offset, length):
    """Write the source's own bytes at OFFSET through the image and fsync them: whatever lands
    in DST keeps the clone equal to the source, so `check --verify` judges only the rest."""
    with open(rig.src, "rb") as src:
        src.seek(offset)
        data = src.read(length)
    fd = os.open(rig.image, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_uncached(rig, offset, length):
    """Read through the daemon, not the kernel's page cache of the image."""
    fd = os.open(rig.image, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def test_meta_out_of_space_is_loud_and_recoverable(rig, random_source):
    metafs = small_tmpfs(rig, "metafs", "16M")
    rig.meta = str(metafs / "clone.meta")
    rig.mount("--no-hydration")
    write_source_bytes(rig, 0, MiB)  # a good commit: the first of the two bitmap slots
    filler = fill(metafs)
    waiter = subprocess.Popen([sys.executable, "-m", "fuseclone", "wait", rig.mnt],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rig.stack.callback(waiter.kill)

    # The next commit needs the second slot's page: there is none.
    with pytest.raises(OSError) as info:
        write_source_bytes(rig, 4 * MiB, MiB)
    assert info.value.errno == errno.EIO
    _, err = waiter.communicate(timeout=30)  # a wait already under way ends with the failure
    assert waiter.returncode == 1 and RESUME_HINT in err

    st = status_json(rig.mnt)
    assert st["metadata_mode"] == "fail"
    assert "No space left on device" in st["metadata_error"]
    assert str(rig.meta) in st["metadata_error"]
    assert fuseclone("status", rig.mnt, "--dmsetup").stdout.split()[-1] == "fail"
    human = fuseclone("status", rig.mnt).stdout
    assert "No space left on device" in human and "stopped" in human

    with open(rig.src, "rb") as src:
        assert read_uncached(rig, 0, MiB) == src.read(MiB)  # hydrated data still reads
    with pytest.raises(OSError) as info:
        write_source_bytes(rig, 0, 4096)  # even to hydrated regions
    assert info.value.errno == errno.EIO

    os.unlink(filler)  # space is back, but the live mount stays in fail mode
    refused = fuseclone("message", rig.mnt, "enable_hydration", check=False)
    assert refused.returncode == 1
    assert "metadata is in fail mode after" in refused.stderr and RESUME_HINT in refused.stderr
    assert status_json(rig.mnt)["metadata_mode"] == "fail"

    started = time.monotonic()
    waited = fuseclone("wait", rig.mnt, "--timeout", "60", check=False)
    assert waited.returncode == 1 and time.monotonic() - started < 30
    assert "No space left on device" in waited.stderr and RESUME_HINT in waited.stderr

    # The page written above was acknowledged from the kernel's cache, then refused: lost, and
    # the unmount says so.
    unmounted = fuseclone("unmount", rig.mnt, check=False)
    assert unmounted.returncode == 1
    assert "4096 bytes whose write-back failed (offset 0 +4096)" in unmounted.stderr
    rig.wait_unmounted()
    offline = status_json(rig.meta)
    assert offline["clean"] is False  # left as the last good commit, not marked clean
    assert offline["hydrated_regions"] == MiB // offline["region_size"]
    assert fuseclone("wait", rig.meta, check=False).returncode == 1  # offline: still answers

    rig.mount()
    fuseclone("wait", rig.mnt, "--timeout", "120")
    st = status_json(rig.mnt)
    assert st["metadata_mode"] == "rw" and st["metadata_error"] is None
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    fuseclone("check", rig.meta, "--src", rig.src, "--dst", rig.dst, "--verify")


def test_dst_out_of_space_stops_hydration_loudly_and_recovers(rig, random_source):
    dstfs = small_tmpfs(rig, "dstfs", "12M")  # the source holds about 22 MiB of data
    rig.dst = str(dstfs / "dst.img")
    rig.mount()

    waited = fuseclone("wait", rig.mnt, "--timeout", "120", check=False)
    assert waited.returncode == 1
    assert "hydration stopped" in waited.stderr and "No space left on device" in waited.stderr
    st = status_json(rig.mnt)
    assert "No space left on device" in st["hydration_error"] and not st["complete"]
    assert st["metadata_mode"] == "rw" and st["metadata_error"] is None
    with pytest.raises(OSError) as info:
        write_source_bytes(rig, 30 * MiB, MiB)  # the failed copies filled DST to the last page
    assert info.value.errno == errno.ENOSPC  # user I/O gets the errno

    # That write was acknowledged from the kernel's cache, then refused: lost, and said so.
    hydrate_once_space_is_back(rig, dstfs, "64M", lost="1048576 bytes whose write-back failed "
                               f"(offset {30 * MiB} +1048576)")


@pytest.mark.parametrize("trouble", ["full", "read-only"])
def test_a_meta_that_cannot_be_written_is_refused_at_mount(rig, random_source, trouble):
    metafs = small_tmpfs(rig, "metafs", "1M")
    rig.meta = str(metafs / "clone.meta")
    if trouble == "full":
        fill(metafs)
    else:
        sh("mount", "-o", "remount,ro", metafs)
    result = fuseclone("mount", rig.src, rig.dst, rig.meta, rig.mnt, check=False)
    assert result.returncode == 1
    expected = "No space left on device" if trouble == "full" else "Read-only file system"
    assert result.stderr.strip().splitlines() == [f"fuseclone: error: {rig.meta}: " + (
        f"cannot write the metadata file ({expected})" if trouble == "full" else expected)]
    assert not os.path.exists(rig.meta) and not os.path.exists(rig.dst)  # nothing left behind


def test_a_first_mount_that_cannot_write_meta_leaves_nothing_behind(rig, random_source):
    """META's filesystem with room for one block: its first header fits, the second does not.
    The failed mount removes the new DST and the new META alike: META left behind (while its
    DST was removed) refused every later mount, "destination does not exist"."""
    small = small_tmpfs(rig, "meta-fs", "1M")
    filler = fill(small)
    os.truncate(filler, os.path.getsize(filler) - 4096)
    meta = str(small / "clone.meta")
    refused = fuseclone("mount", rig.src, rig.dst, meta, rig.mnt, check=False)
    assert refused.returncode == 1 and "No space left on device" in refused.stderr, refused.stderr
    assert not os.path.exists(rig.dst) and not os.path.exists(meta)
    os.unlink(filler)
    fuseclone("mount", rig.src, rig.dst, meta, rig.mnt)
    rig.stack.callback(rig._force_unmount, rig.mnt)
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    fuseclone("check", meta, "--src", rig.src, "--dst", rig.dst, "--verify")


def _into_fail_mode_without_lost_cached_writes(rig):
    """A write-through mount whose META's filesystem fills: the next commit fails, and the
    write that needed it gets EIO at once (nothing the kernel cached is lost)."""
    metafs = small_tmpfs(rig, "metafs", "16M")
    rig.meta = str(metafs / "clone.meta")
    return metafs


def _fail_the_next_commit(rig, metafs):
    write_source_bytes(rig, 0, MiB)  # a good commit
    fill(metafs)
    with pytest.raises(OSError) as info:
        write_source_bytes(rig, 4 * MiB, MiB)
    assert info.value.errno == errno.EIO
    assert status_json(rig.mnt)["metadata_mode"] == "fail"


def test_unmount_of_a_clone_in_fail_mode_exits_1_saying_why(rig, random_source):
    """dm-clone's status says Fail; an unmount that could not make its last commit must not
    exit 0 as if all were committed (it did whenever no cached write was lost: a write-through
    mount, or a failure an fsync found first)."""
    metafs = _into_fail_mode_without_lost_cached_writes(rig)
    rig.mount("--no-hydration", "--write-cache", "0")
    _fail_the_next_commit(rig, metafs)
    unmounted = fuseclone("unmount", rig.mnt, check=False)
    rig.wait_unmounted()
    assert unmounted.returncode == 1, unmounted.stderr
    line, = unmounted.stderr.strip().splitlines()
    assert "unmounted, but" in line and "fail mode" in line, line
    assert "No space left on device" in line and "mount again" in line, line
    assert status_json(rig.meta)["clean"] is False  # the last good commit, not marked clean


def test_a_foreground_mount_stopped_in_fail_mode_exits_1_saying_why(rig, random_source):
    """A service's exit status (systemd's `Restart=on-failure`, its journal) tells a clone that
    ended without its last commit from one that ended well."""
    from tests.integration.test_fuse_ops import _foreground_mount

    metafs = _into_fail_mode_without_lost_cached_writes(rig)
    with _foreground_mount(rig, "--no-hydration", "--write-cache", "0") as proc:
        _fail_the_next_commit(rig, metafs)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        err = proc.stderr.read()
    assert proc.returncode == 1, err
    assert "fail mode" in err.strip().splitlines()[-1], err


def test_offline_status_says_the_last_mount_ended_without_its_last_commit(rig, random_source):
    """`status META` of a clone whose mount ended in fail mode showed its progress as after any
    clean unmount (only `--json` had "clean": false)."""
    metafs = _into_fail_mode_without_lost_cached_writes(rig)
    rig.mount("--no-hydration", "--write-cache", "0")
    _fail_the_next_commit(rig, metafs)
    fuseclone("unmount", rig.mnt, check=False)
    rig.wait_unmounted()
    assert "ended without its last commit" in fuseclone("status", rig.meta).stdout
    os.unlink(metafs / "filler")
    rig.mount("--no-hydration")
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    assert "ended without its last commit" not in fuseclone("status", rig.meta).stdout
