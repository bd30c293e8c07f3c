"""Who may open the image, and what a user other than root can do with fuseclone: real mounts,
with the other user's commands run as user nobody (setpriv).

The image is like a device node of DST: its owner, group and mode are DST's, so a chmod or
chown of DST decides who may open it; --allow-other only lifts FUSE's rule that nobody but the
mounting user may use the mount at all."""

import contextlib
import json
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
from tests.integration.conftest import MiB, Rig, fuseclone, sh, status_json

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


# ---- a user other than root -------------------------------------------------------------------


def one_line_error(result):
    """The CLI's answer to a user's mistake: exit 1 and one line, no traceback."""
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fuseclone: error: "), result.stderr
    return lines[0]


def nobody_env(runtime_dir):
    """What a user's shell would have: its own XDG_RUNTIME_DIR, not the tests' runtime dir."""
    env = {k: v for k, v in os.environ.items() if k != "FUSECLONE_RUNTIME_DIR"}
    env["XDG_RUNTIME_DIR"] = str(runtime_dir)
    return env


@pytest.fixture
def nobody_home(public_rig):
    """A directory of nobody's own (holding a 0700 XDG_RUNTIME_DIR), the rig's files readable."""
    home = pathlib.Path(public_rig.tmp) / "home"
    run = home / "run"
    run.mkdir(parents=True)
    run.chmod(0o700)
    for path in (home, run, public_rig.mnt):
        os.chown(path, NOBODY, NOBODY)
    return home


def fuseclone_as_nobody(home, *args, ns=None, env=None, timeout=120):
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            sys.executable, "-m", "fuseclone", *map(str, args)]
    if ns is not None:  # a command in that mount namespace
        argv = ["nsenter", f"--target={ns.pid}", "--mount", f"--wd={os.getcwd()}", "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=env or nobody_env(home / "run"))


# Binds the node over /dev/fuse, then lets go of the namespace's copies of mounts that come and
# go (other clones, filesystems on loop devices): holding them would keep them alive after their
# owners unmount them, and their daemons serving.
NAMESPACE_HOLDER = r"""
mount --bind "$1" /dev/fuse || exit 1
awk '$3 ~ /^fuse/ || $1 ~ /^\/dev\/loop/ {print $2}' /proc/self/mounts | while read -r m; do
    umount -l "$(printf '%b' "$m")" 2>/dev/null
done
echo ready
exec sleep 3600
"""


@contextlib.contextmanager
def fuse_device_for_users(workdir, mode):
    """A mount namespace whose /dev/fuse has `mode`: most distributions make it 0666 so that
    users can mount FUSE through fusermount3 (this machine's is 0600: root only). Everything
    mounted in it is detached when the test ends, which ends a daemon still serving there."""
    node = os.path.join(workdir, "fuse")
    os.mknod(node, stat.S_IFCHR | mode, os.makedev(10, 229))
    os.chmod(node, mode)
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               NAMESPACE_HOLDER, "sh", node], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n", "cannot make a mount namespace"
        yield holder
    finally:
        inside = ["nsenter", f"--target={holder.pid}", "--mount", "--"]
        mounts = sh(*inside, "cat", "/proc/self/mounts", check=False).stdout.splitlines()
        for line in mounts:
            if line.split()[1].startswith(os.path.realpath(workdir) + "/"):
                sh(*inside, "umount", "-l", line.split()[1], check=False)
        holder.kill()
        holder.wait()
        os.unlink(node)


def nobody_can_run_fuseclone(home):
    r = fuseclone_as_nobody(home, "--version", timeout=60)
    if r.returncode:
        pytest.skip(f"user nobody cannot run this Python or read this checkout: {r.stderr.strip()}")


@pytest.fixture
def nobodys_clone(public_rig, nobody_home):
    """nobody's SRC (readable), and DST, META and mountpoint in nobody's directory."""
    nobody_can_run_fuseclone(nobody_home)
    rig = public_rig
    make_source_file(rig.src, SIZE, seed=5)
    os.chmod(rig.src, 0o644)
    rig.dst = str(nobody_home / "dst.img")
    rig.meta = str(nobody_home / "clone.meta")
    return rig


def test_a_user_mounts_reads_and_unmounts_its_own_clone(nobodys_clone, nobody_home):
    rig = nobodys_clone
    with fuse_device_for_users(rig.tmp, 0o666) as ns:
        r = fuseclone_as_nobody(nobody_home, "mount", rig.src, rig.dst, rig.meta, rig.mnt, ns=ns)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == rig.image
        r = sh("nsenter", f"--target={ns.pid}", "--mount", "--", "setpriv", f"--reuid={NOBODY}",
               f"--regid={NOBODY}", "--clear-groups", "cmp", rig.src, rig.image, check=False)
        assert r.returncode == 0, r.stderr
        r = fuseclone_as_nobody(nobody_home, "status", rig.mnt, "--json", ns=ns)
        assert r.returncode == 0, r.stderr
        assert '"live": true' in r.stdout
        # its control socket and default log are in its own runtime directory
        own = nobody_home / "run" / "fuseclone"
        assert stat.S_IMODE(own.stat().st_mode) == 0o700 and own.stat().st_uid == NOBODY
        assert [p.suffix for p in own.iterdir()].count(".sock") == 1
        r = fuseclone_as_nobody(nobody_home, "unmount", rig.mnt, ns=ns)
        assert r.returncode == 0, r.stderr
        assert not [p for p in own.iterdir() if p.suffix == ".sock"]
        assert os.stat(rig.dst).st_uid == NOBODY


def test_a_user_gets_one_line_when_it_may_not_mount(nobodys_clone, nobody_home):
    rig = nobodys_clone
    with fuse_device_for_users(rig.tmp, 0o600) as ns:  # /dev/fuse for root only
        r = fuseclone_as_nobody(nobody_home, "mount", rig.src, rig.dst, rig.meta, rig.mnt, ns=ns)
        assert "/dev/fuse" in one_line_error(r)
    if "user_allow_other" not in [line.strip() for line in open("/etc/fuse.conf")]:
        with fuse_device_for_users(rig.tmp, 0o666) as ns:
            r = fuseclone_as_nobody(nobody_home, "mount", rig.src, rig.dst, rig.meta, rig.mnt,
                                    "--allow-other", ns=ns)
            assert "user_allow_other" in one_line_error(r)
    r = fuseclone_as_nobody(nobody_home, "mount", rig.src, rig.dst, rig.meta, rig.mnt,
                            "--log-file", "/proc/no-log-here")
    assert "/proc/no-log-here" in one_line_error(r)
    assert not os.path.exists(rig.dst) and not os.path.exists(rig.meta)  # nothing left


@pytest.mark.parametrize("runtime_dir", ["its own", "the tests'"])
def test_a_user_gets_one_line_for_roots_mount(public_rig, nobody_home, runtime_dir):
    nobody_can_run_fuseclone(nobody_home)
    rig = public_rig
    make_source_file(rig.src, SIZE, seed=6)
    rig.mount("--allow-other")
    env = nobody_env(nobody_home / "run") if runtime_dir == "its own" else None
    if env is None:
        env = dict(os.environ, XDG_RUNTIME_DIR=str(nobody_home / "run"))
    linked_meta = rig.meta + ".link"  # another name of META: found by identity, not by path
    os.link(rig.meta, linked_meta)
    for target in (rig.mnt, rig.meta, linked_meta):
        for command in (["status"], ["status", "--json"], ["message", "disable_hydration"],
                        ["wait", "--timeout", "1"]):
            r = fuseclone_as_nobody(nobody_home, command[0], target, *command[1:], env=env)
            assert "belongs to another user" in one_line_error(r), command
    r = fuseclone_as_nobody(nobody_home, "unmount", rig.mnt, env=env)
    assert "belongs to another user" in one_line_error(r)
    assert status_json(rig.mnt)["hydration_enabled"]  # the message did not get through
    fuseclone("unmount", rig.mnt)


def test_a_users_list_names_roots_clone_and_its_metrics_leave_it_out(public_rig, nobody_home):
    nobody_can_run_fuseclone(nobody_home)
    rig = public_rig
    make_source_file(rig.src, SIZE, seed=6)
    rig.mount()
    r = fuseclone_as_nobody(nobody_home, "list", "--json")
    assert r.returncode == 0, r.stderr
    mine = [clone for clone in json.loads(r.stdout) if clone["metadata"] == rig.meta]
    assert [clone["state"] for clone in mine] == ["another user's mount (uid 0): run as that user"]
    r = fuseclone_as_nobody(nobody_home, "metrics")
    assert r.returncode == 0, r.stderr
    assert rig.meta not in r.stdout and "# TYPE fuseclone_up gauge" in r.stdout
    fuseclone("unmount", rig.mnt)
