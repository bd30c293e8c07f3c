"""The mount's side of the control channel (control.py has the protocol and the CLI's side):
listens on META's control socket in the mount's nursery and answers each request with the
mount's handler.

Apart from control.py so that the commands that only ask a mount (status, wait, unmount, list)
do not import trio.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import select
import socket
from dataclasses import asdict
from typing import Any, Awaitable, Callable

import trio

from .control import (ACCEPT_RESOURCE_ERRNOS, ANSWER_TIMEOUT, LONG_REQUESTS, MAX_CLIENTS,
                      MAX_REQUEST, MAX_WAITS, REQUEST_TIMEOUT, RequestError, ensure_runtime_dir,
                      parse_request, socket_path)
from .errors import FusecloneError

log = logging.getLogger(__name__)

FOLLOW_META_INTERVAL = 0.5  # seconds between looks at which file META's path names


Handler = Callable[[dict], Awaitable[dict]]


async def serve_control(meta_path: str, handle: Handler,
                        path_names_another_clone: Callable[[], bool] = lambda: True,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listen on META's control socket until cancelled; remove the socket afterwards. HANDLE
    gets requests that parse_request accepted. PATH_NAMES_ANOTHER_CLONE: whether META's path
    names another clone's metadata now (see _follow_meta_name)."""
    path = socket_path(meta_path)
    ensure_runtime_dir()
    _remove_stale_socket(path)
    names = [path]
    listeners: list[trio.socket.SocketType] = []
    ours: set[tuple[int, int]] = set()  # (st_dev, st_ino) of each socket bound at PATH
    try:
        await _listen(path, listeners, ours)
        task_status.started(path)
        clients = trio.Semaphore(MAX_CLIENTS)
        waits = trio.Semaphore(MAX_WAITS)
        async with trio.open_nursery() as nursery:

            def accept_on(listener: trio.socket.SocketType) -> None:
                nursery.start_soon(_accept_connections, listener, handle, clients, waits, nursery)

            accept_on(listeners[0])
            nursery.start_soon(_follow_meta_name, meta_path, names, path_names_another_clone)
            nursery.start_soon(_listen_again_once_removed, path, listeners, ours, accept_on)
    finally:
        for listener in listeners:
            listener.close()
        _remove_names(names, ours)


async def _listen(path: str, listeners: list[trio.socket.SocketType],
                  ours: set[tuple[int, int]]) -> None:
    """A listening socket bound at PATH (mode 0600), added to LISTENERS, its identity to OURS."""
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)
        try:
            await listener.bind(path)
        finally:
            os.umask(old_umask)
        listener.listen(socket.SOMAXCONN)
        bound = os.stat(path)
    except BaseException:
        listener.close()  # a retry every interval must not keep a socket each time
        raise
    listeners.append(listener)
    ours.add((bound.st_dev, bound.st_ino))


async def _accept_connections(listener: trio.socket.SocketType, handle: Handler,
                              clients: trio.Semaphore, waits: trio.Semaphore,
                              nursery: trio.Nursery) -> None:
    while True:
        await clients.acquire()
        conn = await _accept(listener)
        nursery.start_soon(_serve_connection, conn, handle, clients, waits)


async def _listen_again_once_removed(path: str, listeners: list[trio.socket.SocketType],
                                     ours: set[tuple[int, int]],
                                     accept_on: Callable[[trio.socket.SocketType], None]) -> None:
    """Bind the socket at PATH again when it is gone (the runtime directory removed, say by
    `rm -rf /run/fuseclone`): else no command could reach this mount any more, `unmount`
    included. The old listener stays open for the clients that still hold its address."""
    failing = None
    while True:
        await trio.sleep(FOLLOW_META_INTERVAL)
        if os.path.lexists(path):
            continue
        try:
            ensure_runtime_dir()
            await _listen(path, listeners, ours)
        except (OSError, FusecloneError) as exc:
            if str(exc) != failing:
                log.warning("control socket %s was removed, and cannot be made again: %s", path,
                            exc)
                failing = str(exc)
            continue
        failing = None
        log.warning("control socket %s was removed (with its runtime directory?): listening "
                    "there again", path)
        accept_on(listeners[-1])
        _log_again_in(os.path.dirname(path))


def _log_again_in(directory: str) -> None:
    """A log file in DIRECTORY that went with it (the default log, in the runtime directory)
    is made again at its name: the log goes on where `status` says it is, not into a deleted
    file."""
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler) or handler.stream is None:
            continue
        path = handler.baseFilename
        if os.path.dirname(path) != directory or os.path.lexists(path):
            continue
        try:
            new = handler._open()  # the handler's own way to open it (cli._LogFile)
        except OSError as exc:
            log.warning("log file %s was removed, and cannot be made again: %s", path, exc)
            continue
        with new, handler.lock:
            handler.flush()
            # Onto the same descriptor, not a new stream: the mount holds the log's flock
            # through it (daemon._holding_the_log) and lets go of it by it at the end.
            fd = handler.stream.fileno()
            os.dup2(new.fileno(), fd, inheritable=False)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as claims.hold held the old one
        except OSError as exc:
            log.warning("log file %s made again, but cannot be held: %s", path, exc)
        log.warning("log file %s was removed (with its runtime directory?): logging there "
                    "again", path)


def _remove_names(names: list[str], ours: set[tuple[int, int]]) -> None:
    """Remove the socket's names that still are this mount's sockets (OURS: their st_dev,
    st_ino): one that META's path gave it may be a newer mount's by now, of a new META at
    that path."""
    for name in names:
        try:
            st = os.stat(name)
            if name == names[0] or (st.st_dev, st.st_ino) in ours:
                os.unlink(name)
        except FileNotFoundError:
            pass


async def _follow_meta_name(meta_path: str, names: list[str],
                            path_names_another_clone: Callable[[], bool]) -> None:
    """Keep the socket reachable by META's name, which the mount table gives for the
    mountpoint. The socket is named by META's identity, so a META moved away, deleted or
    renamed over while mounted (the mount then writes its last good commit again under that
    name, metadata.py) would leave the mount out of reach of every command, `unmount`
    included: the socket gets a second name (a hard link) for what META's path names now (a
    missing file's name, while it is missing). Never another clone's META's, one made at that
    path meanwhile: its commands are its own."""
    while True:
        await trio.sleep(FOLLOW_META_INTERVAL)
        current = socket_path(meta_path)
        if current in names or path_names_another_clone():
            continue
        try:
            os.link(names[0], current)
        except FileExistsError:  # another mount's socket, or a killed one's: not ours to take
            continue
        names.append(current)
        log.warning("control socket: %s names another file now, or none; the socket is also "
                    "reachable as %s", meta_path, current)


async def _accept(listener: trio.socket.SocketType) -> trio.socket.SocketType:
    """The next connection. Out of descriptors or memory, the mount waits and tries again: the
    clients wait in the backlog meanwhile."""
    while True:
        try:
            conn, _ = await listener.accept()
            return conn
        except OSError as exc:
            if exc.errno == errno.ECONNABORTED:
                continue
            if exc.errno not in ACCEPT_RESOURCE_ERRNOS:
                raise
            log.warning("control socket: %s; accepting again in 0.1 s", os.strerror(exc.errno))
            await trio.sleep(0.1)


def _remove_stale_socket(path: str) -> None:
    """A socket left by a killed mount answers nothing: remove it. A live one means the META is
    in use, which the metadata lock has already refused."""
    if os.path.exists(path):
        os.unlink(path)


async def _serve_connection(conn: trio.socket.SocketType, handle: Handler,
                            clients: trio.Semaphore, waits: trio.Semaphore) -> None:
    """One request, one answer. Whatever the client does (garbage, silence, hanging up) is its
    own problem: logged at debug level, never raised into the mount. The connection holds one
    of the CLIENTS slots; a long request (a wait) trades it for one of the WAITS slots once it
    is read, so that pending waits never keep a status or an unmount from being answered."""
    slot = clients
    try:
        async with trio.SocketStream(conn) as stream:
            line = await _receive_request_line(stream)
            if line is None:
                return
            try:
                req = parse_request(line)
            except RequestError as exc:
                await _send_answer(stream, _encode({"ok": False, "error": str(exc)}))
                return
            if req["op"] in LONG_REQUESTS:
                try:
                    waits.acquire_nowait()
                except trio.WouldBlock:
                    error = f"{MAX_WAITS} waits are pending on this mount already: try again later"
                    await _send_answer(stream, _encode({"ok": False, "error": error}))
                    return
                clients.release()
                slot = waits
            await _answer_unless_hung_up(stream, handle, req)
    finally:
        slot.release()


async def _receive_request_line(stream: trio.SocketStream) -> bytes | None:
    """The request line, or None (after answering why, if the client can read it): the client
    hung up, was silent for REQUEST_TIMEOUT, or sent more than MAX_REQUEST bytes."""
    buf = b""
    with trio.move_on_after(REQUEST_TIMEOUT):
        while b"\n" not in buf:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError as exc:
                chunk = b""
                log.debug("control client: %s", exc.__cause__ or exc)
            if not chunk:
                log.debug("control client hung up before a whole request")
                return None
            buf += chunk
            if len(buf) > MAX_REQUEST and b"\n" not in buf[:MAX_REQUEST + 1]:
                error = f"a request is at most {MAX_REQUEST} bytes"
                await _send_answer(stream, _encode({"ok": False, "error": error}))
                return None
        return buf.split(b"\n", 1)[0]
    log.debug("control client sent no whole request in %.0f s", REQUEST_TIMEOUT)
    return None


async def _answer_unless_hung_up(stream: trio.SocketStream, handle: Handler, req: dict) -> None:
    """Answer REQ, unless the client hangs up first: then its request (a wait, say) is
    cancelled rather than kept for nobody. A request whose client is gone already (it gave up
    on a stopped daemon, which now runs again) is not acted on at all."""
    if _hung_up(stream.socket):
        log.debug("control client hung up before %s was read: not acting on it", req["op"])
        return
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as handling:
            nursery.start_soon(_cancel_when_hung_up, stream.socket, handling, req["op"])
            answer = await _handle_safely(handle, req)
        nursery.cancel_scope.cancel()  # stop watching
        if not handling.cancelled_caught:
            await _send_answer(stream, answer)


async def _cancel_when_hung_up(sock: trio.socket.SocketType, handling: trio.CancelScope,
                               op: str) -> None:
    """Cancel HANDLING once the client has closed its end (POLLHUP: it can no longer read an
    answer). A client that only shut down its sending side, or sent more, is not watched."""
    await trio.lowlevel.wait_readable(sock)
    if _hung_up(sock):
        log.debug("control client hung up before the answer to %s", op)
        handling.cancel()


def _hung_up(sock: trio.socket.SocketType) -> bool:
    """Whether the client closed its end: POLLHUP, not just a shut-down sending side."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


async def _handle_safely(handle: Handler, req: dict) -> bytes:
    """HANDLE's answer to REQ, encoded. A failure is a bug: logged with its traceback and
    answered with an error, never raised into the mount (cancellation still goes through)."""
    try:
        return _encode(await handle(req))
    except Exception:
        log.exception("control request %s failed", req["op"])
        return _encode({"ok": False, "error": f"{req['op']} failed in the mount (see its log)"})


async def _send_answer(stream: trio.SocketStream, answer: bytes) -> None:
    """Send ANSWER, also when this task is being cancelled (shielded, briefly): an "unmount"
    request cancels the nursery the connection lives in, and its answer must still reach the
    waiting CLI. A client gone meanwhile is only logged."""
    with trio.move_on_after(ANSWER_TIMEOUT) as scope:
        scope.shield = True
        try:
            await stream.send_all(answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("control client went away before its answer: %s", exc.__cause__ or exc)
    if scope.cancelled_caught:
        log.debug("control client did not read its answer in %.0f s", ANSWER_TIMEOUT)


def _encode(answer: dict) -> bytes:
    return json.dumps(answer, default=_jsonable).encode() + b"\n"


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")
