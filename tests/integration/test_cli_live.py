"""The CLI against live mounts: messages, status, wait, unmount, stale mounts, and bad input
that gets one clear line, exit 1, and leaves nothing behind."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.engine.conftest import make_source_file
from tests.integration.conftest import MiB, daemon_pid, fuseclone, sh, status_json


def test_messages_apply_live(rig, random_source):
    rig.mount("--no-hydration")
    st = status_json(rig.mnt)
    assert st["hydration_enabled"] is False and "no_hydration" in st["features"]
    fuseclone("message", rig.mnt, "hydration_threshold", "64")
    fuseclone("message", rig.mnt, "hydration_batch_size", "16")
    st = status_json(rig.mnt)
    assert (st["hydration_threshold"], st["hydration_batch_size"]) == (64, 16)
    bad = fuseclone("message", rig.mnt, "hydration_threshold", "zero", check=False)
    assert bad.returncode == 1 and "whole number" in bad.stderr
    negative = fuseclone("message", rig.mnt, "hydration_threshold", "-1", check=False)
    assert negative.returncode == 1 and "from 1 to" in negative.stderr, negative.stderr
    assert fuseclone("wait", rig.mnt, "--timeout", "0.5", check=False).returncode == 1
    fuseclone("message", rig.mnt, "max_rate", "1M")
    assert status_json(rig.mnt)["max_rate"] == MiB
    assert "1.0 MiB/s" in fuseclone("status", rig.mnt).stdout
    bad_rate = fuseclone("message", rig.mnt, "max_rate", "fast", check=False)
    assert bad_rate.returncode == 1 and "not a size" in bad_rate.stderr, bad_rate.stderr
    fuseclone("message", rig.mnt, "max_rate", "0")  # unlimited again
    assert status_json(rig.mnt)["max_rate"] == 0
    fuseclone("message", rig.mnt, "enable_hydration")
    fuseclone("wait", rig.mnt, "--timeout", "60")
    line = fuseclone("status", rig.mnt, "--dmsetup").stdout.split()
    assert line[3].split("/")[0] == line[3].split("/")[1] and line[-1] == "rw"
    human = fuseclone("status", rig.meta).stdout  # META as TARGET reaches the live mount too
    assert "100.0%" in human


def test_status_json_names_the_daemon_the_mountpoint_and_the_image(rig, random_source):
    rig.mount("--no-hydration")
    live = status_json(rig.mnt)
    assert (live["pid"], live["mountpoint"], live["image"]) == (daemon_pid(rig.mnt), rig.mnt, rig.image)
    fuseclone("unmount", rig.mnt)
    offline = status_json(rig.meta)
    assert (offline["pid"], offline["mountpoint"], offline["image"]) == (None, None, None)


def test_wait_blocks_until_hydration_completes(rig, random_source):
    rig.mount("--no-hydration")
    waiter = subprocess.Popen([sys.executable, "-m", "fuseclone", "wait", rig.mnt, "--timeout", "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        if waiter.poll() is not None:
            pytest.fail(f"wait returned {waiter.returncode} while nothing was hydrating: "
                        f"{waiter.communicate()}")
        fuseclone("message", rig.mnt, "enable_hydration")
        _, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 0, err
        assert status_json(rig.mnt)["hydrated_regions"] == status_json(rig.mnt)["total_regions"]
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()


def test_wait_ends_when_the_mount_goes_away(rig, random_source):
    rig.mount("--no-hydration")
    waiter = subprocess.Popen([sys.executable, "-m", "fuseclone", "wait", rig.mnt],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        fuseclone("unmount", rig.mnt)
        _, err = waiter.communicate(timeout=30)
        assert waiter.returncode == 1
        assert "no mount is hydrating it" in err
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()


def test_unmount_refuses_while_a_loop_device_holds_the_image(rig, random_source):
    rig.mount()
    loop = rig.losetup()
    result = fuseclone("unmount", rig.mnt, check=False)
    assert result.returncode == 1
    assert f"{loop} still uses the image" in result.stderr
    assert os.path.realpath(rig.mnt) in open("/proc/mounts").read()
    sh("losetup", "-d", loop)
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()


def test_unmount_waits_for_a_loop_device_detached_while_something_has_it_open(rig, random_source):
    """`losetup -d` of a loop device that something else has open (a udev or blkid probe after
    a write) only marks it to detach at that last close: an unmount right after waits for
    it, and names the opener if it keeps the device open past the deadline."""
    rig.mount()
    loop = rig.losetup()
    opener = os.open(loop, os.O_RDONLY)
    try:
        sh("losetup", "-d", loop)
        refused = fuseclone("unmount", rig.mnt, "--timeout", "1", check=False)
        assert refused.returncode == 1
        assert refused.stderr.splitlines()[-1].startswith(
            f"fuseclone: error: {loop} still uses the image at {rig.mnt}: it is detached once "
            f"closed (losetup -d), but {os.getpid()} ("), refused.stderr
        assert os.path.realpath(rig.mnt) in open("/proc/mounts").read()
        unmount = subprocess.Popen([sys.executable, "-m", "fuseclone", "unmount", rig.mnt],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = unmount.stderr.readline()
            assert f"waiting for {loop} to detach" in first, first + unmount.stderr.read()
            os.close(opener)
            opener = None
            _, err = unmount.communicate(timeout=60)
            assert unmount.returncode == 0, err
        finally:
            if unmount.poll() is None:
                unmount.kill()
                unmount.wait()
    finally:
        if opener is not None:
            os.close(opener)
    rig.wait_unmounted()


def test_unmount_names_the_filesystem_mounted_from_the_loop_device(rig, ext4_source):
    """The walkthrough's step 4 done out of order: `losetup -d` alone does not detach a loop
    device whose filesystem is mounted, so the line says to umount that first."""
    rig.mount("--no-hydration")
    loop = rig.losetup()
    fs = rig.mount_fs(loop, str(rig.tmp / "fs"))
    result = fuseclone("unmount", rig.mnt, check=False)
    assert_refused(result, f"{loop} still uses the image at {rig.mnt}: it is mounted at {fs}: "
                           f"umount it, then detach it (losetup -d {loop})")
    sh("losetup", "-d", loop)  # only marks it to detach once unmounted
    assert_refused(fuseclone("unmount", rig.mnt, check=False), f"it is mounted at {fs}")
    sh("umount", fs)
    deadline = time.monotonic() + 10
    while loop in sh("losetup", "-a").stdout:  # autoclear detaches it once its filesystem is gone
        assert time.monotonic() < deadline
        time.sleep(0.05)
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()


def test_unmount_refuses_while_the_image_is_open(rig, random_source):
    """Like umount(8): a lazy detach would drop what the holder writes into the kernel's cache
    afterwards, so the mount stays up and keeps serving until the image is closed."""
    rig.mount("--no-hydration")
    fd = os.open(rig.image, os.O_RDWR)
    try:
        result = fuseclone("unmount", rig.mnt, check=False)
        assert result.returncode == 1
        assert f"is in use by {os.getpid()} (" in result.stderr and "--lazy" in result.stderr
        os.pwrite(fd, b"written after the refusal", 5 * MiB + 7)
    finally:
        os.close(fd)
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    with open(rig.dst, "rb") as f:
        f.seek(5 * MiB + 7)
        assert f.read(25) == b"written after the refusal"


def test_lazy_unmount_detaches_an_open_image_after_its_cached_writes(rig, random_source):
    rig.mount("--no-hydration")
    fd = os.open(rig.image, os.O_RDWR)
    try:
        os.pwrite(fd, b"cached before the detach", 3 * MiB + 5)  # in the kernel's write cache
        fuseclone("unmount", rig.mnt, "--lazy")
        rig.wait_unmounted()
        with pytest.raises(OSError):
            os.pread(fd, 4096, 9 * MiB)  # never read before: the holder's later I/O fails
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # its flush has nowhere to go
    with open(rig.dst, "rb") as f:
        f.seek(3 * MiB + 5)
        assert f.read(24) == b"cached before the detach"


def test_on_complete_hook(rig, random_source):
    marker = rig.tmp / "done"
    rig.mount("--on-complete", f"touch {marker}")
    fuseclone("wait", rig.mnt, "--timeout", "60")
    deadline = time.monotonic() + 10
    while not marker.exists():
        assert time.monotonic() < deadline, "--on-complete did not run"
        time.sleep(0.05)


def test_stale_mount_of_a_killed_daemon_is_cleaned(rig, random_source):
    rig.mount("--no-hydration")
    pid = daemon_pid(rig.mnt)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    with pytest.raises(OSError):
        os.stat(rig.image)  # ENOTCONN: the daemon is gone
    # a new mount cleans the stale one and resumes
    rig.mount()
    with open(rig.image, "rb") as f:
        assert f.read(4096) == open(rig.src, "rb").read(4096)
    fuseclone("unmount", rig.mnt)


def test_unmount_cleans_a_stale_mount(rig, random_source):
    rig.mount()
    os.kill(daemon_pid(rig.mnt), signal.SIGKILL)
    time.sleep(0.3)
    result = fuseclone("unmount", rig.mnt)
    assert "stale" in result.stderr
    rig.wait_unmounted()


# ---- bad input: one line, exit 1, nothing left on disk ---------------------------------------


def assert_refused(result, fragment, *paths_absent):
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fuseclone: error: "), result.stderr
    assert fragment in lines[0], lines[0]
    for path in paths_absent:
        assert not os.path.exists(path), f"{path} was left behind"


def test_bad_input(rig, random_source):
    r = fuseclone("mount", rig.src, rig.dst, rig.meta, str(rig.tmp / "nope"), check=False)
    assert_refused(r, "mountpoint does not exist", rig.dst, rig.meta)
    r = fuseclone("mount", str(rig.tmp / "missing.img"), rig.dst, rig.meta, rig.mnt, check=False)
    assert_refused(r, "source does not exist", rig.dst, rig.meta)
    r = fuseclone("mount", "ftp://host/x", rig.dst, rig.meta, rig.mnt, check=False)
    assert_refused(r, "unknown source URL scheme", rig.dst, rig.meta)
    r = fuseclone("mount", rig.src, rig.dst, rig.meta, rig.mnt, "--region-size", "3K", check=False)
    assert_refused(r, "power of two", rig.dst, rig.meta)
    small = str(rig.tmp / "small.img")
    with open(small, "wb") as f:
        f.truncate(1 * MiB)
    r = fuseclone("mount", rig.src, small, rig.meta, rig.mnt, check=False)
    assert_refused(r, "smaller than the source", rig.meta)
    assert os.path.getsize(small) == 1 * MiB
    garbage = str(rig.tmp / "garbage.meta")
    with open(garbage, "wb") as f:
        f.write(os.urandom(16384))
    r = fuseclone("mount", rig.src, rig.dst, garbage, rig.mnt, check=False)
    assert_refused(r, "not a fuseclone metadata file", rig.dst)


def test_a_missing_directory_is_told_as_such(rig, random_source):
    """A new META (or DST) in a directory that does not exist: the file cannot be created,
    which is what the line says (not that the metadata file does not exist, as if it had to)."""
    r = fuseclone("mount", rig.src, rig.dst, str(rig.tmp / "no" / "clone.meta"), rig.mnt, check=False)
    assert_refused(r, "cannot create metadata file: No such file or directory", rig.dst)
    r = fuseclone("mount", rig.src, str(rig.tmp / "no" / "dst.img"), rig.meta, rig.mnt, check=False)
    assert_refused(r, "cannot create destination: No such file or directory", rig.meta)
    r = fuseclone("mount", rig.src, rig.dst, rig.meta, rig.mnt,
                  "--record-access", str(rig.tmp / "no" / "x.trace"), check=False)
    assert_refused(r, f"({rig.tmp / 'no'} does not exist)", rig.dst, rig.meta)


def test_the_meta_of_another_clone_is_told_as_such(rig, random_source):
    """A META that belongs to another clone is named as that, whatever else is wrong with the
    DST given beside it, and nothing is created or changed."""
    rig.mount("--no-hydration")
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    before = open(rig.meta, "rb").read()
    other_src = str(rig.tmp / "other-src.img")
    make_source_file(other_src, 64 * MiB, seed=12)
    new_dst = str(rig.tmp / "new-dst.img")
    # Another source with the first clone's DST: not "DST is smaller than the source".
    r = fuseclone("mount", other_src, rig.dst, rig.meta, rig.mnt, check=False)
    assert_refused(r, "belongs to another clone")
    # Another source and a new DST: not "DST does not exist".
    r = fuseclone("mount", other_src, new_dst, rig.meta, rig.mnt, check=False)
    assert_refused(r, "belongs to another clone", new_dst)
    # The same source and a new DST: the line names the DST this META belongs to.
    r = fuseclone("mount", rig.src, new_dst, rig.meta, rig.mnt, check=False)
    assert_refused(r, f"is the metadata of a clone into {os.path.realpath(rig.dst)}", new_dst)
    assert open(rig.meta, "rb").read() == before


def test_second_mount_of_the_same_meta_is_refused(rig, random_source):
    rig.mount()
    other = str(rig.tmp / "mnt2")
    os.mkdir(other)
    r = fuseclone("mount", rig.src, rig.dst, rig.meta, other, check=False)
    assert_refused(r, "in use by another fuseclone process")


def test_a_live_clones_destination_is_not_called_a_metadata_file_in_use(rig, random_source):
    """A live clone holds its DST's lock as well as META's: naming DST where META belongs is
    told as what it is, not as a metadata file some process uses."""
    rig.mount("--no-hydration")
    r = fuseclone("status", rig.dst, check=False)
    assert r.returncode == 1 and "not a fuseclone metadata file" in r.stderr, r.stderr
    assert "metadata file is in use" not in r.stderr
    fuseclone("unmount", rig.mnt)


def test_busy_mountpoint_is_refused(rig, random_source):
    rig.mount()
    r = fuseclone("mount", rig.src, str(rig.tmp / "d2"), str(rig.tmp / "m2"), rig.mnt, check=False)
    assert_refused(r, "mountpoint is busy", str(rig.tmp / "d2"), str(rig.tmp / "m2"))


def test_a_background_mount_logs_to_one_bounded_file_per_clone(rig, random_source):
    from fuseclone import control

    rig.mount("--no-hydration")  # a new clone's log takes META's name once META exists
    log = control.log_path(rig.meta)
    assert status_json(rig.mnt)["log_file"] == log
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    with open(log, "wb") as f:  # an earlier mount's log, grown past the bound
        f.write(b"old line\n" * (control.DEFAULT_LOG_MAX // 9 + 1))
    rig.mount("--no-hydration")
    st = status_json(rig.mnt)
    assert st["log_file"] == log
    assert ["log", log] in [line.split() for line in fuseclone("status", rig.mnt).stdout.splitlines()]
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    assert os.path.getsize(log + ".1") > control.DEFAULT_LOG_MAX  # renamed, not appended to
    first = open(log).read()
    assert "old line" not in first and rig.mnt in first
    rig.mount("--no-hydration")  # the next mount of this clone appends to the same file
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    assert open(log).read().startswith(first) and len(open(log).read()) > len(first)
    assert not [name for name in os.listdir(control.RUNTIME_DIR) if name.startswith("mount-")]


def test_a_refused_mount_of_a_live_clones_meta_leaves_its_log_in_place(rig, random_source):
    from fuseclone import control

    rig.mount("--no-hydration")
    log = control.log_path(rig.meta)
    with open(log, "ab") as f:  # the live mount's log, grown past the bound
        f.write(b"old line\n" * (control.DEFAULT_LOG_MAX // 9 + 1))
    other = str(rig.tmp / "mnt-2")
    os.mkdir(other)
    r = fuseclone("mount", rig.src, rig.dst, rig.meta, other, check=False)
    assert r.returncode == 1 and "in use" in r.stderr
    assert not os.path.exists(log + ".1")  # the live mount's log did not move under it
    assert os.path.getsize(log) > control.DEFAULT_LOG_MAX
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()


def test_a_background_mount_keeps_no_descriptor_of_its_caller(rig, random_source):
    """A detached daemon that kept its caller's descriptors would hold their locks (a caller's
    `flock LOCK fuseclone mount ...` stayed locked for the life of the mount) and pipes open."""
    lock = os.open(rig.tmp / "caller.lock", os.O_RDWR | os.O_CREAT)
    try:
        subprocess.run([sys.executable, "-m", "fuseclone", "mount", rig.src, rig.dst, rig.meta,
                        rig.mnt, "--no-hydration"], check=True, pass_fds=(lock,), timeout=60)
        rig.stack.callback(rig._force_unmount, rig.mnt)
        pid = daemon_pid(rig.mnt)
        held = {os.path.realpath(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert str(rig.tmp / "caller.lock") not in held
    finally:
        os.close(lock)


def test_status_names_src_and_dst_by_absolute_paths(rig, random_source):
    """A mount made with relative paths: status and list are read from anywhere."""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    sh(sys.executable, "-m", "fuseclone", "mount", "src.img", "dst.img", "clone.meta", "mnt",
       "--no-hydration", cwd=rig.tmp, env=env)
    rig.stack.callback(rig._force_unmount, rig.mnt)
    st = status_json(rig.mnt)
    assert (st["source"], st["destination"]) == (rig.src, rig.dst)


def test_status_counts_a_partial_last_region_by_its_own_bytes(rig):
    """The last region of a 3 MiB + 100 B image holds 100 bytes: read first (a partition
    tool reads the backup GPT at the end), status said '1.0 MiB of 3.0 MiB' hydrated."""
    make_source_file(rig.src, 3 * MiB + 100, seed=3)
    rig.mount("--region-size", "1M", "--no-hydration")
    with open(rig.image, "rb") as image:
        image.seek(-10, os.SEEK_END)
        image.read()  # copy-on-read hydrates the last region alone
    for target in (rig.mnt, rig.meta):
        assert status_json(target)["hydrated_image_bytes"] == 100
        assert " 100 B of 3.0 MiB" in fuseclone("status", target).stdout.splitlines()[0]
        if target == rig.mnt:
            fuseclone("unmount", rig.mnt)


def test_offline_status_shows_the_settings_of_the_last_mount(rig, random_source):
    """META's features and core args are the last mount's, as a message records them: a
    resumed mount's options replaced them in that mount but not in META, so offline status
    said hydration was disabled after a mount that hydrated."""
    rig.mount("--no-hydration", "--no-discard-passdown", "--hydration-threshold", "100")
    fuseclone("unmount", rig.mnt)
    rig.mount("--hydration-threshold", "200", "--no-copy-on-read")
    live = status_json(rig.mnt)
    fuseclone("unmount", rig.mnt)
    offline = status_json(rig.meta)
    for name in ("features", "hydration_enabled", "hydration_threshold", "hydration_batch_size"):
        assert offline[name] == live[name], name
    assert (offline["features"], offline["hydration_threshold"]) == (["no_copy_on_read"], 200)


def test_a_command_given_the_image_names_its_mountpoint_without_looking_inside(rig, random_source):
    """The image's path (what mount prints) as TARGET: it was read as a META ("not a fuseclone
    metadata file"), and with the daemon stopped its stat waited for it forever."""
    rig.mount("--no-hydration")
    pid = daemon_pid(rig.mnt)
    os.kill(pid, signal.SIGSTOP)
    try:
        for command, hint in (
                (["status", rig.image], "name that mountpoint, or the clone's META"),
                (["wait", rig.image], "name that mountpoint, or the clone's META"),
                (["message", rig.image, "enable_hydration"], "name that mountpoint, or the clone's META"),
                (["unmount", rig.image], "unmount that mountpoint"),
                (["check", rig.image], "a clone's mount holds its image alone, never a META"),
                (["diff", rig.image], "a clone's mount holds its image alone, never a META")):
            result = fuseclone(*command, check=False, timeout=20)
            assert result.returncode == 1
            assert result.stderr == (f"fuseclone: error: {rig.image} lies inside the clone mounted at "
                                     f"{rig.mnt}: {hint}\n")
    finally:
        os.kill(pid, signal.SIGCONT)
    fuseclone("unmount", rig.mnt)


def test_unmount_of_a_clone_not_complete_says_that_dst_is_not_a_whole_copy(rig, random_source):
    """The walkthrough's switch to DST alone (unmount, then mount DST) takes a partly hydrated
    DST for the image if `wait` did not end with 0 first: the unmount itself, which ends a
    clone whatever its progress (mounting again resumes it), says so; exit 0 as before."""
    rig.mount("--no-hydration")
    paused = fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    assert "not complete" in paused.stderr and "/8192 regions" in paused.stderr, paused.stderr
    rig.mount()
    fuseclone("wait", rig.mnt, "--timeout", "120")
    done = fuseclone("unmount", rig.mnt)
    assert done.stderr == ""
