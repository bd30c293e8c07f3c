"""The control channel between the CLI and a live mount.

A running mount listens on a Unix socket whose path is derived from its metadata file's real
path: /run/fuseclone/<sha256(realpath(META))[:16]>.sock, mode 0600 (root only unless the
mounting user owns it). The mount's fsname in /proc/mounts is "fuseclone:<META>", so a
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
from dataclasses import asdict
from typing import Any, Callable

import trio

from .errors import FusecloneError

log = logging.getLogger(__name__)

RUNTIME_DIR = os.environ.get("FUSECLONE_RUNTIME_DIR", "/run/fuseclone")
FSNAME_PREFIX = "fuseclone:"


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
    os.makedirs(RUNTIME_DIR, mode=0o700, exist_ok=True)
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
