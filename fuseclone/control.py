"""The control channel between the CLI and a live mount.

A running mount listens on a Unix socket whose name is derived from its metadata file's
identity (st_dev, st_ino), so every name of one META (a hard link, a symlink) finds it:
RUNTIME_DIR/<identity of META>.sock, mode 0600, in the mounting user's runtime directory
(root's is /run/fuseclone: see default_runtime_dir). The mount's fsname in /proc/mounts is
"fuseclone:<META>", so a mountpoint leads to its META and from there to its socket.

Protocol: one JSON object per line in each direction, one request per connection. Requests:
    {"op": "status"}                   -> {"ok": true, "status": {...}}
    {"op": "message", "text": "..."}   -> {"ok": true} or {"ok": false, "error": "..."}
    {"op": "wait", "timeout": SECONDS} -> like status, sent once hydration is complete (and
                                          committed), has stopped on errors, or SECONDS passed
                                          (default 60)
    {"op": "unmount"}                  -> {"ok": true, ...}, then the mount shuts down; or, while
                                          the image is open, {"ok": false, "busy": true, ...}
    {"op": "unmount", "lazy": true}    -> {"ok": true, ...}: cached writes handed over, then a
                                          lazy detach and shutdown (what SIGTERM does)
                                          (every unmount answer also carries "pid",
                                          "metadata_mode", "metadata_error" and "log_file": the
                                          CLI then tells a last commit that lingers or never
                                          came, and why)
    either with "mountpoint": PATH     -> {"ok": false, "error": "..."} from a mount elsewhere

A field a daemon does not know is refused ('OP takes no field "NAME"'): a client that adds one
asks an earlier release's daemon again without it, when that is safe (cli._request_unmount).

Nothing a client sends can hurt the mount (SPEC invariant 10): a request of any other shape,
type or range is answered {"ok": false, "error": "..."} before anything is done; a client that
hangs up before its answer only cancels its own request; a line must arrive within
REQUEST_TIMEOUT and fit in MAX_REQUEST; at most MAX_CLIENTS are served at once, the rest wait
in the listen backlog. A `wait` gives its slot back once it is read (at most MAX_WAITS are
pending; more are answered with an error): a crowd of waits never keeps status, message or
unmount from being answered.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import stat
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

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
    if os.path.isabs(environ.get("XDG_RUNTIME_DIR", "")):  # the spec: a relative one is invalid
        return os.path.join(environ["XDG_RUNTIME_DIR"], "fuseclone")
    return f"/tmp/fuseclone-{uid}"


RUNTIME_DIR = default_runtime_dir(os.geteuid(), dict(os.environ))
FSNAME_PREFIX = "fuseclone:"
# accept(2) failures a server (the control socket, the metrics endpoint) waits out and retries
ACCEPT_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

REQUEST_TIMEOUT = 10.0  # seconds: the CLI's deadline for an answer, and the mount's for a request line
MAX_REQUEST = 64 << 10  # bytes in a request line
MAX_CLIENTS = 128  # connections served at once; more wait in the listen backlog
MAX_WAITS = 256  # "wait" requests pending at once, apart from MAX_CLIENTS; more get an error
LONG_REQUESTS = {"wait"}  # requests that last (until the clone is complete): they hold a wait slot
ANSWER_TIMEOUT = 5.0  # seconds an answer may take to send (shielded: an unmount's answer)


def ensure_runtime_dir(path: str | None = None) -> str:
    """Create the runtime directory (mode 0700) if it is missing, and refuse one that someone
    else could have prepared: a symlink, not a directory, not ours, or writable by others.
    What is in it (sockets the CLI trusts, logs appended to) must be ours alone."""
    path = path or RUNTIME_DIR
    if not os.path.isabs(path):  # another directory for each command, and for the daemon
        raise FusecloneError(f"the runtime directory {path} is not an absolute path "
                             "(FUSECLONE_RUNTIME_DIR?)")
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
    """META's file in RUNTIME_DIR, named by META's identity so that every name of it finds the
    same file. A META that does not exist yet (a new clone) is named by its path until then."""
    try:
        st = os.stat(meta_path)
    except (FileNotFoundError, NotADirectoryError):
        digest = hashlib.sha256(os.fsencode(os.path.realpath(meta_path))).hexdigest()[:16]
        return os.path.join(RUNTIME_DIR, f"new-{digest}{suffix}")
    return os.path.join(RUNTIME_DIR, f"{st.st_dev:x}-{st.st_ino:x}{suffix}")


def socket_path(meta_path: str) -> str:
    return _runtime_file(meta_path, ".sock")


@dataclass(frozen=True)
class LostWritesReport:
    """What a mount lost of the cached writes the kernel had acknowledged (fuse.fs.LostWrites)."""

    bytes: int
    ranges: int
    summary: str


def record_lost_writes(meta_path: str, clone: bytes, lost_bytes: int, ranges: int,
                       summary: str | None) -> None:
    """What the mount of META (the clone whose uuid is CLONE), as it stops, leaves `unmount` to
    report (read once META is let go, when the mount cannot be asked any more): the cached
    writes it lost (SUMMARY), if any."""
    path = _runtime_file(meta_path, ".lost")
    if summary is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # an earlier mount's, whose stop nobody asked about
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"clone": clone.hex(), "bytes": lost_bytes, "ranges": ranges,
                   "summary": summary}, f)
    os.replace(tmp, path)


def lost_writes(meta_path: str, clone: bytes | None) -> LostWritesReport | None:
    """What the last mount of META lost of its cached writes, as it recorded them
    (record_lost_writes); None when it lost none. The report is named by META's identity, which
    a new META may take over from a deleted one (its inode reused): a report of another clone
    than CLONE (META's uuid; None: not known, any report is taken) is not this one's. A daemon
    of an earlier release (the package upgraded under its mount) named neither the clone nor
    the ranges: its report is taken, its ranges 0."""
    try:
        with open(_runtime_file(meta_path, ".lost")) as f:
            doc = json.load(f)
        report = LostWritesReport(doc["bytes"], doc.get("ranges", 0), doc["summary"])
        reported_clone = doc.get("clone")
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # the last: not an object
        return None
    if clone is not None and reported_clone is not None and reported_clone != clone.hex():
        return None
    if not all(isinstance(value, int) for value in (report.bytes, report.ranges)) \
            or not isinstance(report.summary, str):
        return None
    return report


def earlier_socket_path(meta_path: str) -> str:
    """Where a daemon of a release before sockets were named by META's identity (releases of
    format-1 METAs, until 2026-11-27) listens: named by META's resolved path."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(meta_path))).hexdigest()[:16]
    return os.path.join(RUNTIME_DIR, f"{digest}.sock")


DEFAULT_LOG_MAX = 4 << 20  # a default log this large is renamed to LOG.1 by the next mount


def log_path(meta_path: str) -> str:
    """Where a background mount of META logs unless told otherwise: one file per clone, kept
    after the mount ends (for its last words) and appended to by the next mount."""
    return _runtime_file(meta_path, ".log")


def rotate_log(meta_path: str) -> str:
    """The default log of META, renamed to LOG.1 first if it grew past DEFAULT_LOG_MAX: at
    most this mount's log plus one older file. Not while a live mount of META writes it (this
    mount will be refused): its log would move under it."""
    path = log_path(meta_path)
    try:
        if os.path.getsize(path) > DEFAULT_LOG_MAX and not _held_by_a_mount(meta_path):
            os.replace(path, path + ".1")
    except FileNotFoundError:
        pass
    return path


def _held_by_a_mount(meta_path: str) -> bool:
    """Whether a live mount holds META (its exclusive flock, metadata.py)."""
    try:
        fd = os.open(meta_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False  # no META yet (a new clone), or not ours to read: the mount says so
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def adopt_log(meta_path: str, current: str) -> str:
    """The default log a mount chose before it created META, moved to META's own name now that
    META exists; returns that name."""
    path = log_path(meta_path)
    if path != current:
        os.replace(current, path)
    return path


def remove_logs(meta_path: str) -> None:
    """Remove the default log of META, and its older file."""
    for path in (log_path(meta_path), log_path(meta_path) + ".1"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# ---- mountpoints: found in the mount table, never by looking inside a mount ---------------------


def mounts() -> list[tuple[str, str]]:
    """(META path, mountpoint) of every fuseclone mount on this machine."""
    from .fuse.mount import mount_table

    return [(source[len(FSNAME_PREFIX):], mountpoint) for source, mountpoint in mount_table()
            if source.startswith(FSNAME_PREFIX)]


def find_mount(path: str) -> tuple[str, str] | None:
    """(META, mountpoint) of the fuseclone mount at PATH, or None. Nothing here stats a
    mountpoint: the kernel would wait for that mount's daemon, which may be stopped."""
    from .fuse.mount import resolve_outside_mounts

    table = mounts()
    real = resolve_outside_mounts(path, {mountpoint for _, mountpoint in table})
    for meta, mountpoint in reversed(table):  # the last one: it hides those under it
        if mountpoint == real:
            return meta, mountpoint
    return None


def meta_of_mountpoint(path: str) -> str | None:
    found = find_mount(path)
    return found[0] if found else None


def mount_containing(path: str) -> str | None:
    """The fuseclone mountpoint that PATH lies inside (its image, say), looked at as
    `find_mount` does: nothing inside it is stat'ed."""
    from .fuse.mount import resolve_outside_mounts

    mountpoints = {mountpoint for _, mountpoint in mounts()}
    real = resolve_outside_mounts(path, mountpoints)
    return next((m for m in mountpoints if real.startswith(m.rstrip("/") + "/")), None)


def refuse_inside_a_mount(path: str, hint: str) -> None:
    """Refuse PATH, a mountpoint or META a command was given, when it lies inside a clone's
    mount (the image mount printed): before any stat of it, which waits for that mount's
    daemon, forever when it is stopped (and the image, read as META, was "not a fuseclone
    metadata file")."""
    mountpoint = mount_containing(path)
    if mountpoint is not None:
        raise FusecloneError(f"{path} lies inside the clone mounted at {mountpoint}: {hint}")


def resolve_target(target: str) -> str:
    """TARGET is a mountpoint or a META file; return the META path."""
    meta = meta_of_mountpoint(target)
    if meta is not None:
        return meta
    refuse_inside_a_mount(target, "name that mountpoint, or the clone's META")
    if os.path.isfile(target):
        return target
    if not os.path.exists(target):
        raise FusecloneError(f"{target}: no such mountpoint or metadata file")
    raise FusecloneError(f"{target}: not a fuseclone mountpoint or metadata file")


@dataclass(frozen=True)
class Reach:
    """How a command reaches the mount of its target: at META's control socket (named by
    META's identity), or, for a mountpoint whose fsname's META path names another clone's META
    now (META moved while mounted, and another clone made at its path), at the control socket
    of the daemon that serves that mountpoint's device (SOCKET)."""

    meta: str  # the target's META path: the fsname's, for a mountpoint
    socket: str | None = None

    def request(self, req: dict, timeout: float = REQUEST_TIMEOUT) -> dict | None:
        if self.socket is None:
            return request(self.meta, req, timeout)
        return request_at(self.socket, req, timeout)


SEARCH_TIMEOUT = 3.0  # seconds the daemons have, together, to say which one serves a device


def reach(target: str) -> Reach:
    """How to reach the mount of TARGET (a mountpoint or META). A mountpoint's daemon is told
    by the device of its mount (`Status.device`), which no META path can take over: one that
    META's path does not reach is looked for among the control sockets. Raises when META's
    path reaches another clone's daemon and none answers for this mountpoint."""
    meta = resolve_target(target)
    found = find_mount(target)
    device = _mount_device(found[1]) if found is not None else None
    if device is None:
        return Reach(meta)
    try:
        reply = request(meta, {"op": "status"})
    except NotAnswering:  # this mount's daemon, stopped, or another clone's at META's path
        serving = socket_serving(device, skip=socket_path(meta))
        if serving is None:
            raise
        return Reach(meta, serving)
    except FusecloneError:  # it closed the connection unanswered: the command finds out
        return Reach(meta)
    answered = _device_in(reply)
    if reply is not None and answered in (None, device):  # None: a daemon before 2026-11-29
        return Reach(meta)
    serving = socket_serving(device, skip=socket_path(meta))
    if serving is not None:
        return Reach(meta, serving)
    if reply is None:
        return Reach(meta)  # its daemon is gone: a stale mount, cleaned as such
    raise FusecloneError(f"{target}: {meta} is another clone's metadata now (the one mounted at "
                         f"{reply.get('mountpoint')}; META was moved, and another clone made at "
                         f"its path?), and the mount at {target} does not answer")


def _mount_device(real_mountpoint: str) -> str | None:
    from .fuse.mount import mount_device

    return mount_device(real_mountpoint)


def _device_in(reply: object) -> str | None:
    """The mount device a daemon's status reply names (None: no status, or an earlier release)."""
    if not isinstance(reply, dict) or not isinstance(reply.get("status"), dict):
        return None
    device = reply["status"].get("device")
    return device if isinstance(device, str) else None


def socket_serving(device: str, skip: str | None = None,
                   timeout: float = SEARCH_TIMEOUT) -> str | None:
    """The control socket (but SKIP) whose daemon serves the FUSE mount of DEVICE, asked in
    turn within TIMEOUT seconds for all (one that does not answer costs a second at most);
    None if none says so."""
    deadline = time.monotonic() + timeout
    for path in control_sockets():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if path == skip:
            continue
        try:
            reply = request_at(path, {"op": "status"}, min(remaining, 1.0))
        except (FusecloneError, OSError, ValueError):  # the last: not JSON
            continue
        if _device_in(reply) == device:
            return path
    return None


def daemon_gone(meta_path: str) -> bool:
    """Whether the daemon of META's mount was killed: its control socket (or an earlier
    release's, see `request`) is still there but nobody listens. A stopped daemon still
    listens, and a missing socket proves nothing (a daemon on its way out removes it): neither
    counts."""
    refused = False
    for path in (socket_path(meta_path), earlier_socket_path(meta_path)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            try:
                sock.connect(path)
            except ConnectionRefusedError:
                refused = True
                continue
            except FileNotFoundError:
                continue
            except BlockingIOError:  # a full backlog: someone listens
                return False
        return False
    return refused


def cleanup_stale_mount(path: str) -> bool:
    """If PATH is a fuseclone mount whose daemon was killed, detach it and return True. A live
    mount, and one whose daemon is stopped, is left alone; one that another filesystem is
    mounted over is refused (CoveredError): a detach would reach that filesystem."""
    from .fuse.mount import check_clone_on_top, unmount

    found = find_mount(path)
    if found is None or not daemon_gone(found[0]):
        return False
    # The daemon at META's path is gone; it may be another clone's, made there after this
    # mount's META was moved away, while this mount's daemon serves on.
    device = _mount_device(found[1])
    if device is not None and socket_serving(device, skip=socket_path(found[0])) is not None:
        return False
    check_clone_on_top(found[1])
    log.warning("%s: cleaning the stale mount of a daemon that is gone", path)
    unmount(found[1], lazy=True)
    return True


# ---- client (blocking: the CLI is synchronous) -----------------------------------------------


class NotAnswering(FusecloneError):
    """The mount's daemon accepted the connection but did not answer in time."""

    def __init__(self, mount: str, pid: int | None) -> None:
        self.pid = pid
        super().__init__(f"{mount} does not answer ({why_not_answering(pid)})")


def why_not_answering(pid: int | None) -> str:
    """What the kernel says the daemon PID is doing, for a user who asked it and got no
    answer: stopped (SIGSTOP), or waiting inside the kernel, as on a frozen (`fsfreeze`) or
    hung filesystem under DST or META, where no command can get an answer until it moves."""
    if not pid:
        return "is its daemon stopped? pid unknown"
    try:
        state, waits_in = _task_state(f"/proc/{pid}")
    except (OSError, IndexError):
        return f"is its daemon stopped? pid {pid}"
    if state in ("T", "t"):
        return f"its daemon, pid {pid}, is stopped: kill -CONT {pid}"
    if state != "D":  # its event loop is not held: one of its worker threads may be
        waits_in = next((task_waits for task_state, task_waits in _thread_states(pid)
                         if task_state == "D"), None)
        if waits_in is None:
            return f"its daemon, pid {pid}, is busy or hung"
    return (f"its daemon, pid {pid}, waits inside the kernel ({waits_in or 'unknown'}): "
            "is the filesystem of DST or META frozen (fsfreeze -u) or its disk hung?")


def _task_state(task_dir: str) -> tuple[str, str]:
    """A process's or thread's state letter (ps's STAT) and where in the kernel it waits."""
    with open(f"{task_dir}/stat", "rb") as f:
        state = f.read().rsplit(b")", 1)[1].split()[0].decode()
    with open(f"{task_dir}/wchan") as f:
        return state, f.read().strip()


def _thread_states(pid: int) -> list[tuple[str, str]]:
    """`_task_state` of each thread of PID that can still be read."""
    states = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        try:
            states.append(_task_state(f"/proc/{pid}/task/{task}"))
        except (OSError, IndexError):
            continue  # gone meanwhile
    return states


def request(meta_path: str, req: dict, timeout: float = REQUEST_TIMEOUT) -> dict | None:
    """Send one request to the mount of META and return its answer within TIMEOUT seconds
    (connecting, sending and receiving); None when no mount is listening."""
    # A daemon of an earlier release (the package upgraded while it stays mounted) listens at
    # the earlier name.
    return _request_at((socket_path(meta_path), earlier_socket_path(meta_path)), req, timeout,
                       f"the mount of {meta_path}")


def request_at(path: str, req: dict, timeout: float = REQUEST_TIMEOUT) -> dict | None:
    """`request` to the mount listening at the control socket PATH (one of `control_sockets`)."""
    return _request_at((path,), req, timeout, f"the mount at {path}")


def control_sockets() -> list[str]:
    """The control sockets in the runtime directory: every live mount of this user's has one,
    in whichever mount namespace it was made (and a killed daemon leaves its own)."""
    try:
        names = os.listdir(RUNTIME_DIR)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(os.path.join(RUNTIME_DIR, name) for name in names if name.endswith(".sock"))


def _request_at(paths: tuple[str, ...], req: dict, timeout: float, mount: str) -> dict | None:
    """Send REQ to the mount listening at the first of PATHS that one listens at (MOUNT says
    which mount, for a NotAnswering)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            if not any(_connect(sock, path, deadline) for path in paths):
                return None
            sock.settimeout(_remaining(deadline))
            sock.sendall(json.dumps(req).encode() + b"\n")
            data = _receive_line(sock, deadline)
        except TimeoutError:
            raise NotAnswering(mount, _peer_pid(sock)) from None
        except (ConnectionResetError, BrokenPipeError):  # the mount closed while we waited
            data = b""
        if not data:
            raise FusecloneError("the mount closed the control connection without answering")
        reply = json.loads(data)
        if isinstance(reply, dict) and "pid" in reply:
            # The daemon's pid as this process sees it: one in a PID namespace of its own
            # (`unshare --pid`, a container) knows itself by another number.
            reply["pid"] = _peer_pid(sock) or reply["pid"]
    return reply


def _connect(sock: socket.socket, path: str, deadline: float) -> bool:
    """Connect before DEADLINE; False when nobody listens. A full backlog (a crowd of clients,
    or a stopped daemon) answers EAGAIN at once: try again until the deadline."""
    sock.setblocking(False)
    pause = 0.005
    while True:
        try:
            sock.connect(path)
            return True
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except BlockingIOError:
            if time.monotonic() + pause > deadline:
                raise TimeoutError from None
            time.sleep(pause)
            pause = min(pause * 2, 0.1)


def _receive_line(sock: socket.socket, deadline: float) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        sock.settimeout(_remaining(deadline))
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    return remaining


def _peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process that listens on the other end (the daemon), from the kernel:
    known even while that process is stopped."""
    creds = struct.Struct("3i")
    try:
        pid, _, _ = creds.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, creds.size))
    except OSError:  # not connected: the backlog stayed full
        return None
    return pid or None


# ---- requests: their shape, checked before anything is done (sans-IO) --------------------------


class RequestError(ValueError):
    """A request of the wrong shape; its message is the answer's error."""


_REQUIRED = object()


@dataclass(frozen=True)
class _Field:
    kind: str  # what the field must be, for the error
    valid: Callable[[Any], bool]
    default: Any = _REQUIRED


def _is_seconds(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value >= 0 and (isinstance(value, int) or math.isfinite(value))


REQUESTS: dict[str, dict[str, _Field]] = {
    "status": {},
    "message": {"text": _Field("a string", lambda v: isinstance(v, str))},
    "wait": {"timeout": _Field("a finite number of seconds, 0 or more", _is_seconds, default=60)},
    "unmount": {"lazy": _Field("true or false", lambda v: isinstance(v, bool), default=False),
                # the mountpoint the CLI means (as the mount table has it): a mount at another
                # refuses, since META's path may name another mount's META by now
                "mountpoint": _Field("a path or null", lambda v: v is None or isinstance(v, str),
                                     default=None)},
}


def parse_request(line: bytes) -> dict:
    """LINE as a request with every field present and valid (defaults filled in), or
    RequestError saying what is wrong."""
    try:
        req = json.loads(line)
    except (ValueError, RecursionError):
        raise RequestError("a request is one JSON object per line") from None
    if not isinstance(req, dict):
        raise RequestError("a request is a JSON object")
    op = req.get("op")
    if not isinstance(op, str) or op not in REQUESTS:
        raise RequestError(f"\"op\" must be one of {', '.join(REQUESTS)}")
    fields = REQUESTS[op]
    unknown = [name for name in req if name != "op" and name not in fields]
    if unknown:
        raise RequestError(f"{op} takes no field {_short(unknown[0])}")
    parsed = {"op": op}
    for name, field in fields.items():
        if name not in req:
            if field.default is _REQUIRED:
                raise RequestError(f"{op} needs \"{name}\"")
            parsed[name] = field.default
        elif field.valid(req[name]):
            parsed[name] = req[name]
        else:
            raise RequestError(f"\"{name}\" of {op} must be {field.kind}")
    return parsed


def _short(text: str, limit: int = 40) -> str:
    return json.dumps(text if len(text) <= limit else text[:limit] + "...")
