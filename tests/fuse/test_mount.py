"""Finding a mount's device in mountinfo, without touching the mount."""

from fuseclone.fuse.mount import mount_device

MOUNTINFO = """\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 0:39 / /tmp/a\\040b rw,nosuid,nodev,relatime shared:2 - fuse.fuseclone fuseclone:/m rw,user_id=0
41 22 0:40 / /tmp/other rw,nosuid,nodev - fuse.sshfs host: rw
42 40 0:41 / /tmp/a\\040b rw,nosuid,nodev,relatime shared:3 - fuse.fuseclone fuseclone:/n rw,user_id=0
43 22 0:42 / /tmp/opt rw shared:4 opt:x - fuse.fuseclone fuseclone:/o rw
"""


def test_mount_device_reads_mountinfo(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    assert mount_device("/tmp/a b", str(info)) == "0:41"  # escaped path; the top of a stack
    assert mount_device("/tmp/opt", str(info)) == "0:42"  # optional fields before "-"
    assert mount_device("/tmp/other", str(info)) is None  # not fuseclone's
    assert mount_device("/tmp/none", str(info)) is None
