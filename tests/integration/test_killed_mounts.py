"""A mount killed (SIGKILL) at the steps no soak loop hits: while it creates DST and META, and
between the unmount and its last commit. Afterwards a second mount of the same paths resumes
(or starts the clone) and `check --verify` passes, or a command says what went wrong."""

import errno
import os
import signal
import sys
import time

import pytest

from fuseclone import control
from fuseclone.metadata import Metadata
from tests.integration.conftest import MiB, daemon_pid, fuseclone, sh

KILLED_AT = os.path.join(os.path.dirname(__file__), "killed_at.py")


def killed_at(point, *args):
    """`fuseclone ARGS` with its process (and a background mount's daemon) SIGKILLed at POINT
    (see killed_at.py)."""
    return sh(sys.executable, KILLED_AT, point, *args, check=False, timeout=120)


def write_and_check(rig):
    """Write through the mounted image, unmount, and check the clone against the source."""
    data = os.urandom(MiB)
    with open(rig.image, "r+b") as image:
        image.seek(3 * MiB)
        image.write(data)
        os.fsync(image.fileno())
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    fuseclone("check", rig.meta, "--src", rig.src, "--dst", rig.dst, "--verify")
    with open(rig.dst, "rb") as dst:
        dst.seek(3 * MiB)
        assert dst.read(MiB) == data


@pytest.mark.parametrize("point", [
    "fuseclone.destination:os.ftruncate",  # DST named, not sized yet: refused as too small
    "fuseclone.metadata:os.pwrite",  # META sized, no header yet: refused as corrupt
    "fuseclone.fuse.mount:mount_fuse",
    "fuseclone.fuse.session:Session.handshake",  # mounted, INIT unanswered: a stale mount
])
def test_a_mount_killed_before_ready_is_simply_run_again(rig, random_source, point):
    killed = killed_at(point, "mount", rig.src, rig.dst, rig.meta, rig.mnt)
    assert killed.returncode == 1 and "exited (-9)" in killed.stderr, killed.stderr
    rig.stack.callback(rig._force_unmount, rig.mnt)
    rig.mount()
    write_and_check(rig)


def test_check_tells_a_meta_whose_creation_was_cut_short(rig, random_source):
    killed = killed_at("fuseclone.metadata:os.pwrite", "mount", rig.src, rig.dst, rig.meta, rig.mnt)
    assert killed.returncode == 1 and "exited (-9)" in killed.stderr, killed.stderr
    with open(rig.meta, "rb") as meta:
        assert meta.read().strip(b"\0") == b""  # sized, no header yet: as a power cut may leave it
    checked = fuseclone("check", rig.meta, "--src", rig.src, "--dst", rig.dst, check=False)
    assert checked.returncode == 1 and "formats it as a new one" in checked.stderr


def test_unmount_says_so_when_the_mount_dies_before_its_last_commit(rig, random_source):
    """The daemon unmounts (the kernel hands over the writes it caches), then commits: killed
    in between, `unmount` said nothing and exited 0, while what was handed over had no bits in
    META and read as the source's data again."""
    started = killed_at("fuseclone.engine:CloneEngine._shutdown_commit", "mount", rig.src,
                        rig.dst, rig.meta, rig.mnt, "--no-hydration")
    assert started.returncode == 0, started.stderr
    rig.stack.callback(rig._force_unmount, rig.mnt)
    with open(rig.image, "r+b") as image:  # cached by the kernel, never flushed
        image.seek(4 * MiB)
        image.write(os.urandom(MiB))
    unmounted = fuseclone("unmount", rig.mnt, check=False)
    assert unmounted.returncode == 1, unmounted.stderr
    assert "ended without its last commit" in unmounted.stderr
    assert control.log_path(rig.meta) in unmounted.stderr
    rig.wait_unmounted()
    rig.mount()  # resumes from the commit before: consistent, whatever it lost
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    fuseclone("check", rig.meta, "--src", rig.src, "--dst", rig.dst, "--verify")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def test_a_mount_command_killed_before_ready_stops_its_daemon_in_one_line(rig, random_source):
    """Its daemon goes on, finds nobody to tell that the image is ready (the caller took the
    mount for failed), and stops, removing what it created: it did, by a BrokenPipeError's
    traceback in the log, leaving DST and META behind."""
    log_file = os.path.join(rig.tmp, "mount.log")
    killed = killed_at("--parent", "fuseclone.clone:open_clone", "mount", rig.src, rig.dst,
                       rig.meta, rig.mnt, "--log-file", log_file)
    assert killed.returncode == -9
    rig.stack.callback(rig._force_unmount, rig.mnt)
    said = "the mount command went away before the image was ready"
    # The daemon removes META before it logs why: wait for both.
    deadline = time.monotonic() + 30
    while (control.find_mount(rig.mnt) is not None or os.path.exists(rig.meta)
           or said not in _read(log_file)):
        assert time.monotonic() < deadline, ("the daemon of a killed mount command still runs",
                                             _read(log_file))
        time.sleep(0.05)
    assert not os.path.exists(rig.dst)
    text = _read(log_file)
    assert "Traceback" not in text
    rig.mount()
    write_and_check(rig)


def test_unmount_cleans_up_after_a_daemon_killed_while_unmounting(rig, random_source):
    """`unmount` said the mount closed its control connection, and to use --lazy, with the
    stale mount of the killed daemon left behind."""
    started = killed_at("fuseclone.fuse.mount:unmount", "mount", rig.src, rig.dst, rig.meta,
                        rig.mnt, "--no-hydration")
    assert started.returncode == 0, started.stderr
    rig.stack.callback(rig._force_unmount, rig.mnt)
    unmounted = fuseclone("unmount", rig.mnt, check=False)
    assert unmounted.returncode == 1, unmounted.stderr
    assert "ended while unmounting" in unmounted.stderr
    assert "stale mount was cleaned" in unmounted.stderr
    assert control.find_mount(rig.mnt) is None
    rig.mount()
    write_and_check(rig)


def test_a_killed_mount_beneath_a_loop_device_keeps_no_other_clone_from_mounting(rig, random_source):
    """A clone's image attached to a loop device (as a VM's or a filesystem's disk), then its
    daemon SIGKILLed: the loop device's backing file is now on a dead FUSE mount, and asking
    the device for its status (LOOP_GET_STATUS64, which stats that file) fails with ENOTCONN.
    Each new clone into a DST file asks every loop device whether it is over that file: every
    mount on the machine failed until the loop device was detached."""
    rig.mount()
    rig.losetup()
    os.kill(daemon_pid(rig.mnt), signal.SIGKILL)
    wait_until_dead(rig.image)
    other = rig.tmp / "other"
    other.mkdir()
    (other / "mnt").mkdir()
    mounted = fuseclone("mount", rig.src, str(other / "dst"), str(other / "meta"),
                        str(other / "mnt"), check=False)
    rig.stack.callback(rig._force_unmount, str(other / "mnt"))
    assert mounted.returncode == 0, mounted.stderr
    with open(os.path.join(other / "mnt", "image"), "rb") as image, open(rig.src, "rb") as src:
        assert image.read(MiB) == src.read(MiB)


def wait_until_dead(image, timeout=30):
    """Until a stat of IMAGE reaches the killed daemon's dead connection (ENOTCONN): the kernel
    answers from its cached attributes for up to ATTR_SECONDS after the last GETATTR."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.stat(image)
        except OSError as exc:
            assert exc.errno == errno.ENOTCONN, exc
            return
        assert time.monotonic() < deadline, "the killed mount still answers"
        time.sleep(0.05)
