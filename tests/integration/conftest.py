"""Real mounts through the `fuseclone` command, as a user runs it. Every fixture tears down what
it made (filesystems, loop devices, fuseclone mounts, nbdkit) even when the test fails."""

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.engine.conftest import make_source_file

MiB = 1 << 20


def sh(*args, check=True, **kw):
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(map(str, args))} -> {result.returncode}: "
                             f"{result.stderr.strip()}{_tail_of_named_log(result.stderr)}")
    return result


def _tail_of_named_log(stderr: str, lines: int = 40) -> str:
    """The end of the log a failed command's message names ("see LOG"): a mount that exited
    before it was ready says why only there, and the test run's directory is gone after it."""
    named = re.search(r"see (/\S+\.log)", stderr)
    if named is None:
        return ""
    try:
        with open(named.group(1), errors="replace") as log:
            tail = log.readlines()[-lines:]
    except OSError:
        return ""
    return f"\n--- last {len(tail)} lines of {named.group(1)} ---\n" + "".join(tail)


def fuseclone(*args, check=True, timeout=120):
    return sh(sys.executable, "-m", "fuseclone", *args, check=check, timeout=timeout)


def sha256(path, length=None):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = length
        while remaining is None or remaining > 0:
            chunk = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return h.hexdigest()


def status_json(target):
    return json.loads(fuseclone("status", target, "--json").stdout)


def assert_secret_absent(secret: str, rig, status: dict) -> None:
    """Not in META, `status --json`, the daemon's log or its command line."""
    assert secret.encode() not in open(rig.meta, "rb").read()
    assert secret not in json.dumps(status)
    assert secret not in fuseclone("status", rig.mnt, "--json").stdout
    log_file = status.get("log_file")
    assert log_file and os.path.exists(log_file)
    assert secret not in open(log_file, errors="replace").read()
    pid = daemon_pid(rig.mnt)
    assert secret.encode() not in open(f"/proc/{pid}/cmdline", "rb").read()


def daemon_pid(mnt: str) -> int:
    from fuseclone import control

    reply = control.request(control.resolve_target(mnt), {"op": "status"})
    return reply["pid"]


class Rig:
    """One clone's paths plus cleanup of everything attached to them."""

    def __init__(self, tmp_path, stack):
        self.tmp = tmp_path
        self.stack = stack
        self.src = str(tmp_path / "src.img")
        self.dst = str(tmp_path / "dst.img")
        self.meta = str(tmp_path / "clone.meta")
        self.mnt = str(tmp_path / "mnt")
        os.mkdir(self.mnt)

    @property
    def image(self):
        return os.path.join(self.mnt, "image")

    def mount(self, *options, src=None):
        result = fuseclone("mount", src or self.src, self.dst, self.meta, self.mnt, *options)
        self.stack.callback(self._force_unmount, self.mnt)
        return result.stdout.strip()

    def _force_unmount(self, mnt):
        if mnt in open("/proc/mounts").read():
            fuseclone("unmount", mnt, check=False)
        if os.path.realpath(mnt) in open("/proc/mounts").read():
            sh("umount", "-l", mnt, check=False)

    def losetup(self, path=None, *flags):
        loop = sh("losetup", "-f", "--show", *flags, path or self.image).stdout.strip()
        self.stack.callback(lambda: sh("losetup", "-d", loop, check=False))
        return loop

    def mount_fs(self, device, where, *options):
        os.makedirs(where, exist_ok=True)
        sh("mount", *options, device, where)
        self.stack.callback(lambda: sh("umount", where, check=False))
        return where

    def ext4(self, name="fs", size="64M"):
        """A new ext4 of SIZE on a loop device of its own (one fsfreeze may freeze), mounted at
        a directory NAME; returns that directory."""
        image = self.tmp / f"{name}.img"
        sh("truncate", "-s", size, image)
        sh("mkfs.ext4", "-q", image)
        return self.mount_fs(image, str(self.tmp / name), "-o", "loop")

    def wait_unmounted(self, timeout=30):
        deadline = time.monotonic() + timeout
        while os.path.realpath(self.mnt) in open("/proc/mounts").read():
            assert time.monotonic() < deadline, "still mounted"
            time.sleep(0.05)


@pytest.fixture
def rig(tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    with contextlib.ExitStack() as stack:
        yield Rig(tmp_path, stack)


@pytest.fixture
def ext4_source(rig):
    """A 64 MiB ext4 image holding a few files; returns {name: sha256}."""
    files = rig.tmp / "files"
    files.mkdir()
    sums = {}
    for i, size in enumerate([8 * MiB, 3 * MiB, 100_000, 4096]):
        data = os.urandom(size)
        (files / f"f{i}.bin").write_bytes(data)
        sums[f"f{i}.bin"] = hashlib.sha256(data).hexdigest()
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", files, "-E", "nodiscard", rig.src, "64M")
    return sums


@pytest.fixture
def random_source(rig):
    make_source_file(rig.src, 32 * MiB, seed=11)
    return rig.src
