"""Who may open the image, and what a user other than root can do with fuseclone: real mounts,
with the other user's commands run as user nobody (setpriv).

The image is like a device node of DST: its owner, group and mode are DST's, so a chmod or
chown of DST decides who may open it; --allow-other only lifts FUSE's rule that nobody but the
mounting user may use the mount at all."""

import contextlib
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from tests.engine.conftest import make_source_file
from tests.integration.conftest import MiB, Rig, fuseclone, sh

NOBODY = 65534
SIZE = 4 * MiB
ATTRIBUTES_SEEN_WITHIN = 30.0  # seconds: generous, the machine is shared


def as_nobody(*argv, env=None, timeout=60):
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           *map(str, argv)], capture_output=True, text=True, env=env, timeout=timeout)


def nobody_can_read(path):
    r = as_nobody("dd", f"if={path}", "of=/dev/null", "bs=4096", "count=1")
    assert r.returncode == 0 or "Permission denied" in r.stderr, r.stderr
    return r.returncode == 0


def nobody_can_write(path):
    # O_WRONLY without O_TRUNC: opens for writing, writes nothing
    r = as_nobody("dd", "if=/dev/null", f"of={path}", "conv=notrunc", "count=0")
    assert r.returncode == 0 or "Permission denied" in r.stderr, r.stderr
    return r.returncode == 0


def eventually(check, timeout=ATTRIBUTES_SEEN_WITHIN):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{check} still false after {timeout} s"
        time.sleep(0.2)


@pytest.fixture
def public_rig(rig):
    """A rig in a directory every user may traverse (pytest's tmp_path is 0700)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    path = tempfile.mkdtemp(prefix="fc-perms-")
    os.chmod(path, 0o755)
    rig.stack.callback(shutil.rmtree, path, ignore_errors=True)
    return Rig(pathlib.Path(path), rig.stack)  # unmounted first: the stack runs backwards


def make_dst(rig, mode):
    with open(rig.dst, "wb") as f:
        f.truncate(SIZE)
    os.chmod(rig.dst, mode)


def test_other_users_get_what_dsts_mode_and_owner_allow(public_rig):
    rig = public_rig
    make_source_file(rig.src, SIZE, seed=3)
    make_dst(rig, 0o600)
    rig.mount("--allow-other")
    st = os.stat(rig.image)
    assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (0, 0)
    assert not nobody_can_read(rig.image) and not nobody_can_write(rig.image)

    os.chmod(rig.dst, 0o644)  # seen without a remount
    eventually(lambda: nobody_can_read(rig.image))
    assert not nobody_can_write(rig.image)

    os.chown(rig.dst, NOBODY, NOBODY)
    eventually(lambda: nobody_can_write(rig.image))
    st = os.stat(rig.image)
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    fuseclone("unmount", rig.mnt)


def test_chmod_and_chown_of_the_image_go_to_dst(public_rig):
    rig = public_rig
    make_source_file(rig.src, SIZE, seed=4)
    make_dst(rig, 0o600)
    rig.mount("--allow-other")
    os.chmod(rig.image, 0o640)
    assert stat.S_IMODE(os.stat(rig.dst).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(rig.image).st_mode) == 0o640
    os.chown(rig.image, NOBODY, -1)
    assert os.stat(rig.dst).st_uid == NOBODY and os.stat(rig.image).st_uid == NOBODY
    with pytest.raises(PermissionError):  # the image is a disk, not a program
        os.chmod(rig.image, 0o4755)
    assert stat.S_IMODE(os.stat(rig.dst).st_mode) == 0o640
    # only the owner (now nobody) may chmod, and only root may chown: the kernel checks
    r = as_nobody("chown", "0", rig.image)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r
    r = as_nobody("chmod", "0604", rig.image)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(rig.dst).st_mode) == 0o604
    fuseclone("unmount", rig.mnt)
