"""Mounting and unmounting a FUSE filesystem: mount(2) as root, fusermount3 for other users,
the mount table, and paths resolved without looking into a mount.

The mount is always nosuid and nodev with default_permissions (the kernel checks the mode bits
we report), and only the mounting user may use it unless allow_other is asked for.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Collection
from dataclasses import dataclass

from ..errors import FusecloneError
from ..libc import libc

log = logging.getLogger(__name__)

FSTYPE = "fuse.fuseclone"
SUBTYPE = "fuseclone"
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2

PR_SET_IO_FLUSHER = 57


class MountError(FusecloneError):
    """The kernel or fusermount3 refused the mount."""


def _escape_option(value: str) -> str:
    """Commas separate mount options; the kernel and fusermount3 take backslash escapes."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def mount_fuse(mountpoint: str, *, fsname: str, allow_other: bool = False,
               use_fusermount: bool | None = None) -> int:
    """Mount a FUSE filesystem at `mountpoint`; returns the open /dev/fuse fd that serves it.

    `use_fusermount` defaults to "not root". The root inode's type follows the mountpoint's: a
    regular-file mountpoint becomes a one-file filesystem.
    """
    if use_fusermount is None:
        use_fusermount = os.geteuid() != 0
    if use_fusermount:
        return _mount_with_fusermount(mountpoint, fsname, allow_other)
    return _mount_as_root(mountpoint, fsname, allow_other)


def _mount_as_root(mountpoint: str, fsname: str, allow_other: bool) -> int:
    root_mode = stat.S_IFMT(os.stat(mountpoint).st_mode)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    options = [f"fd={fd}", f"rootmode={root_mode:o}", f"user_id={os.getuid()}",
               f"group_id={os.getgid()}", "default_permissions"]
    if allow_other:
        options.append("allow_other")
    data = ",".join(options).encode()
    source = os.fsencode(fsname)
    if libc.mount(source, os.fsencode(mountpoint), FSTYPE.encode(), MS_NOSUID | MS_NODEV, data) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise MountError(f"mount of {mountpoint} failed: {os.strerror(err)}")
    return fd


def _mount_with_fusermount(mountpoint: str, fsname: str, allow_other: bool) -> int:
    """fusermount3 (setuid root) mounts for us and passes the /dev/fuse fd back over a socket
    named by _FUSE_COMMFD."""
    if shutil.which("fusermount3") is None:
        raise MountError("mounting as a non-root user needs fusermount3 (Debian package fuse3)")
    options = ["nosuid", "nodev", "default_permissions", f"fsname={_escape_option(fsname)}",
               f"subtype={SUBTYPE}"]
    if allow_other:
        options.append("allow_other")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        proc = subprocess.Popen(["fusermount3", "-o", ",".join(options), "--", mountpoint],
                                env=dict(os.environ, _FUSE_COMMFD=str(theirs.fileno())),
                                pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE, text=True)
        theirs.close()
        try:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        finally:
            _, err = proc.communicate()
    if proc.returncode != 0 or not fds:
        for fd in fds:
            os.close(fd)
        message = (err or "").strip().splitlines()
        reason = message[-1] if message else f"fusermount3 exited {proc.returncode}"
        raise MountError(f"cannot mount {mountpoint}: {reason}")
    os.set_inheritable(fds[0], False)
    return fds[0]


def unmount(mountpoint: str, *, lazy: bool = False, use_fusermount: bool | None = None) -> None:
    """Unmount; with `lazy`, detach even while something still uses the mount.

    Raises OSError with the errno of the failure either way (EBUSY while the mount is in use,
    EINVAL when nothing is mounted there), so callers can fall back to a lazy unmount.
    `use_fusermount` defaults to "not root", like mount_fuse's."""
    if use_fusermount is None:
        use_fusermount = os.geteuid() != 0
    if use_fusermount:
        _unmount_with_fusermount(mountpoint, lazy)
        return
    if libc.umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unmount of {mountpoint}: {os.strerror(err)}")


def _unmount_with_fusermount(mountpoint: str, lazy: bool) -> None:
    """fusermount3 -u reports failures as "...: <strerror>" on stderr: turn that back into
    the errno, so EBUSY means busy here as it does for umount2."""
    if shutil.which("fusermount3") is None:
        raise OSError(errno.EPERM, "unmounting as a non-root user needs fusermount3 (Debian package fuse3)")
    result = subprocess.run(["fusermount3", "-u", *(["-z"] if lazy else []), "--", mountpoint],
                            capture_output=True, text=True)
    if result.returncode == 0:
        return
    lines = result.stderr.strip().splitlines()
    message = lines[-1] if lines else f"fusermount3 -u exited {result.returncode}"
    raise OSError(_errno_of_message(message), f"unmount of {mountpoint}: {message}")


_STRERRORS = {os.strerror(code): code for code in sorted(errno.errorcode, reverse=True)}


def _errno_of_message(message: str) -> int:
    reason = message.rsplit(": ", 1)[-1].strip()
    if reason in _STRERRORS:
        return _STRERRORS[reason]
    if "not found in" in message:  # "entry for X not found in /etc/mtab": not mounted
        return errno.EINVAL
    return errno.EIO


@dataclass(frozen=True)
class FuseMount:
    source: str
    mountpoint: str
    uid: int | None  # the mounting user, as the kernel records it (user_id=)
    device: str = ""  # "major:minor"


def fuse_mounts() -> list[FuseMount]:
    """Every fuseclone mount on this machine, unescaped."""
    return [FuseMount(entry.source, entry.mountpoint, _user_id(entry.options), entry.device)
            for entry in mount_entries() if entry.fstype == FSTYPE]


def mountpoints_of(device: str) -> list[str]:
    """Where DEVICE (a loop device, say) is mounted."""
    return [entry.mountpoint for entry in mount_entries() if entry.source == device]


def _user_id(options: str) -> int | None:
    for option in options.split(","):
        if option.startswith("user_id="):
            return int(option[len("user_id="):])
    return None


def mount_table() -> list[tuple[str, str]]:
    """(source, mountpoint) of every fuseclone mount on this machine, unescaped."""
    return [(mount.source, mount.mountpoint) for mount in fuse_mounts()]


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_fuseclone_mount(path: str) -> bool:
    mountpoints = {mountpoint for _, mountpoint in mount_table()}
    return resolve_outside_mounts(path, mountpoints) in mountpoints


MAX_SYMLINKS = 40  # like the kernel's


def resolve_outside_mounts(path: str, mountpoints: Collection[str]) -> str:
    """PATH made absolute and free of symlinks, like os.path.realpath, but without a look at
    any of MOUNTPOINTS (the kernel's spelling, as in the mount table) or inside one: a stat of a
    FUSE mountpoint waits for its daemon, which may be stopped. What follows a mountpoint in
    PATH is joined to it as it is."""
    current = "/" if os.path.isabs(path) else os.getcwd()
    pending = path.split("/")[::-1]  # a stack: the next component last
    links = 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = os.path.dirname(current)
            continue
        if current in mountpoints:
            return os.path.normpath(os.path.join(current, name, *pending[::-1]))
        candidate = os.path.join(current, name)
        if candidate in mountpoints:
            current = candidate
            continue
        try:
            target = os.readlink(candidate)
        except OSError:  # not a symlink (or missing): taken as it is
            current = candidate
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
        pending.extend(target.split("/")[::-1])
        if target.startswith("/"):
            current = "/"
    return current


def become_io_flusher() -> bool:
    """Mark this process (and the threads it starts later) as the flusher of its mount's dirty
    pages: the kernel then throttles its own writes only against DST's device, never against
    the image's dirty pages that only it can clean, and keeps its allocations out of I/O
    reclaim. Needs CAP_SYS_RESOURCE; returns whether it took."""
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0:
        return True
    log.info("not an I/O flusher (PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE: %s): with the "
             "write cache, DST writes may be throttled behind the image's own dirty pages",
             os.strerror(ctypes.get_errno()))
    return False


def set_dirty_limit(real_mountpoint: str, nbytes: int) -> bool:
    """Let the kernel keep up to `nbytes` of the mount's written data in its page cache before
    writers wait for the daemon. FUSE caps every mount at 1% of the dirty limit by default (about
    50 MB here), which throttles cached writes to the daemon's speed at one page per request.
    Needs root and a kernel with the bdi `max_bytes` knob (6.2); returns whether it took.

    `real_mountpoint` is resolved before mounting: resolving it afterwards would stat our own
    mount, and wait for an answer only this process can give."""
    bdi = mount_device(real_mountpoint)
    if bdi is None:
        log.debug("%s: not in /proc/self/mountinfo", real_mountpoint)
        return False
    try:
        _write_bdi(bdi, "max_bytes", nbytes)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            log.info("bdi %s max_bytes: %s", bdi, exc)
            return False
        # More than the whole dirty threshold of a smaller machine: allow all of it instead.
        try:
            _write_bdi(bdi, "max_ratio", 100)
        except OSError as exc2:
            log.info("bdi %s max_ratio: %s", bdi, exc2)
            return False
    return True


def _write_bdi(bdi: str, knob: str, value: int) -> None:
    with open(f"/sys/class/bdi/{bdi}/{knob}", "w") as f:
        f.write(str(value))


MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo: the mount table, in the order mounts were made."""

    mount_id: int
    parent_id: int  # the mount this one is mounted on
    device: str  # "major:minor"
    mountpoint: str  # unescaped
    fstype: str
    source: str  # unescaped: a device, or a FUSE filesystem's fsname
    options: str  # the filesystem's own (for FUSE: user_id=, group_id=, ...)
    root: str = "/"  # the directory of its filesystem it shows at its mountpoint, unescaped
    propagation: tuple[str, ...] = ()  # the optional fields: "shared:N", "master:N", ...

    def in_group(self, group: str) -> bool:
        """Whether mounts made under a mount of the peer group GROUP appear under this one too
        (it is a peer of that group, or its slave), and their unmounts reach it."""
        return any(field in (f"shared:{group}", f"master:{group}") for field in self.propagation)

    def shared_group(self) -> str | None:
        return next((field[len("shared:"):] for field in self.propagation
                     if field.startswith("shared:")), None)


class ProcNotMounted(FusecloneError):
    """/proc is missing (a chroot without it): the mount table cannot be read."""

    def __init__(self) -> None:
        super().__init__(f"cannot read the mount table, {MOUNTINFO}: /proc is not mounted here "
                         "(a chroot?): mount it first (mount -t proc proc /proc)")


def mount_entries(mountinfo: str = MOUNTINFO) -> list[MountEntry]:
    entries = []
    # Paths are bytes: one that is not UTF-8 (any mount on the host) decodes as os.fsdecode
    # would decode it, instead of failing every command that reads the table.
    try:
        f = open(mountinfo, encoding=sys.getfilesystemencoding(),
                 errors=sys.getfilesystemencodeerrors())
    except FileNotFoundError:
        if mountinfo == MOUNTINFO:
            raise ProcNotMounted() from None
        raise
    with f:
        for line in f:
            fields = line.split()
            try:
                dash = fields.index("-", 6)  # after the optional fields
                fstype, source, options = fields[dash + 1:dash + 4]
            except ValueError:
                continue
            entries.append(MountEntry(int(fields[0]), int(fields[1]), fields[2],
                                      _unescape(fields[4]), fstype, _unescape(source), options,
                                      _unescape(fields[3]), tuple(fields[6:dash])))
    return entries


def mount_device(real_mountpoint: str, mountinfo: str = MOUNTINFO) -> str | None:
    """"major:minor" of the fuseclone mount at `real_mountpoint` (a resolved path), from
    mountinfo rather than a stat of the mount."""
    found = None
    for entry in mount_entries(mountinfo):
        if entry.fstype == FSTYPE and entry.mountpoint == real_mountpoint:
            found = entry.device  # the last one: mounts stacked on one path hide earlier ones
    return found


def top_mount(real_mountpoint: str, mountinfo: str = MOUNTINFO) -> MountEntry | None:
    """The mount that `real_mountpoint` (a resolved path) reaches now, and umount2 of it would
    unmount: of the mounts stacked there, the one nothing else there is mounted on."""
    stacked = [entry for entry in mount_entries(mountinfo) if entry.mountpoint == real_mountpoint]
    covered = {entry.parent_id for entry in stacked}
    tops = [entry for entry in stacked if entry.mount_id not in covered]
    return tops[-1] if tops else None


class CoveredError(FusecloneError):
    """Another filesystem is mounted over a clone's mountpoint."""

    def __init__(self, real_mountpoint: str, fstype: str) -> None:
        self.reason = f"another filesystem ({fstype}) is mounted over the clone: unmount it first"
        super().__init__(f"{real_mountpoint}: {self.reason}")


def check_clone_on_top(real_mountpoint: str, mount_id: int | None = None,
                       mountinfo: str = MOUNTINFO) -> None:
    """Raise CoveredError unless `real_mountpoint` reaches a fuseclone mount (the one of
    MOUNT_ID, when given), before it is unmounted: umount2 takes a path and unmounts whatever
    is mounted there now, which may be a filesystem mounted over the clone since, or, once the
    clone was detached behind fuseclone's back (`umount -l`), a mount made there since,
    another clone's perhaps. Nothing mounted there at all passes: the unmount says EINVAL."""
    top = top_mount(real_mountpoint, mountinfo)
    if top is None:
        return
    if top.fstype != FSTYPE or (mount_id is not None and top.mount_id != mount_id):
        raise CoveredError(real_mountpoint, top.fstype)


def places_of(device: str, mount_id: int, mountinfo: str = MOUNTINFO) -> list[MountEntry]:
    """Every mount in this namespace of the FUSE filesystem DEVICE ("major:minor") that
    MOUNT_ID mounted: bind mounts of it (`mount --bind`, `--rbind`) and copies propagation made,
    MOUNT_ID's own first while it is there. A FUSE session ends only when the last of them, here
    and in every other mount namespace, is unmounted."""
    same = [entry for entry in mount_entries(mountinfo)
            if entry.device == device and entry.fstype == FSTYPE]
    return sorted(same, key=lambda entry: entry.mount_id != mount_id)


def device_of(mount_id: int, mountinfo: str = MOUNTINFO) -> str | None:
    """"major:minor" of the filesystem the mount MOUNT_ID shows, None if it is not here."""
    return next((entry.device for entry in mount_entries(mountinfo)
                 if entry.mount_id == mount_id), None)


def places_kept_after_unmount(mount_id: int) -> list[str]:
    """Where the filesystem of our mount MOUNT_ID stays mounted once MOUNT_ID is unmounted:
    its bind mounts here, and the copies other mount namespaces took while it was mounted
    (`unshare -m`, a container, a service's private namespace), as "PATH in the mount namespace
    of pid P (...)"; not those the unmount reaches by propagation (mounted under a peer or a
    slave of the mount ours is mounted on, at the same place). Namespaces /proc does not show
    us are missed."""
    entries = mount_entries()
    by_id = {entry.mount_id: entry for entry in entries}
    ours = by_id.get(mount_id)
    if ours is None:
        return []
    spot = _spot(ours, by_id)
    kept = [entry.mountpoint for entry in entries if entry.device == ours.device
            and entry.fstype == FSTYPE and entry.mount_id != mount_id
            and not _reached_by_propagation(entry, by_id, spot)]
    for pid, theirs in _other_namespaces():
        their_by_id = {entry.mount_id: entry for entry in theirs}
        kept += [f"{entry.mountpoint} in the mount namespace of pid {pid} (`nsenter -t {pid} -m "
                 f"umount {entry.mountpoint}`)" for entry in theirs
                 if entry.device == ours.device and entry.fstype == FSTYPE
                 and not _reached_by_propagation(entry, their_by_id, spot)]
    return kept


def _spot(entry: MountEntry, by_id: dict[int, MountEntry]) -> tuple[str, str] | None:
    """(peer group of the mount ENTRY is mounted on, the place in that filesystem ENTRY is at):
    what an unmount propagates by. None when that mount is not shared."""
    parent = by_id.get(entry.parent_id)
    group = parent.shared_group() if parent is not None else None
    if parent is None or group is None:
        return None
    return group, _place_in_parent(entry, parent)


def _place_in_parent(entry: MountEntry, parent: MountEntry) -> str:
    relative = os.path.relpath(entry.mountpoint, parent.mountpoint)
    return os.path.normpath(os.path.join(parent.root, relative))


def _reached_by_propagation(entry: MountEntry, by_id: dict[int, MountEntry],
                            spot: tuple[str, str] | None) -> bool:
    parent = by_id.get(entry.parent_id)
    if spot is None or parent is None:
        return False
    group, place = spot
    return parent.in_group(group) and _place_in_parent(entry, parent) == place


def _other_namespaces() -> list[tuple[int, list[MountEntry]]]:
    """(a pid, its mount table) for each mount namespace other than this process's."""
    try:
        ours = os.stat("/proc/self/ns/mnt").st_ino
        pids = sorted(int(name) for name in os.listdir("/proc") if name.isdigit())
    except OSError:
        return []
    seen = {ours}
    tables = []
    for pid in pids:
        try:
            namespace = os.stat(f"/proc/{pid}/ns/mnt").st_ino
            if namespace in seen:
                continue
            seen.add(namespace)
            tables.append((pid, mount_entries(f"/proc/{pid}/mountinfo")))
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return tables
