"""What a path refers to, and whether two paths refer to the same thing (SPEC invariant 8).

SRC, DST, META and the mountpoint must be four different things, and path strings cannot tell:
a symlink, a hard link, `..`, a second device node or a loop device all reach the same storage
under another name. So each path is resolved to identities and those are compared:

* a file or directory is its (st_dev, st_ino);
* a block device is its dev_t, and beneath it lies what holds its data: a partition's whole
  disk, a loop device's backing file (by inode, from LOOP_GET_STATUS64, since the path in sysfs
  may be stale, and by that path), a device-mapper or md device's slaves, recursively;
* a file still to be created is its parent directory's (st_dev, st_ino) plus its name.

Nothing here opens anything for writing; a loop device is opened read-only for its status.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
from dataclasses import dataclass, field

from .errors import OverlapError
from .sources import is_remote

log = logging.getLogger(__name__)

# Identity keys: ("inode", st_dev, st_ino), ("bdev", dev_t), ("entry", st_dev, st_ino, name)
# for a missing file in an existing directory, ("path", realpath) when even that is unknown.
Key = tuple

LOOP_GET_STATUS64 = 0x4C05
# struct loop_info64 (linux/loop.h) begins with lo_device, lo_inode, lo_rdevice, lo_offset
# (all __u64).
_LOOP_INFO64_SIZE = 232
_LOOP_INFO64_HEAD = struct.Struct("=QQQQ")
# What a recorded identity of a loop device adds to its name (see loop_identity).
LOOP_IDENTITY_KEYS = ("backing_inode", "backing_offset")
SYS_DEV_BLOCK = "/sys/dev/block"  # a block device's sysfs directory, by "major:minor"
SYS_BLOCK = "/sys/block"  # every whole block device, by name
_MAX_DEPTH = 8  # block devices stacked deeper than this are not followed further
_FOUR_THINGS = "SRC, DST, META and MOUNTPOINT must be four different things"
_OF_ITS_OWN = "the {role} must be a file of its own"
_WRITTEN_FILES = ("access trace", "log file")  # files the mount writes to (it truncates a trace)
# What the mount opens while it is mounted: beneath the mountpoint, it would look inside its own
# mount instead (a local SRC missing at mount is dialled again; headers are re-read on 401/403).
_HIDDEN_BY_THE_MOUNT = ("source", "destination", "metadata", "header file", *_WRITTEN_FILES)


@dataclass(frozen=True)
class Thing:
    """One of the paths a clone is given, resolved."""

    role: str  # "source", "destination", "metadata", "mountpoint", "access trace", "log file"
    path: str  # as the user gave it
    key: Key
    beneath: frozenset[Key] = frozenset()  # what holds its data (disks, backing files)
    disk: Key | None = None  # a partition's whole disk
    directories: frozenset[Key] = field(default=frozenset(), compare=False)  # every directory it is in

    def __str__(self) -> str:
        return f"{self.role} {self.path}"


def describe(role: str, path: str) -> Thing:
    """What `path` refers to, following symlinks. A missing file is described by where it
    would be created."""
    real = os.path.realpath(path)
    directories = _directories_holding(real)
    try:
        st = os.stat(path)
    except OSError:  # missing (or not ours to see): opening it later says which
        return Thing(role, path, _missing_key(real), directories=directories)
    if stat.S_ISBLK(st.st_mode):
        beneath, disk, _ = _beneath_block_device(st.st_rdev, _MAX_DEPTH)
        return Thing(role, path, ("bdev", st.st_rdev), beneath, disk, directories)
    return Thing(role, path, ("inode", st.st_dev, st.st_ino), directories=directories)


def conflict(a: Thing, b: Thing) -> str | None:
    """Why `a` and `b` are not two different things, or None if they are."""
    if a.key == b.key:
        what = {"inode": "file", "bdev": "device"}.get(a.key[0], "path")
        return f"{b} is the same {what} as {a}"
    if a.key in b.beneath:
        return f"{b} is backed by {a}"
    if b.key in a.beneath:
        return f"{a} is backed by {b}"
    if a.disk is not None and a.disk == b.disk:
        return None  # two partitions of one disk do not overlap
    if a.beneath & b.beneath:
        return f"{a} and {b} are backed by the same storage"
    return None


def inside(thing: Thing, mountpoint: Thing) -> str | None:
    """Why `thing` would be hidden by a mount on `mountpoint` (it lies under that directory),
    or None."""
    if mountpoint.key in thing.directories:
        return f"{thing} is inside the mountpoint {mountpoint.path}, which the image's mount would hide"
    return None


def check_distinct(*, source: str | None, destination: str | None, metadata: str | None,
                   mountpoint: str | None = None, access_trace: str | None = None,
                   log_file: str | None = None, prefetch: str | None = None,
                   header_file: str | None = None) -> None:
    """Refuse (OverlapError) unless the given paths are different things, none backed by
    another, and DST, META and the files the mount writes (the access trace of --record-access,
    which it truncates; the log file, which it appends to), a local SRC and the header file
    (both may be opened again while mounted) are not inside the mountpoint. The files the
    mount only reads (the --prefetch trace, the --http-header-file) take part so that neither
    is written as one of those. A remote source, and any path given as None, takes no part."""
    things = [describe(role, path) for role, path in (
        ("source", None if source is None or is_remote(source) else source),
        ("destination", destination), ("metadata", metadata), ("mountpoint", mountpoint),
        ("access trace", access_trace), ("log file", log_file), ("prefetch trace", prefetch),
        ("header file", header_file))
        if path is not None]
    for i, a in enumerate(things):
        for b in things[i + 1:]:
            reason = conflict(a, b)
            if reason:
                raise OverlapError(f"{reason}: {_rule_for(a, b)}")
    for mount in (t for t in things if t.role == "mountpoint"):
        for thing in (t for t in things if t.role in _HIDDEN_BY_THE_MOUNT):
            reason = inside(thing, mount)
            if reason:
                raise OverlapError(reason)


def _rule_for(a: Thing, b: Thing) -> str:
    """The rule two conflicting things break: a written file's own, else the four things'."""
    written = next((t.role for t in (b, a) if t.role in _WRITTEN_FILES), None)
    return _OF_ITS_OWN.format(role=written) if written else _FOUR_THINGS


def backing_files(rdev: int) -> list[str]:
    """The regular files that hold block device `rdev`'s data: the backing files of the loop
    devices beneath it (itself, a partition's disk, device-mapper slaves), by the path sysfs
    shows, each only if that path is still the file the loop device reports (where it can be
    asked)."""
    return sorted(_beneath_block_device(rdev, _MAX_DEPTH)[2])


def loop_backing_file(sysfs_dir: str) -> str | None:
    """The path the kernel shows for a loop device's backing file (" (deleted)" removed), or
    None when the block device in `sysfs_dir` (e.g. /sys/block/loop0) is no bound loop device."""
    try:
        with open(os.path.join(sysfs_dir, "loop", "backing_file")) as f:
            backing = f.read().rstrip("\n")
    except OSError:
        return None
    return backing.removesuffix(" (deleted)") or None


# ---- helpers -------------------------------------------------------------------------------


def _missing_key(real: str) -> Key:
    parent, name = os.path.split(real)
    try:
        st = os.stat(parent)
    except OSError:
        return ("path", real)  # creating it will fail; the open says why
    return ("entry", st.st_dev, st.st_ino, name)


def _directories_holding(real: str) -> frozenset[Key]:
    keys = set()
    parent = os.path.dirname(real)
    while True:
        try:
            st = os.stat(parent)
        except OSError:
            pass  # a missing parent: its own parents still count
        else:
            keys.add(("inode", st.st_dev, st.st_ino))
        if parent == os.path.dirname(parent):
            return frozenset(keys)
        parent = os.path.dirname(parent)


def _beneath_block_device(rdev: int, depth: int) -> tuple[frozenset[Key], Key | None, set[str]]:
    """What holds the data of block device `rdev`, its whole disk if it is a partition, and the
    paths of the loop backing files among them."""
    sysfs = _sysfs_dir(rdev)
    if sysfs is None or depth <= 0:
        return frozenset(), None, set()
    keys: set[Key] = set()
    files: set[str] = set()
    disk = None

    def add_beneath(beneath_rdev: int) -> None:
        deeper_keys, _, deeper_files = _beneath_block_device(beneath_rdev, depth - 1)
        keys.update(deeper_keys)
        files.update(deeper_files)

    if os.path.exists(os.path.join(sysfs, "partition")):
        disk_rdev = sysfs_dev(os.path.dirname(sysfs))
        if disk_rdev is not None:
            disk = ("bdev", disk_rdev)
            keys.add(disk)
            add_beneath(disk_rdev)
    backing_keys, backing_file = _loop_backing(sysfs, rdev)
    if backing_file is not None:
        files.add(backing_file)
    for backing in backing_keys:
        keys.add(backing)
        if backing[0] == "bdev":
            add_beneath(backing[1])
    for slave in _slaves(sysfs):
        keys.add(("bdev", slave))
        add_beneath(slave)
    return frozenset(keys), disk, files


def _sysfs_dir(rdev: int) -> str | None:
    path = os.path.join(SYS_DEV_BLOCK, f"{os.major(rdev)}:{os.minor(rdev)}")
    return os.path.realpath(path) if os.path.exists(path) else None


def sysfs_dev(sysfs: str) -> int | None:
    try:
        with open(os.path.join(sysfs, "dev")) as f:
            major, minor = f.read().strip().split(":")
    except (OSError, ValueError):
        return None
    return os.makedev(int(major), int(minor))


def _slaves(sysfs: str) -> list[int]:
    try:
        names = os.listdir(os.path.join(sysfs, "slaves"))
    except OSError:
        return []
    found = (sysfs_dev(os.path.join(sysfs, "slaves", name)) for name in names)
    return [rdev for rdev in found if rdev is not None]


def _loop_backing(sysfs: str, rdev: int) -> tuple[set[Key], str | None]:
    """The backing file of a loop device: by the path sysfs shows (renamed or deleted files
    leave it stale) and by the inode the device itself reports; and that path, if it is a
    regular file and (where the device can be asked) still the one it reports."""
    path = loop_backing_file(sysfs)
    if path is None:
        return set(), None
    keys: set[Key] = set()
    by_path = None
    try:
        st = os.stat(path)
    except OSError:
        pass
    else:
        by_path = ("bdev", st.st_rdev) if stat.S_ISBLK(st.st_mode) else ("inode", st.st_dev, st.st_ino)
        keys.add(by_path)
    status = _loop_status(os.path.basename(sysfs), rdev)
    reported = None
    if status is not None:
        device, inode, backing_rdev = status
        reported = ("bdev", backing_rdev) if backing_rdev else ("inode", device, inode)
        keys.add(reported)
    # The device's own word, where it can be asked, decides whether the path is still its file.
    same_file = by_path is not None and by_path[0] == "inode" and reported in (None, by_path)
    return keys, path if same_file else None


def _loop_status(name: str, rdev: int) -> tuple[int, int, int] | None:
    """(st_dev, st_ino, st_rdev) of a loop device's backing file, from the device itself
    through /dev/NAME if that node is this device; None otherwise, and when the device cannot
    tell: its status stats the backing file, which fails where that file is unreachable (on
    a FUSE mount whose daemon was killed: ENOTCONN), and such a device is nobody's concern
    here. Raised, it failed every new clone into a DST file on the machine."""
    try:
        fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_rdev != rdev:
            return None
        info = _loop_info(fd)
    except OSError as exc:
        log.info("/dev/%s cannot tell what its backing file is (%s)", name, exc.strerror)
        return None
    finally:
        os.close(fd)
    return None if info is None else info[:3]


def _loop_info(fd: int) -> tuple[int, int, int, int] | None:
    """(lo_device, lo_inode, lo_rdevice, lo_offset) of the loop device open at FD; None for
    another block device, or a loop device with nothing beneath it."""
    try:
        info = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64_SIZE))
    except OSError as exc:
        if exc.errno not in (errno.ENXIO, errno.ENOTTY, errno.EINVAL):
            raise
        return None
    return _LOOP_INFO64_HEAD.unpack_from(info)


def loop_devices_over(fd: int) -> list[str]:
    """The loop devices (/dev/loopN) whose backing file is the regular file open at FD, by the
    inode each device reports."""
    st = os.fstat(fd)
    try:
        names = sorted(name for name in os.listdir(SYS_BLOCK) if name.startswith("loop"))
    except OSError:
        return []
    found = []
    for name in names:
        sysfs = os.path.join(SYS_BLOCK, name)
        rdev = sysfs_dev(sysfs) if loop_backing_file(sysfs) is not None else None
        status = None if rdev is None else _loop_status(name, rdev)
        if status is not None and status[:2] == (st.st_dev, st.st_ino):
            found.append(f"/dev/{name}")
    return found


def loop_identity(fd: int) -> dict[str, int]:
    """What a recorded identity (in META, a trace) of the block device open at FD adds to its
    name when it is a loop device: the inode of its backing file and the offset into it. A
    name such as /dev/loop0 comes back over other data once its device is set up again (the
    next `losetup -f`), and a META that took it for the same device would call that data
    hydrated. Other block devices are known by their name alone ({})."""
    info = _loop_info(fd)
    if info is None:
        return {}
    _, inode, _, offset = info
    return dict(zip(LOOP_IDENTITY_KEYS, (inode, offset)))


def loop_backing(fd: int) -> tuple[str, int] | None:
    """The regular file behind the loop device open at FD, by the path sysfs shows while it
    still names the file the device reports, and the device's offset into it; None for
    another block device, a loop device over a block device, or a backing file renamed or
    removed since it was set up."""
    info = _loop_info(fd)
    sysfs = _sysfs_dir(os.fstat(fd).st_rdev)
    path = None if info is None or sysfs is None else loop_backing_file(sysfs)
    if path is None:
        return None
    device, inode, _, offset = info
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (device, inode):
        return None
    return path, offset


def same_recorded_identity(recorded: object, current: dict) -> bool:
    """Whether RECORDED (a source's or destination's identity in META or a trace) names what
    CURRENT describes. One recorded before loop devices were known by their backing file lacks
    loop_identity's keys: it matches by the rest (a mount records them from then on)."""
    if recorded == current:
        return True
    if not isinstance(recorded, dict) or any(key in recorded for key in LOOP_IDENTITY_KEYS):
        return False
    return recorded == {key: value for key, value in current.items()
                        if key not in LOOP_IDENTITY_KEYS}
