"""SRC, DST, META and the mountpoint are four different things, and a DST serves one clone at a
time (SPEC invariants 8 and 9): every way of naming one of them twice is refused with one line,
exit 1, nothing created and the source unchanged."""

import os
import time

import pytest

from tests.integration.conftest import fuseclone, sha256


def mount_refused(rig, src, dst, meta, mnt, *options, expect):
    """Run a mount that must be refused; clean up if it was not."""
    existed = {path: os.path.exists(path) for path in (dst, meta)}
    before = sha256(rig.src)
    rig.stack.callback(rig._force_unmount, mnt)
    result = fuseclone("mount", src, dst, meta, mnt, "--no-hydration", *options, check=False)
    assert result.returncode == 1, f"mount was accepted: {result.stdout}{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], result.stderr
    for path, was in existed.items():
        assert os.path.exists(path) == was, f"{path} was created by a refused mount"
    assert sha256(rig.src) == before
    return lines[0]


def test_same_path_for_source_and_destination(rig, random_source):
    mount_refused(rig, rig.src, rig.src, rig.meta, rig.mnt,
                  expect=f"destination {rig.src} is the same file as source {rig.src}")


def test_hard_link_symlink_and_dotdot_of_the_source(rig, random_source):
    link, sym = str(rig.tmp / "link.img"), str(rig.tmp / "sym.img")
    os.link(rig.src, link)
    os.symlink(rig.src, sym)
    dotdot = os.path.join(rig.mnt, "..", "src.img")
    for dst in (link, sym, dotdot):
        mount_refused(rig, rig.src, dst, rig.meta, rig.mnt, expect="is the same file as source")


def test_loop_device_of_the_source_as_destination(rig, random_source):
    loop = rig.losetup(rig.src)
    mount_refused(rig, rig.src, loop, rig.meta, rig.mnt,
                  expect=f"destination {loop} is backed by source {rig.src}")
    # and the other way round: a loop device of DST as the source
    make_file(rig.dst, os.path.getsize(rig.src))
    loop = rig.losetup(rig.dst)
    mount_refused(rig, loop, rig.dst, rig.meta, rig.mnt,
                  expect=f"source {loop} is backed by destination {rig.dst}")


def test_loop_device_of_a_source_whose_first_name_is_gone(rig, random_source):
    loop = rig.losetup(rig.src)
    other_name = str(rig.tmp / "other-name.img")
    os.link(rig.src, other_name)
    os.unlink(rig.src)  # sysfs now shows "src.img (deleted)": only the inode still tells
    rig.src = other_name
    mount_refused(rig, other_name, loop, rig.meta, rig.mnt,
                  expect=f"destination {loop} is backed by source {other_name}")


def test_metadata_is_the_destination_or_the_source(rig, random_source):
    mount_refused(rig, rig.src, rig.dst, rig.dst, rig.mnt,
                  expect=f"metadata {rig.dst} is the same path as destination {rig.dst}")
    mount_refused(rig, rig.src, rig.dst, rig.src, rig.mnt,
                  expect=f"metadata {rig.src} is the same file as source {rig.src}")
    make_file(rig.dst, os.path.getsize(rig.src))
    mount_refused(rig, rig.src, rig.dst, rig.dst, rig.mnt,
                  expect=f"metadata {rig.dst} is the same file as destination {rig.dst}")


@pytest.mark.parametrize("which", ["source", "destination", "metadata"])
def test_regular_file_mountpoint_that_is_another_of_the_four(rig, random_source, which):
    make_file(rig.dst, os.path.getsize(rig.src))
    make_file(rig.meta, 0)
    target = {"source": rig.src, "destination": rig.dst, "metadata": rig.meta}[which]
    hidden = str(rig.tmp / "hard-link")
    os.link(target, hidden)  # the same file under another name
    before = sha256(target)
    mount_refused(rig, rig.src, rig.dst, rig.meta, hidden,
                  expect=f"mountpoint {hidden} is the same file as {which} {target}")
    assert sha256(target) == before


def test_destination_or_metadata_inside_the_mountpoint(rig, random_source):
    os.mkdir(os.path.join(rig.mnt, "sub"))
    inner_dst = os.path.join(rig.mnt, "dst.img")
    mount_refused(rig, rig.src, inner_dst, rig.meta, rig.mnt,
                  expect=f"destination {inner_dst} is inside the mountpoint {rig.mnt}")
    inner_meta = os.path.join(rig.mnt, "sub", "clone.meta")
    mount_refused(rig, rig.src, rig.dst, inner_meta, rig.mnt,
                  expect=f"metadata {inner_meta} is inside the mountpoint {rig.mnt}")


def test_two_clones_on_one_destination(rig, random_source):
    rig.mount("--no-hydration")
    meta_b, mnt_b = str(rig.tmp / "b.meta"), str(rig.tmp / "mnt-b")
    os.mkdir(mnt_b)
    mount_refused(rig, rig.src, rig.dst, meta_b, mnt_b,
                  expect=f"{rig.dst}: destination is in use by another clone")
    live_check = fuseclone("check", rig.meta, "--src", rig.src, "--dst", rig.dst, "--verify", check=False)
    assert live_check.returncode == 1 and "in use" in live_check.stderr  # refused clearly, as before
    with open(rig.image, "r+b") as image:  # the first clone is unharmed
        image.write(b"A" * 4096)
        os.fsync(image.fileno())
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    rig.mount("--no-hydration")  # the lock went with the first clone


def test_two_clones_on_one_block_device_through_two_nodes(rig, random_source):
    make_file(rig.dst, os.path.getsize(rig.src))
    loop = rig.losetup(rig.dst)
    twin = str(rig.tmp / "twin")
    rdev = os.stat(loop).st_rdev
    os.mknod(twin, 0o600 | 0o060000, rdev)  # S_IFBLK: the same device under another node
    mnt_a, mnt_b = str(rig.tmp / "mnt-a"), str(rig.tmp / "mnt-b")
    os.mkdir(mnt_a)
    os.mkdir(mnt_b)
    rig.stack.callback(rig._force_unmount, mnt_a)
    fuseclone("mount", rig.src, loop, rig.meta, mnt_a, "--no-hydration")
    mount_refused(rig, rig.src, twin, str(rig.tmp / "b.meta"), mnt_b,
                  expect=f"{twin}: destination is in use")
    fuseclone("unmount", mnt_a)


def make_file(path, size):
    with open(path, "wb") as f:
        f.truncate(size)



def test_an_access_trace_may_not_be_one_of_the_four(rig, random_source):
    """--record-access truncates its file: naming SRC, DST or META there would destroy it, and a
    failed mount must not remove a file it did not create."""
    rig.mount("--no-hydration")
    fuseclone("unmount", rig.mnt)
    kept = {path: sha256(path) for path in (rig.src, rig.dst, rig.meta)}
    for path in kept:
        mount_refused(rig, rig.src, rig.dst, rig.meta, rig.mnt, "--record-access", path,
                      expect=f"access trace {path} is the same file as")
        assert {p: sha256(p) for p in kept} == kept
    mount_refused(rig, rig.src, rig.dst, rig.meta, rig.mnt, "--record-access",
                  os.path.join(rig.mnt, "trace"), expect="is inside the mountpoint")
    # A mount that fails for another reason leaves an existing file alone.
    other = rig.tmp / "notes.txt"
    other.write_text("mine")
    mount_refused(rig, rig.src, rig.src, rig.meta, rig.mnt, "--record-access", str(other),
                  expect="is the same file as")
    assert other.read_text() == "mine"


def test_a_log_file_may_not_be_one_of_the_four(rig, random_source):
    """The log is appended to: --log-file naming SRC, DST or META would write log lines into
    them, so it is refused before the log is opened, and nothing changes."""
    rig.mount("--no-hydration")
    fuseclone("unmount", rig.mnt)
    kept = {path: sha256(path) for path in (rig.src, rig.dst, rig.meta)}
    for path in kept:
        for mode in ((), ("--foreground",)):
            mount_refused(rig, rig.src, rig.dst, rig.meta, rig.mnt, "--log-file", path, *mode,
                          expect=f"log file {path} is the same file as")
            assert {p: sha256(p) for p in kept} == kept
    mount_refused(rig, rig.src, rig.dst, rig.meta, rig.mnt, "--log-file",
                  os.path.join(rig.mnt, "log"), expect="is inside the mountpoint")
    trace = str(rig.tmp / "trace")
    mount_refused(rig, rig.src, rig.dst, rig.meta, rig.mnt, "--record-access", trace,
                  "--log-file", trace, expect="the log file must be a file of its own")
