"""What is stacked on a clone's image: the loop devices over it, the block devices built on
those (partitions, device-mapper and LVM volumes), and the filesystems mounted from any of
them. A stop detaches the image from under them, so it first has them write back into the
image what they cache, as `sync` would (`write_back_stacked`): a file copied into such a
filesystem a moment before, or its journal, is otherwise lost with the image, unannounced."""

from __future__ import annotations

import ctypes
import logging
import os

from .errors import describe
from .fuse.mount import mount_entries
from .identity import SYS_BLOCK, loop_devices_over, sysfs_dev
from .libc import libc

log = logging.getLogger(__name__)

SYS_CLASS_BLOCK = "/sys/class/block"  # every block device, partitions too, by name


def write_back_stacked(image_fd: int) -> None:
    """Blocking: every filesystem mounted from a device stacked on the image open at IMAGE_FD
    is synced (syncfs), then each of those devices (fsync: its own cache, then a flush that
    reaches the image as an FSYNC), the ones on top first. What cannot be synced is logged, and
    the rest goes on: a stop never fails for it."""
    for loop in loop_devices_over(image_fd):
        devices = _devices_on(os.path.basename(loop))
        rdevs = {name: sysfs_dev(os.path.join(SYS_CLASS_BLOCK, name)) for name in devices}
        _sync_filesystems_from({rdev for rdev in rdevs.values() if rdev is not None})
        for name in devices:
            if rdevs[name] is not None:
                _sync_device(f"/dev/{name}", rdevs[name])


def _devices_on(name: str) -> list[str]:
    """NAME and the block devices built on it (its partitions, the holders of either,
    recursively), each listed after every device built on it."""
    above = _partitions(name) + _holders(name)
    found: list[str] = []
    for upper in above:
        found += [device for device in _devices_on(upper) if device not in found]
    return found + [name]


def _partitions(name: str) -> list[str]:
    if not os.path.isdir(os.path.join(SYS_BLOCK, name)):
        return []  # a partition itself
    try:
        entries = os.listdir(os.path.join(SYS_BLOCK, name))
    except OSError:
        return []
    return sorted(entry for entry in entries
                  if os.path.exists(os.path.join(SYS_BLOCK, name, entry, "partition")))


def _holders(name: str) -> list[str]:
    try:
        return sorted(os.listdir(os.path.join(SYS_CLASS_BLOCK, name, "holders")))
    except OSError:
        return []


def _sync_filesystems_from(rdevs: set[int]) -> None:
    """syncfs of each filesystem mounted from one of RDEVS (once, however many places it is
    mounted at)."""
    synced: set[int] = set()
    for entry in mount_entries():
        major, minor = (int(part) for part in entry.device.split(":"))
        rdev = os.makedev(major, minor)
        if rdev in rdevs and rdev not in synced and _syncfs(entry.mountpoint, rdev):
            synced.add(rdev)


def _syncfs(mountpoint: str, rdev: int) -> bool:
    """syncfs of the filesystem of RDEV mounted at MOUNTPOINT; False when another one is what
    that path reaches now (mounted over it), or it cannot be opened."""
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        log.warning("cannot write back the filesystem at %s before the stop: %s", mountpoint,
                    describe(exc))
        return False
    try:
        if os.fstat(fd).st_dev != rdev:
            return False
        log.info("writing back the filesystem at %s before the stop", mountpoint)
        if libc.syncfs(fd) != 0:
            error = ctypes.get_errno()
            log.warning("writing back the filesystem at %s before the stop: %s", mountpoint,
                        os.strerror(error))
        return True
    finally:
        os.close(fd)


def _sync_device(node: str, rdev: int) -> None:
    try:
        fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        log.warning("cannot write back %s before the stop: %s", node, describe(exc))
        return
    try:
        if os.fstat(fd).st_rdev == rdev:  # the node is that device
            os.fsync(fd)
    except OSError as exc:
        log.warning("writing back %s before the stop: %s", node, describe(exc))
    finally:
        os.close(fd)
