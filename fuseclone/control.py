"""The control channel between the CLI and a live mount.

A running mount listens on a Unix socket whose path is derived from its metadata file's real
path: RUNTIME_DIR/<sha256(realpath(META))[:16]>.sock, mode 0600, in the mounting user's
runtime directory (root's is /run/fuseclone: see default_runtime_dir). The mount's fsname in /proc/mounts is "fuseclone:<META>", so a
mountpoint leads to its META and from there to its socket.

Protocol: one JSON object per line in each direction. Requests:
    {"op": "status"}                   -> {"ok": true, "status": {...}}
    {"op": "message", "text": "..."}   -> {"ok": true} or {"ok": false, "error": "..."}
    {"op": "wait", "timeout": SECONDS} -> like status, sent once hydration is complete (and
                                          committed), has stopped on errors, or SECONDS passed
    {"op": "unmount"}                  -> {"ok": true}, then the mount shuts down; or, while
                                          the image is open, {"ok": false, "busy": true, ...}
    {"op": "unmount", "lazy": true}    -> {"ok": true}: cached writes handed over, then a lazy
                                          detach and shutdown (what SIGTERM does)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import stat
from dataclasses import asdict
from typing import Any, Callable

import trio

from .errors import FusecloneError

log = logging.getLogger(__name__)

def default_runtime_dir(uid: int, environ: dict[str, str]) -> str:
    """Where a user's control sockets and default logs live: root's in /run/fuseclone, another
    user's in their own $XDG_RUNTIME_DIR/fuseclone, else /tmp/fuseclone-<uid>.
    FUSECLONE_RUNTIME_DIR overrides it (the tests use it)."""
    if environ.get("FUSECLONE_RUNTIME_DIR"):
        return environ["FUSECLONE_RUNTIME_DIR"]
    if uid == 0:
        return "/run/fuseclone"
    if environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(environ["XDG_RUNTIME_DIR"], "fuseclone")
    return f"/tmp/fuseclone-{uid}"


RUNTIME_DIR = default_runtime_dir(os.geteuid(), dict(os.environ))
FSNAME_PREFIX = "fuseclone:"


def ensure_runtime_dir(path: str | None = None) -> str:
    """Create the runtime directory (mode 0700) if it is missing, and refuse one that someone
    else could have prepared: a symlink, not a directory, not ours, or writable by others.
    What is in it (sockets the CLI trusts, logs appended to) must be ours alone."""
    path = path or RUNTIME_DIR
    try:
        try:
            os.makedirs(path, mode=0o700)
        except FileExistsError:
            pass  # whatever it is, it is looked at next
        st = os.lstat(path)
    except OSError as exc:
        raise FusecloneError(f"cannot create the runtime directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise FusecloneError(f"the runtime directory {path} is not a directory (a symlink?): remove it")
    if st.st_uid != os.geteuid():
        raise FusecloneError(f"the runtime directory {path} belongs to another user (uid {st.st_uid}): "
                             "remove it")
    if st.st_mode & 0o022:
        raise FusecloneError(f"the runtime directory {path} is writable by other users "
                             f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 700 it")
    return path


def _runtime_file(meta_path: str, suffix: str) -> str:
    digest = hashlib.sha256(os.path.realpath(meta_path).encode()).hexdigest()[:16]
    return os.path.join(RUNTIME_DIR, digest + suffix)


def socket_path(meta_path: str) -> str:
    return _runtime_file(meta_path, ".sock")


DEFAULT_LOG_MAX = 4 << 20  # a default log this large is renamed to LOG.1 by the next mount


def log_path(meta_path: str) -> str:
    """Where a background mount of META logs unless told otherwise: one file per clone, kept
    after the mount ends (for its last words) and appended to by the next mount."""
    return _runtime_file(meta_path, ".log")


def rotate_log(meta_path: str) -> str:
    """The default log of META, renamed to LOG.1 first if it grew past DEFAULT_LOG_MAX: at
    most this mount's log plus one older file."""
    path = log_path(meta_path)
    try:
        if os.path.getsize(path) > DEFAULT_LOG_MAX:
            os.replace(path, path + ".1")
    except FileNotFoundError:
        pass
    return path


def remove_logs(meta_path: str) -> None:
    """Remove the default log of META, and its older file."""
    for path in (log_path(meta_path), log_path(meta_path) + ".1"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def mounts() -> list[tuple[str, str]]:
    """(META path, mountpoint) of every fuseclone mount on this machine."""
    from .fuse.mount import mount_table

    return [(source[len(FSNAME_PREFIX):], mountpoint) for source, mountpoint in mount_table()
            if source.startswith(FSNAME_PREFIX)]


def meta_of_mountpoint(path: str) -> str | None:
    real = os.path.realpath(path)
    for meta, mountpoint in mounts():
        if os.path.realpath(mountpoint) == real or mountpoint == path:
            return meta
    return None


def resolve_target(target: str) -> str:
    """TARGET is a mountpoint or a META file; return the META path."""
    meta = meta_of_mountpoint(target)
    if meta is not None:
        return meta
    if os.path.isfile(target):
        return target
    if not os.path.exists(target):
        raise FusecloneError(f"{target}: no such mountpoint or metadata file")
    raise FusecloneError(f"{target}: not a fuseclone mountpoint or metadata file")


# ---- client (blocking: the CLI is synchronous) -----------------------------------------------


def request(meta_path: str, req: dict, timeout: float = 10.0) -> dict | None:
    """Send one request to the mount of META; None when no mount is listening."""
    path = socket_path(meta_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        sock.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    if not data:
        raise FusecloneError("the mount closed the control connection without answering")
    return json.loads(data)


# ---- server (in the mount's nursery) ----------------------------------------------------------


Handler = Callable[[dict], Any]


async def serve_control(meta_path: str, handle: Handler,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listen on META's control socket until cancelled; remove the socket afterwards."""
    path = socket_path(meta_path)
    ensure_runtime_dir()
    _remove_stale_socket(path)
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)
        try:
            await listener.bind(path)
        finally:
            os.umask(old_umask)
        listener.listen(16)
        task_status.started(path)
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(_serve_connection, trio.SocketStream(conn), handle)
    finally:
        listener.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _remove_stale_socket(path: str) -> None:
    """A socket left by a killed mount answers nothing: remove it. A live one means the META is
    in use, which the metadata lock has already refused."""
    if os.path.exists(path):
        os.unlink(path)


async def _serve_connection(stream: trio.SocketStream, handle: Handler) -> None:
    async with stream:
        buf = b""
        while b"\n" not in buf:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buf += chunk
            if len(buf) > 1 << 20:
                return
        try:
            req = json.loads(buf.split(b"\n", 1)[0])
            reply = await handle(req)
        except (ValueError, KeyError, TypeError) as exc:
            reply = {"ok": False, "error": str(exc)}
        # Shielded (briefly): an "unmount" request cancels the nursery this task lives in, and
        # its answer must still reach the waiting CLI.
        with trio.move_on_after(5) as scope:
            scope.shield = True
            await stream.send_all(json.dumps(reply, default=_jsonable).encode() + b"\n")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")
