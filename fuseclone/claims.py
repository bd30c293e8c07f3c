"""What a live clone holds, so that no other fuseclone mount writes it (SPEC invariants 4 and 9,
across clones).

A clone holds its SRC shared and its DST exclusively (META holds its own exclusive flock,
metadata.py; an access trace being recorded, trace.py, and its log file, daemon.py, too). A
refusal of a live clone's log says so (the clone names its log when asked). A flock follows a
file under every name (a hard link, a symlink, /proc/self/fd/N), but nothing reaches the file
beneath a loop device by a name: so a block device's hold also takes the files beneath it (its
loop backing files, identity.backing_files), and its node. The files a mount writes besides DST and META (the
access trace it truncates, the log it appends to) and a file mountpoint it would cover are
probed before the mount opens anything for writing: refused while a clone holds them.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time

from .errors import FusecloneError
from .identity import backing_files

log = logging.getLogger(__name__)

_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)  # the filesystem cannot flock
# udev holds a shared flock on a block device while it probes it (just after `losetup`, say):
# an exclusive hold of a device node waits that long for it before calling the device held.
UDEV_PROBE_WAIT = 1.0  # seconds


class HeldError(FusecloneError):
    """Another process (a live clone) holds the file; `path` names it."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} is in use by a live clone")
        self.path = path


def hold(fd: int, path: str, *, exclusive: bool, required: bool | None = None) -> list[int]:
    """Flock, without waiting, the file or block device node `fd` is open on (named `path`)
    and, for a block device, the files beneath it. Returns the descriptors opened for the
    files beneath, which the caller closes to let go (closing `fd` lets go of the rest).
    Raises HeldError naming what another process holds; then nothing stays held. Where the
    filesystem has no locks (an NFS mount without lockd, say), a hold that is not REQUIRED
    (by default: a shared one), and the hold of a file beneath, hold nothing (logged): as
    before these holds existed, the path checks alone guard it. DST's fails, as it always did."""
    block_device = stat.S_ISBLK(os.fstat(fd).st_mode)
    _flock(fd, path, exclusive, required=exclusive if required is None else required,
           wait=UDEV_PROBE_WAIT if block_device and exclusive else 0.0)
    if not block_device:
        return []
    held: list[int] = []
    try:
        for file in backing_files(os.fstat(fd).st_rdev):
            try:
                file_fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue  # gone since identity looked: nobody reaches it by this name either
            held.append(file_fd)
            _flock(file_fd, file, exclusive, required=False)
    except BaseException:
        release(held)
        fcntl.flock(fd, fcntl.LOCK_UN)
        raise
    return held


def release(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()


_NONE_OF_ANOTHER_CLONES = "it must be none of another clone's files"


def refuse_if_held(role: str, path: str) -> None:
    """Refuse (FusecloneError, with ROLE) a PATH that a live clone holds: its source,
    destination, metadata or log (or a trace it records), under any name or beneath a loop
    device. A missing file is held by nobody."""
    held = _held_as(path)
    if held is not None:
        through = "" if held == path else f" (through {held})"
        raise FusecloneError(live_log_refusal(role, path, held) or f"the {role} {path} is in use "
                             f"by a live clone{through}: {_NONE_OF_ANOTHER_CLONES}")


def refuse_a_live_log(role: str, path: str) -> None:
    """Refuse PATH (as ROLE) if it is a live clone's log. For the files whose own claim
    refuses any held file (DST, META) but cannot tell why it is held."""
    refusal = live_log_refusal(role, path)
    if refusal is not None:
        raise FusecloneError(refusal)


def live_log_refusal(role: str, path: str, held: str | None = None) -> str | None:
    """Why PATH may not be this mount's ROLE if it is a live clone's log, or None: held (by
    the name HELD, once known), and named so by that clone. A clone holds its log only if it is
    a regular file."""
    from .clones import clone_logging_to

    if held is None:
        held = _held_as(path) if os.path.isfile(path) else None
    mountpoint = clone_logging_to(held) if held is not None else None
    if mountpoint is None:
        return None
    through = "" if held == path else f" (through {held})"
    return (f"the {role} {path} is the log of the live clone at {mountpoint}{through}: "
            f"{_NONE_OF_ANOTHER_CLONES}")


def _held_as(path: str) -> str | None:
    """The name under which another process holds PATH (PATH itself, or a file beneath it),
    or None. A missing file, or one not ours to read, is held by nobody: opening it for
    writing later says why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        release(hold(fd, path, exclusive=True, required=False))
    except HeldError as exc:
        return exc.path
    finally:
        os.close(fd)
    return None


def refuse_unless_file(role: str, path: str, *, char_device_ok: bool = False) -> None:
    """A file the mount writes must be a regular file or missing (then it is created): not a
    block device (a loop device writes straight into another file), nor a FIFO (opening it
    waits for a reader). CHAR_DEVICE_OK lets a log go to /dev/null."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or (char_device_ok and stat.S_ISCHR(mode))):
        raise FusecloneError(f"the {role} {path} must be a regular file")


def _flock(fd: int, path: str, exclusive: bool, *, required: bool, wait: float = 0.0) -> None:
    """Flock FD, trying again for WAIT seconds while another holder has it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise HeldError(path) from None
            time.sleep(0.02)
        except OSError as exc:
            if required or exc.errno not in _NO_LOCKS:
                raise
            log.warning("%s: not held against other clones (%s)", path, exc.strerror)
            return
