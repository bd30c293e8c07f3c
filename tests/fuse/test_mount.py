"""Finding a mount's device in mountinfo, without touching the mount."""

import pytest

from fuseclone.fuse.mount import (CoveredError, check_clone_on_top, mount_device, mount_entries,
                                  top_mount)

MOUNTINFO = """\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 0:39 / /tmp/a\\040b rw,nosuid,nodev,relatime shared:2 - fuse.fuseclone fuseclone:/m rw,user_id=0
41 22 0:40 / /tmp/other rw,nosuid,nodev - fuse.sshfs host: rw
42 40 0:41 / /tmp/a\\040b rw,nosuid,nodev,relatime shared:3 - fuse.fuseclone fuseclone:/n rw,user_id=0
43 22 0:42 / /tmp/opt rw shared:4 opt:x - fuse.fuseclone fuseclone:/o rw
44 43 0:43 / /tmp/opt rw - tmpfs tmpfs rw
"""


def test_mount_device_reads_mountinfo(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    assert mount_device("/tmp/a b", str(info)) == "0:41"  # escaped path; the top of a stack
    assert mount_device("/tmp/opt", str(info)) == "0:42"  # optional fields before "-"
    assert mount_device("/tmp/other", str(info)) is None  # not fuseclone's
    assert mount_device("/tmp/none", str(info)) is None


def test_the_top_of_a_stack_is_what_an_unmount_would_reach(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    assert top_mount("/tmp/a b", str(info)).mount_id == 42
    assert top_mount("/tmp/opt", str(info)).fstype == "tmpfs"  # mounted over the clone
    assert top_mount("/tmp/none", str(info)) is None
    check_clone_on_top("/tmp/a b", 42, str(info))
    check_clone_on_top("/tmp/none", 7, str(info))  # nothing there: the unmount says so
    with pytest.raises(CoveredError, match=r"^/tmp/opt: another filesystem \(tmpfs\)"):
        check_clone_on_top("/tmp/opt", None, str(info))
    with pytest.raises(CoveredError):  # a clone mounted there after ours was detached
        check_clone_on_top("/tmp/a b", 40, str(info))


def test_mount_entries_give_each_mounts_source_and_own_options(tmp_path):
    """What `fuse_mounts` (the mounting user) and `mountpoints_of` (a loop device's
    filesystems) read: the fields after the "-", wherever the optional fields end."""
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    entries = {entry.mount_id: entry for entry in mount_entries(str(info))}
    assert (entries[22].source, entries[22].options) == ("/dev/vda", "rw")
    assert (entries[40].source, entries[40].options) == ("fuseclone:/m", "rw,user_id=0")
    assert (entries[43].fstype, entries[43].source) == ("fuse.fuseclone", "fuseclone:/o")
    assert [entry.mount_id for entry in mount_entries(str(info))] == [22, 40, 41, 42, 43, 44]
