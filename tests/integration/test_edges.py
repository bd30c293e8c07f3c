"""Edges a user reaches by doing something unusual to a live clone's files: whatever happens,
the clone never ends up claiming data it does not have."""

import errno
import json
import mmap
import os
import shutil
import signal
import time

import pytest

from fuseclone.trace import read_trace
from tests.engine.conftest import make_source_file
from tests.integration.conftest import MiB, daemon_pid, fuseclone, sh, status_json
from tests.integration.test_metadata_failure import hydrate_once_space_is_back, small_tmpfs
from tests.integration.test_stopping import wait_gone


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


def live_status(mnt, timeout=30):
    """The mount's live `status --json` in fail mode, once its control socket answers by MNT."""
    deadline = time.monotonic() + timeout
    while True:
        answer = fuseclone("status", mnt, "--json", check=False)
        st = json.loads(answer.stdout) if answer.returncode == 0 else {}
        if st.get("live") and st["metadata_mode"] == "fail":
            return st
        assert time.monotonic() < deadline, f"no live status: {answer.stderr}"
        time.sleep(0.1)


def write_and_fsync(path, data, offset):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("how, write_after", [("deleted", True), ("replaced", True),
                                              ("deleted", False)])
def test_meta_removed_under_a_live_clone_is_written_again_and_the_clone_resumes(
        rig, random_source, how, write_after):
    rig.mount("--no-hydration")
    kept = os.urandom(MiB)
    write_and_fsync(rig.image, kept, 0)  # committed in META before it goes
    if how == "deleted":
        os.unlink(rig.meta)
    else:
        other = rig.tmp / "other.meta"
        other.write_bytes(b"not this clone's")
        os.rename(other, rig.meta)

    if write_after:
        with pytest.raises(OSError) as info:  # no commit into a file nobody will find again
            write_and_fsync(rig.image, os.urandom(4096), 8 * MiB)
        assert info.value.errno == errno.EIO
    st = live_status(rig.mnt)  # the mount stays reachable by its mountpoint
    assert st["metadata_mode"] == "fail" and f"{rig.meta} was {how}" in st["metadata_error"]
    unmounted = fuseclone("unmount", rig.mnt, check=False)  # without its last commit: says so
    rig.wait_unmounted()
    assert unmounted.returncode == 1 and f"{rig.meta} was {how}" in unmounted.stderr

    saved = rig.meta if how == "deleted" else rig.meta + ".saved"
    assert f"written again at {saved}" in st["metadata_error"]
    if how == "replaced":
        assert open(rig.meta, "rb").read() == b"not this clone's"  # not ours to overwrite
        os.rename(saved, rig.meta)
    rig.mount("--no-hydration")
    with open(rig.image, "rb") as image:
        assert image.read(MiB) == kept
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    fuseclone("check", rig.meta, "--src", rig.src, "--dst", rig.dst, "--verify")


def test_meta_truncated_under_a_live_clone_is_never_taken_for_less_hydrated(rig):
    """META cut short while mounted (`: > META`): its bitmaps are gone, and a later commit (of
    a user's write near the image's end) made the file whole again, zeros where they were.
    The next mount took the regions users had written for unhydrated, and hydration copied
    the source over their flushed writes. Now the mount goes to fail mode, writes META no
    more, and the next mount refuses the short file."""
    size = 256 * MiB  # two blocks of hydrated bits: a write at the end rewrites only the last
    with open(rig.src, "wb") as f:
        f.truncate(size)
    rig.mount("--no-hydration")
    kept = b"flushed" * 585 + b"!"
    write_and_fsync(rig.image, kept, 100 * 4096)
    os.truncate(rig.meta, 0)
    try:
        write_and_fsync(rig.image, os.urandom(4096), size - 4096)
    except OSError as exc:  # refused once the cut is seen
        assert exc.errno == errno.EIO
    st = status_json(rig.mnt)  # seen before the write's commit, which it refused
    assert st["metadata_mode"] == "fail" and "truncated" in st["metadata_error"], st
    fuseclone("unmount", rig.mnt, check=False)
    rig.wait_unmounted()
    again = fuseclone("mount", rig.src, rig.dst, rig.meta, rig.mnt, "--no-hydration",
                      check=False)
    assert again.returncode == 1, "a META that lost its bitmaps was resumed"
    with open(rig.dst, "rb") as dst:
        dst.seek(100 * 4096)
        assert dst.read(4096) == kept


@pytest.mark.parametrize("zeroed", ["whole file", "first blocks"])
def test_meta_zeroed_under_a_live_clone_is_never_taken_for_less_hydrated(rig, zeroed):
    """META written over with zeros while mounted (`dd if=/dev/zero of=META conv=notrunc`):
    its size stays, so the truncation check saw nothing, and the mount committed on into it;
    its last header write (the unmount's) made the file valid again, zeros for the bitmap
    blocks no commit rewrote, which read as never written. The next mount took the regions
    users had written for unhydrated, and copy-on-read copied the source over their flushed
    writes. Now the mount sees that META's header is not the one it wrote, goes to fail mode,
    writes META no more, and the next mount refuses the zeroed file."""
    size = 256 * MiB  # two blocks of hydrated bits: a write at the end rewrites only the last
    with open(rig.src, "wb") as f:
        f.write(os.urandom(MiB))
        f.truncate(size)
    rig.mount("--no-hydration")
    kept = b"flushed" * 585 + b"!"
    write_and_fsync(rig.image, kept, 100 * 4096)
    # `dd if=/dev/zero of=META bs=4k count=3 conv=notrunc`: both header slots, the first
    # bitmap block's first copy
    length = os.path.getsize(rig.meta) if zeroed == "whole file" else 3 * 4096
    with open(rig.meta, "r+b") as meta:
        meta.write(bytes(length))
        os.fsync(meta.fileno())
    try:
        write_and_fsync(rig.image, os.urandom(4096), size - 4096)
    except OSError as exc:  # refused once the overwrite is seen
        assert exc.errno == errno.EIO
    st = status_json(rig.mnt)
    assert st["metadata_mode"] == "fail" and "overwritten" in st["metadata_error"], st
    unmounted = fuseclone("unmount", rig.mnt, check=False)
    rig.wait_unmounted()
    assert unmounted.returncode == 1 and "fail mode" in unmounted.stderr, unmounted.stderr
    again = fuseclone("mount", rig.src, rig.dst, rig.meta, rig.mnt, "--no-hydration",
                      check=False)
    if again.returncode == 0:
        with open(rig.image, "rb") as image:
            image.seek(100 * 4096)
            assert image.read(4096) == kept, "a META that lost its bitmaps was resumed"
    with open(rig.dst, "rb") as dst:
        dst.seek(100 * 4096)
        assert dst.read(4096) == kept
    assert again.returncode == 1, "a META that lost its bitmaps was resumed"


def test_a_meta_renamed_under_a_live_clone_keeps_the_mount_reachable(rig, random_source):
    rig.mount("--no-hydration")
    kept = os.urandom(MiB)
    write_and_fsync(rig.image, kept, 0)
    moved = str(rig.tmp / "moved.meta")
    os.rename(rig.meta, moved)  # META keeps its inode: the mount commits on into it

    deadline = time.monotonic() + 30
    while fuseclone("status", rig.mnt, "--json", check=False).returncode:
        assert time.monotonic() < deadline, "the mount is out of reach by its mountpoint"
        time.sleep(0.1)
    write_and_fsync(rig.image, kept, 4 * MiB)
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    assert status_json(moved)["clean"]
    rig.meta = moved
    rig.mount("--no-hydration")
    with open(rig.image, "rb") as image:
        assert image.read(MiB) == kept
        image.seek(4 * MiB)
        assert image.read(MiB) == kept


def test_reading_a_clone_whose_dst_is_full_logs_why_once_not_per_read(rig):
    make_source_file(rig.src, 64 * MiB, seed=5, zero_every=0, hole_every=0)
    dstfs = small_tmpfs(rig, "dstfs", "8M")
    rig.dst = str(dstfs / "dst.img")
    log_file = rig.tmp / "clone.log"
    rig.mount("--no-hydration", "--log-file", log_file)
    with open(rig.image, "rb") as image, open(rig.src, "rb") as src:
        while chunk := image.read(MiB):  # copy-on-read and readahead find DST full
            assert chunk == src.read(MiB)

    failures = [line for line in open(log_file) if "No space left on device" in line]
    assert 0 < len(failures) <= 40, f"{len(failures)} lines"
    st = status_json(rig.mnt)
    assert "No space left on device" in st["hydration_error"]

    hydrate_once_space_is_back(rig, dstfs, "128M")


def test_a_full_access_trace_stops_recording_and_never_fails_a_read(rig, random_source):
    tracefs = small_tmpfs(rig, "tracefs", "4k")  # room for a few dozen records
    trace = tracefs / "trace"
    log_file = rig.tmp / "clone.log"
    rig.mount("--no-hydration", "--record-access", trace, "--log-file", log_file)
    buffer = mmap.mmap(-1, 4096)
    fd = os.open(rig.image, os.O_RDONLY | os.O_DIRECT)  # each read reaches the mount
    try:
        with open(rig.src, "rb") as src:
            for offset in range(0, 32 * MiB, 64 * 1024):  # 512 first reads, 512 records
                os.preadv(fd, [buffer], offset)
                src.seek(offset)
                assert buffer[:] == src.read(4096)
    finally:
        os.close(fd)
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()

    said = [line for line in open(log_file) if str(trace) in line]
    assert len(said) == 1 and "No space left on device" in said[0] and "stopped" in said[0]
    recorded = read_trace(str(trace))  # whole lines only: good to prefetch from
    assert not recorded.complete and 0 < len(recorded.records) < 512


def test_unmount_never_stops_another_mount_that_took_the_meta_path(rig, random_source):
    rig.mount("--no-hydration")
    os.rename(rig.meta, rig.tmp / "moved.meta")  # and a new clone is made at META's path
    other_mnt = rig.tmp / "other"
    other_mnt.mkdir()
    fuseclone("mount", rig.src, rig.tmp / "other.img", rig.meta, other_mnt, "--no-hydration")
    rig.stack.callback(rig._force_unmount, str(other_mnt))

    fuseclone("unmount", rig.mnt)  # by the first mount's own daemon, found by its device
    rig.wait_unmounted()
    assert f" {other_mnt} " in open("/proc/mounts").read()  # the other one was not stopped
    assert status_json(rig.tmp / "moved.meta")["clean"]
    fuseclone("unmount", other_mnt)


@pytest.mark.parametrize("change", ["written", "grown"])
def test_a_source_file_changed_between_mounts_is_refused_as_changed_not_as_another_clone(
        rig, random_source, change):
    """The clone's own SRC, written or grown since it was last mounted, cannot resume the
    clone (its hydrated regions hold the earlier version): refused in one line that says the
    source changed and what moved, not that META belongs to another clone (it does not: the
    user would go looking for the right META), and nothing changes."""
    rig.mount("--no-hydration")
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    with open(rig.src, "r+b") as f:
        f.seek(5 * MiB if change == "written" else 0, os.SEEK_SET if change == "written" else 2)
        f.write(b"x")
    meta_before = open(rig.meta, "rb").read()
    result = fuseclone("mount", rig.src, rig.dst, rig.meta, rig.mnt, check=False)
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"{rig.src}: the source changed since the clone began" in lines[0], lines[0]
    assert ("mtime_ns" if change == "written" else "size") in lines[0]
    assert "another clone" not in lines[0]
    assert open(rig.meta, "rb").read() == meta_before


def _another_clone_at_the_moved_metas_path(rig, *options):
    """META of the mount at rig.mnt moved away, and a new clone made at its path and mounted:
    the first mount's fsname names the new clone's META now. Returns (its mountpoint, its
    DST, the moved META)."""
    moved = str(rig.tmp / "moved.meta")
    os.rename(rig.meta, moved)
    other_mnt = str(rig.tmp / "other")
    os.mkdir(other_mnt)
    other_dst = str(rig.tmp / "other.img")
    fuseclone("mount", rig.src, other_dst, rig.meta, other_mnt, *options)
    rig.stack.callback(rig._force_unmount, other_mnt)
    return other_mnt, other_dst, moved


def test_commands_of_a_mountpoint_never_reach_the_clone_made_at_its_moved_metas_path(
        rig, random_source):
    """`wait` of the first mountpoint exited 0 once the new clone was complete, the first
    having hydrated nothing (a switch to its DST then took a part for the whole); `status`
    and `list` showed the new clone's progress, DST and image for it, and `message` changed
    the new clone's settings. Each reaches the first mount's own daemon now."""
    rig.mount("--no-hydration")
    other_mnt, other_dst, moved = _another_clone_at_the_moved_metas_path(rig)
    fuseclone("wait", other_mnt, "--timeout", "60")

    waited = fuseclone("wait", rig.mnt, "--timeout", "1", check=False)
    assert waited.returncode == 1, "the other clone's completion, taken for the first's"
    st = status_json(rig.mnt)
    assert (st["mountpoint"], st["destination"], st["complete"]) == (rig.mnt, rig.dst, False)
    fuseclone("message", rig.mnt, "hydration_batch_size", "7")
    assert status_json(rig.mnt)["hydration_batch_size"] == 7
    assert status_json(other_mnt)["hydration_batch_size"] != 7
    rows = {row["mountpoint"]: row for row in json.loads(fuseclone("list", "--json").stdout)}
    assert rows[rig.mnt]["destination"] == rig.dst and rows[rig.mnt]["state"] == "idle"
    assert rows[other_mnt]["destination"] == other_dst

    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    assert status_json(moved)["clean"] and f" {other_mnt} " in open("/proc/mounts").read()
    fuseclone("unmount", other_mnt)


def test_a_killed_clone_made_at_a_moved_metas_path_is_not_the_first_mounts_stale_daemon(
        rig, random_source):
    """That new clone's daemon killed: `unmount` of the first mountpoint took the dead daemon
    at META's path for the first mount's, and detached the live first mount lazily as a
    stale one, a loop device still on its image. It is refused as busy, like any unmount of a
    mount in use."""
    rig.mount("--no-hydration")
    other_mnt, _, _ = _another_clone_at_the_moved_metas_path(rig, "--no-hydration")
    loop = rig.losetup()
    killed = daemon_pid(other_mnt)
    os.kill(killed, signal.SIGKILL)
    wait_gone(killed)

    refused = fuseclone("unmount", rig.mnt, "--timeout", "1", check=False)
    assert refused.returncode == 1 and "still uses the image" in refused.stderr, refused.stderr
    assert "stale" not in refused.stderr
    assert f" {rig.mnt} " in open("/proc/mounts").read()
    sh("losetup", "-d", loop)
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    cleaned = fuseclone("unmount", other_mnt, check=False)
    assert "stale" in cleaned.stderr


def test_unmount_takes_a_meta_file_as_the_other_commands_do(rig, random_source):
    """README: `status`, `message`, `wait` and `unmount` take a mountpoint or a META file;
    `unmount META` said "not a fuseclone mountpoint". A moved META's new name reaches its
    mount too."""
    rig.mount("--no-hydration")
    fuseclone("unmount", rig.meta)
    rig.wait_unmounted()
    rig.mount("--no-hydration")
    moved = str(rig.tmp / "moved.meta")
    os.rename(rig.meta, moved)
    fuseclone("unmount", moved)
    rig.wait_unmounted()
    assert status_json(moved)["clean"]
