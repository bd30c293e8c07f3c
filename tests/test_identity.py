"""identity: what a path refers to, and whether two refer to the same thing (SPEC invariant 8)."""

import os
import stat

import pytest

from fuseclone import identity
from fuseclone.errors import OverlapError
from fuseclone.identity import (backing_files, check_distinct, conflict, describe, inside,
                                same_recorded_identity)


def touch(path, data=b"x"):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def test_one_file_under_other_names(tmp_path):
    src = touch(tmp_path / "src.img")
    os.link(src, tmp_path / "hard")
    os.symlink(src, tmp_path / "soft")
    os.mkdir(tmp_path / "d")
    for other in ("hard", "soft", "d/../src.img"):
        reason = conflict(describe("source", src), describe("destination", str(tmp_path / other)))
        assert reason == f"destination {tmp_path / other} is the same file as source {src}"


def test_different_files_are_different_things(tmp_path):
    a, b = touch(tmp_path / "a", b"same"), touch(tmp_path / "b", b"same")
    assert conflict(describe("source", a), describe("destination", b)) is None


def test_files_to_be_created_compare_by_directory_and_name(tmp_path):
    os.mkdir(tmp_path / "real")
    os.symlink(tmp_path / "real", tmp_path / "alias")
    dst = describe("destination", str(tmp_path / "alias" / "new"))
    meta = describe("metadata", str(tmp_path / "real" / "new"))
    assert conflict(dst, meta) == f"metadata {tmp_path / 'real' / 'new'} is the same path as destination {tmp_path / 'alias' / 'new'}"
    assert conflict(dst, describe("metadata", str(tmp_path / "real" / "other"))) is None


def test_dangling_symlink_is_where_the_file_would_be_created(tmp_path):
    os.symlink(tmp_path / "target", tmp_path / "link")
    assert conflict(describe("destination", str(tmp_path / "link")),
                    describe("metadata", str(tmp_path / "target"))) is not None


def test_a_path_through_a_file_is_no_error_here(tmp_path):
    meta = touch(tmp_path / "meta")
    assert conflict(describe("destination", str(tmp_path / "meta" / "x")), describe("metadata", meta)) is None


def test_inside_the_mountpoint(tmp_path):
    mnt = tmp_path / "mnt"
    os.makedirs(mnt / "sub")
    os.symlink(mnt / "sub", tmp_path / "way-in")
    mountpoint = describe("mountpoint", str(mnt))
    for path in (mnt / "dst", mnt / "sub" / "meta", tmp_path / "way-in" / "meta", mnt / "gone" / "x"):
        assert inside(describe("metadata", str(path)), mountpoint) is not None, path
    assert inside(describe("metadata", str(tmp_path / "meta")), mountpoint) is None


def test_check_distinct_raises_one_line(tmp_path):
    src = touch(tmp_path / "src.img")
    with pytest.raises(OverlapError, match="^destination .* is the same file as source .*: SRC, DST, META"):
        check_distinct(source=src, destination=src, metadata=str(tmp_path / "meta"))
    file_mountpoint = touch(tmp_path / "mnt")
    with pytest.raises(OverlapError, match="mountpoint .* is the same file as metadata"):
        check_distinct(source=src, destination=str(tmp_path / "dst"), metadata=file_mountpoint,
                       mountpoint=file_mountpoint)
    os.mkdir(tmp_path / "mnt-dir")
    check_distinct(source=src, destination=str(tmp_path / "dst"), metadata=str(tmp_path / "meta"),
                   mountpoint=str(tmp_path / "mnt-dir"))


def test_a_loop_device_recorded_before_its_backing_file_was_matches_by_its_name():
    now = {"kind": "blockdev", "path": "/dev/loop3", "backing_inode": 12, "backing_offset": 0}
    assert same_recorded_identity({"kind": "blockdev", "path": "/dev/loop3"}, now)
    assert same_recorded_identity(dict(now), now)
    assert not same_recorded_identity({**now, "backing_inode": 13}, now)
    assert not same_recorded_identity({**now, "backing_offset": 4096}, now)
    assert not same_recorded_identity({"kind": "blockdev", "path": "/dev/loop4"}, now)
    assert not same_recorded_identity(None, now)


def test_a_remote_source_has_no_local_identity(tmp_path):
    os.mkdir(tmp_path / "nbd:")
    lookalike = touch(tmp_path / "nbd:" / "x")  # a URL that is also a path takes no part
    check_distinct(source=f"nbd://{lookalike}", destination=lookalike, metadata=str(tmp_path / "m"))
    with pytest.raises(OverlapError, match="metadata .* is the same file as destination"):
        check_distinct(source="http://example.invalid/x", destination=lookalike, metadata=lookalike)


# ---- block devices, on a sysfs made for the test -------------------------------------------
# The test kernel has no partition tables or device mapper, so these stacks are built as sysfs
# would show them: a loop device "fakeloop" backed by a file, with two partitions, and a
# device-mapper-like "fakedm" whose slave is the first partition.

LOOP, PART1, PART2, DM = (os.makedev(4000, n) for n in (0, 1, 2, 3))


@pytest.fixture
def devices(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    backing = touch(tmp_path / "backing.img")
    block = tmp_path / "sys" / "devices" / "virtual" / "block"
    loop = block / "fakeloop"
    for d, rdev in ((loop, LOOP), (loop / "fakeloop1", PART1), (loop / "fakeloop2", PART2),
                    (block / "fakedm", DM)):
        os.makedirs(d)
        (d / "dev").write_text(f"{os.major(rdev)}:{os.minor(rdev)}\n")
    (loop / "loop").mkdir()
    (loop / "loop" / "backing_file").write_text(backing + "\n")
    for part in ("fakeloop1", "fakeloop2"):
        (loop / part / "partition").write_text("1\n")
    (block / "fakedm" / "slaves").mkdir()
    os.symlink(loop / "fakeloop1", block / "fakedm" / "slaves" / "fakeloop1")
    by_dev = tmp_path / "sys" / "dev" / "block"
    by_dev.mkdir(parents=True)
    nodes = {}
    for name, d, rdev in (("loop", loop, LOOP), ("part1", loop / "fakeloop1", PART1),
                          ("part2", loop / "fakeloop2", PART2), ("dm", block / "fakedm", DM)):
        os.symlink(d, by_dev / f"{os.major(rdev)}:{os.minor(rdev)}")
        nodes[name] = str(tmp_path / f"node-{name}")
        os.mknod(nodes[name], stat.S_IFBLK | 0o600, rdev)
    monkeypatch.setattr(identity, "SYS_DEV_BLOCK", str(by_dev))
    nodes["backing"] = backing
    return nodes


def test_loop_device_and_its_partitions_are_backed_by_its_file(devices):
    backing = describe("source", devices["backing"])
    for name in ("loop", "part1", "dm"):
        assert conflict(backing, describe("destination", devices[name])) == \
            f"destination {devices[name]} is backed by source {devices['backing']}"


def test_partitions_of_one_disk_are_different_things(devices):
    part1, part2 = describe("source", devices["part1"]), describe("destination", devices["part2"])
    assert conflict(part1, part2) is None
    assert conflict(describe("source", devices["loop"]), part2) is not None  # the whole disk
    dm = describe("destination", devices["dm"])
    assert conflict(part1, dm) == f"destination {devices['dm']} is backed by source {devices['part1']}"
    assert conflict(part2, dm) is not None  # both on the same loop device's file: refused to be safe


def test_two_nodes_of_one_device_are_the_same_device(devices, tmp_path):
    twin = str(tmp_path / "twin")
    os.mknod(twin, stat.S_IFBLK | 0o600, PART1)
    assert conflict(describe("source", devices["part1"]), describe("destination", twin)) == \
        f"destination {twin} is the same device as source {devices['part1']}"


def test_the_files_beneath_a_block_device(devices):
    for name in ("loop", "part1", "part2", "dm"):
        assert backing_files(os.stat(devices[name]).st_rdev) == [devices["backing"]]
    assert backing_files(os.stat(devices["backing"]).st_dev) == []  # a disk with no loop beneath
