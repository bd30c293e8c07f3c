"""Every live clone on this machine, for `list` and `metrics`: the fuseclone mounts in the mount
table, each asked for its status over its control socket, all at once, within one deadline; and
the clones this user mounted in other mount namespaces (`unshare -m`, a service's
PrivateMounts=, a container sharing the runtime directory), which this mount table does not
show: found by the control sockets in the runtime directory whose daemons answer from another
mount namespace.

A stopped or hung daemon costs the deadline once, however many there are, and only its own
row says so; nothing here looks inside a mountpoint (a stat would wait for its daemon).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import trio

from . import control
from .errors import FusecloneError
from .status import Status, public_source

LOG_QUESTION_TIMEOUT = 3.0  # seconds the clones have, all together, to say whose log a file is


@dataclass
class LiveClone:
    mountpoint: str  # as the mount table has it
    metadata: str  # META, from the mount's fsname
    status: Status | None = None  # None: no answer, `problem` says why
    image: str | None = None
    problem: str | None = None
    another_users: bool = False  # mounted by another user, whose daemon answers only them
    device: str | None = None  # the mount's "major:minor", from the mount table
    # mounted in another mount namespace: `mountpoint` and `image` as its daemon sees them
    other_namespace: bool = False

    @property
    def state(self) -> str:
        return self.status.state if self.status is not None else str(self.problem)

    def to_json(self) -> dict:
        st = self.status
        return {
            "mountpoint": self.mountpoint,
            "image": self.image,
            "source": public_source(st.source) if st else None,
            "destination": st.destination if st else None,
            "metadata": self.metadata,
            "hydrated_regions": st.hydrated_regions if st else None,
            "total_regions": st.total_regions if st else None,
            "hydration_enabled": st.hydration_enabled if st else None,
            "state": self.state,
            "other_mount_namespace": self.other_namespace,
        }


def live_clones(timeout: float) -> list[LiveClone]:
    """The fuseclone mounts of this machine in mount-table order, each with its status or the
    reason it has none (another user's, not answering, daemon gone); TIMEOUT seconds for all."""
    clones = _in_the_mount_table()
    elsewhere = [_Elsewhere(path) for path in _sockets_besides(clones)]
    trio.run(_ask_all, [clone for clone in clones if clone.problem is None], elsewhere, timeout)
    _answers_of_their_own_daemons(clones, elsewhere)
    return clones + _in_other_namespaces(clones, elsewhere)


def _answers_of_their_own_daemons(clones: list[LiveClone], elsewhere: list[_Elsewhere]) -> None:
    """A mount whose META was moved, and another clone made at its path, was asked at that
    clone's socket (or found none there, that clone's daemon killed): its row takes the answer
    of the daemon that serves its device (found among the other sockets), or none."""
    for clone in clones:
        st = clone.status
        if clone.another_users or (st is not None and st.device in (None, clone.device)):
            continue  # (a device of None: a daemon of an earlier release)
        own = next((other.status for other in elsewhere
                    if other.status is not None and other.status.device == clone.device), None)
        if own is not None:
            clone.status, clone.image, clone.problem = own, own.image, None
        elif st is not None:
            clone.status = clone.image = None
            clone.problem = (f"{clone.metadata} is another clone's metadata now (mounted at "
                             f"{st.mountpoint}), and this mount's daemon does not answer")


@dataclass
class _Elsewhere:
    """A control socket no mount in the table names, and what its daemon answered (if one
    did): a second name of a table mount's socket, a killed daemon's, or a mount's in another
    mount namespace."""

    socket: str
    status: Status | None = None


def _sockets_besides(clones: list[LiveClone]) -> list[str]:
    """The control sockets in the runtime directory but those of CLONES' METAs."""
    named = set()
    for clone in clones:
        # A META this user cannot stat names no socket: its mount is asked at its socket as
        # one of the others, and found to be the table's by its daemon.
        if not clone.another_users:
            with contextlib.suppress(OSError):
                named.update((control.socket_path(clone.metadata),
                              control.earlier_socket_path(clone.metadata)))
    return [path for path in control.control_sockets() if path not in named]


def _in_other_namespaces(clones: list[LiveClone], elsewhere: list[_Elsewhere]) -> list[LiveClone]:
    """The live clones that answered at sockets of their own from another mount namespace, once
    each (a mount's socket may have two names), none that the table has (by daemon)."""
    seen = {clone.status.pid for clone in clones if clone.status is not None}
    found = []
    for other in elsewhere:
        status = other.status
        if status is None or status.pid in seen or not _in_another_mount_namespace(status.pid):
            continue
        seen.add(status.pid)
        found.append(LiveClone(status.mountpoint or "?", status.metadata, status,
                               image=status.image, other_namespace=True))
    return found


def _in_another_mount_namespace(pid: int | None) -> bool:
    """Whether process PID (as this process sees it) is in another mount namespace than this
    one; False if that cannot be told (it is gone)."""
    if pid is None:
        return False
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    except OSError:
        return False


def _in_the_mount_table() -> list[LiveClone]:
    """The fuseclone mounts of this machine, another user's with its problem said."""
    from .fuse.mount import fuse_mounts

    clones = []
    for mount in fuse_mounts():
        if not mount.source.startswith(control.FSNAME_PREFIX):
            continue
        clone = LiveClone(mount.mountpoint, mount.source[len(control.FSNAME_PREFIX):],
                          device=mount.device)
        if mount.uid not in (None, os.geteuid()):
            # Its control socket is in that user's runtime directory, not ours.
            clone.problem = f"another user's mount (uid {mount.uid}): run as that user"
            clone.another_users = True
        clones.append(clone)
    return clones


def clone_logging_to(path: str, timeout: float = LOG_QUESTION_TIMEOUT) -> str | None:
    """The mountpoint of this user's live clone that logs to PATH (by any name of the file), or
    None. Each clone is asked in turn, within TIMEOUT seconds for all: blocking and without
    trio, for a mount that refuses PATH (claims.py) and wants to say why, in or out of its
    event loop."""
    try:
        target = os.stat(path)
    except OSError:
        return None
    deadline = time.monotonic() + timeout
    for clone in _in_the_mount_table():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if clone.another_users:  # its socket is not in our runtime directory
            continue
        try:
            reply = control.request(clone.metadata, {"op": "status"}, remaining)
        except FusecloneError:  # not answering: it cannot say, and the refusal stays general
            continue
        log_file = reply and reply.get("ok") and reply["status"].get("log_file")
        if log_file and _same_file(log_file, target):
            return clone.mountpoint
    return None


def _same_file(path: str, st: os.stat_result) -> bool:
    try:
        other = os.stat(path)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


async def _ask_all(clones: list[LiveClone], elsewhere: list[_Elsewhere], timeout: float) -> None:
    async with trio.open_nursery() as nursery:
        for clone in clones:
            nursery.start_soon(_ask, clone, timeout)
        for other in elsewhere:
            nursery.start_soon(_ask_elsewhere, other, timeout)


async def _ask_elsewhere(other: _Elsewhere, timeout: float) -> None:
    """Fill in OTHER's status. A socket nobody answers at in time says nothing of whose it is;
    nor does one that cannot be reached (a symlink loop: OSError) or answers as no fuseclone
    daemon does (another program's, in the runtime directory by mistake): passed over."""
    try:
        reply = await trio.to_thread.run_sync(control.request_at, other.socket,
                                              {"op": "status"}, timeout)
    except (FusecloneError, OSError, ValueError):  # the last: not JSON
        return
    other.status = _status_in(reply)


def _status_in(reply: object) -> Status | None:
    """The status in a daemon's reply, None if it holds none."""
    if not isinstance(reply, dict) or not reply.get("ok"):
        return None
    try:
        return Status.from_reply(reply)
    except (KeyError, TypeError, ValueError):  # no status, or not one of a fuseclone daemon
        return None


async def _ask(clone: LiveClone, timeout: float) -> None:
    """Fill in CLONE's status, or its problem. The blocking client runs in a worker thread of
    its own and keeps its own deadline, so every clone is asked at once."""
    try:
        reply = await trio.to_thread.run_sync(control.request, clone.metadata, {"op": "status"},
                                              timeout)
    except control.NotAnswering as exc:
        clone.problem = f"not answering (stopped? pid {exc.pid or 'unknown'})"
        return
    except FusecloneError as exc:
        clone.problem = f"no answer: {exc}"
        return
    if reply is None:
        clone.problem = ("daemon gone (killed): `fuseclone unmount` cleans the mount"
                         if control.daemon_gone(clone.metadata) else "no control socket")
        return
    clone.status = Status.from_reply(reply)
    clone.image = reply.get("image")
