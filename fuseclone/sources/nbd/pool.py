"""The NBD source's connection pool: sockets in the transmission phase, dialled and handshaken,
with one reader task each that routes replies to their requests by cookie.

Several connections when the server advertises NBD_FLAG_CAN_MULTI_CONN, else one; callers take
the least loaded. A dropped pool is re-dialled by the next request, with exponential backoff
between failed attempts; a request during an outage fails after at most one connection attempt
instead of hanging. The readers run in the nursery the source's opener owns.

Inside TLS (nbds://) a connection's bytes go through trio's SSLStream: its reader receives
decrypted bytes and the codec copies them into the read's buffer (one copy more than the
plain socket's `recv_into` straight into it).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
import ssl
from typing import TYPE_CHECKING, Callable

import trio

from ...errors import SourceError
from ..base import SourceReadError
from . import wire
from .handshake import Handshake
from .tls import TlsClient, describe_failure, tls_client
from .transmission import BlockStatus, ReplyDone, Transmission

if TYPE_CHECKING:
    from .source import NbdAddress, NbdOptions

log = logging.getLogger(__name__)

DRAIN_TIMEOUT = 1.0  # seconds a close waits for replies already asked for
DISCONNECT_TIMEOUT = 1.0  # seconds NBD_CMD_DISC may take to go out through TLS
TLS_RECEIVE_SIZE = 256 * 1024


class Request:
    __slots__ = ("conn", "done", "error", "descriptors", "nbytes", "what")

    def __init__(self, conn: Connection, nbytes: int, what: str) -> None:
        self.conn = conn
        self.done = trio.Event()
        self.error: SourceReadError | None = None
        self.descriptors: list[tuple[int, int]] = []
        self.nbytes = nbytes
        self.what = what


class Connection:
    """One socket in the transmission phase, its codec and the requests waiting on it."""

    def __init__(self, sock: socket.socket, info: wire.ExportInfo, codec: Transmission,
                 number: int, url: str, tls: trio.SSLStream | None = None) -> None:
        self.url = url
        self.sock = sock
        self.tls = tls  # the TLS stream over sock, for nbds://
        self.info = info
        self.codec = codec
        self.number = number
        self.waiting: dict[int, Request] = {}
        self.load = 0  # bytes requested and not yet answered
        self.usable = True  # accepts new requests
        self.alive = True  # socket open, reader running
        self.draining = False  # got ESHUTDOWN: no new requests, disconnect when idle
        self.reason = ""
        self._slow_senders = 0
        self._send_lock = trio.StrictFIFOLock()

    async def send(self, data: bytes, timeout: float) -> None:
        """Send one whole message; messages from concurrent callers never interleave."""
        if not self.alive:
            raise SourceReadError(errno.ECONNRESET, f"{self.url}: connection lost: {self.reason}")
        if self.tls is None and not self._slow_senders:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.kill(f"send failed: {exc}")
                raise SourceReadError(exc.errno or errno.EIO,
                                      f"{self.url}: connection lost: {self.reason}") from None
            if sent == len(data):
                return
            data = data[sent:]
        # The socket buffer is full (or TLS has to encrypt the message): queue behind earlier
        # slow senders. A half-sent message must be finished whatever happens to the caller,
        # or the stream is corrupt.
        self._slow_senders += 1
        try:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + timeout
                async with self._send_lock:
                    await (self._send_plain(data) if self.tls is None else self._send_tls(data))
            if scope.cancelled_caught:
                self.kill(f"could not send a request within {timeout:g} s")
        except trio.ClosedResourceError:
            pass
        finally:
            self._slow_senders -= 1
        if not self.alive:
            raise SourceReadError(errno.ECONNRESET, f"{self.url}: connection lost: {self.reason}")

    async def _send_plain(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self.alive:
            await trio.lowlevel.wait_writable(self.sock)
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                continue
            except OSError as exc:
                self.kill(f"send failed: {exc}")
                break
            view = view[sent:]

    async def _send_tls(self, data: bytes) -> None:
        try:
            await self.tls.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.kill(self.reason or describe_failure(exc))

    async def disconnect(self, reason: str) -> None:
        """NBD_CMD_DISC, best effort and never waiting long, then close."""
        if self.alive and self.tls is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(DISCONNECT_TIMEOUT):
                async with self._send_lock:
                    await self._send_tls(self.codec.disconnect())
        self.disconnect_now(reason)

    def disconnect_now(self, reason: str) -> None:
        """NBD_CMD_DISC where it goes out without waiting (a plain socket), then close. Inside
        TLS it would need an await; a server that is shutting down does without it."""
        if self.alive and self.tls is None:
            with contextlib.suppress(OSError):
                self.sock.send(self.codec.disconnect())  # never blocks
        self.kill(reason)

    def kill(self, reason: str) -> None:
        """Close the socket; every request waiting on it fails with SourceReadError."""
        if not self.alive:
            return
        self.alive = self.usable = False
        self.reason = reason
        try:
            trio.lowlevel.notify_closing(self.sock)  # wakes the reader blocked on it
        except Exception:  # pragma: no cover - not registered with trio yet
            pass
        self.sock.close()
        waiting, self.waiting = self.waiting, {}
        for request in waiting.values():
            request.error = SourceReadError(errno.ECONNRESET,
                                            f"{self.url}: {request.what}: connection lost ({reason})")
            request.done.set()
        self.load = 0



class ConnectionPool:
    """The connections to one NBD export, dialled on demand."""

    def __init__(self, address: NbdAddress, options: NbdOptions) -> None:
        self.address = address
        self.options = options
        self._tls: TlsClient | None = (
            tls_client(address.url, address.host, address.tls_certificates) if address.tls else None)
        self._info: wire.ExportInfo | None = None
        self._conns: list[Connection] = []
        self._target = 1
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._numbers = 0
        self._reconnect_lock = trio.Lock()
        self._filling = False
        self._drained: trio.Event | None = None  # while a close waits: set once nothing is in flight
        self._backoff = 0.0
        self._next_attempt = 0.0
        self._last_error = ""
        self.heard_at = -float("inf")  # trio time the server last sent anything, on any connection
        self.reconnects = 0  # connections re-dialled after a loss (for tests and status)
        #: Called when a connection is lost: the server may have changed while it was away.
        self.on_connection_lost: Callable[[], None] = lambda: None

    @property
    def info(self) -> wire.ExportInfo:
        assert self._info is not None
        return self._info

    @property
    def nursery(self) -> trio.Nursery | None:
        """Where background work runs, while the pool is open."""
        return None if self._closed else self._nursery

    @property
    def dialled(self) -> int:
        """Connections dialled so far: each may have reached a server restarted meanwhile."""
        return self._numbers

    @property
    def open_connections(self) -> int:
        return sum(1 for c in self._conns if c.alive)

    async def close(self) -> None:
        """Let the replies already asked for arrive (for at most DRAIN_TIMEOUT), disconnect
        politely (NBD_CMD_DISC), close every socket, stop the readers."""
        if self._closed:
            return
        self._closed = True
        await self._await_replies()
        for conn in self._conns:
            await conn.disconnect("source closed")
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _await_replies(self) -> None:
        # A socket closed under replies still being sent makes the server fail its writes
        # (nbdkit 1.32 logged "Broken pipe", and once aborted on an assertion). Hydration's
        # paced depth is about 0.2 s of replies, so the wait is short; a hung server is not
        # waited for long. Shielded: the caller is usually being cancelled.
        # Woken (`_note_drained`) by the last reply, a connection's end, or the end of dialling.
        self._drained = trio.Event()
        self._note_drained()
        with trio.CancelScope(shield=True), trio.move_on_after(DRAIN_TIMEOUT):
            await self._drained.wait()

    def _note_drained(self) -> None:
        """While a close waits: wake it once no reply is awaited and no connection is being
        dialled."""
        if self._drained is not None and not (
                self._filling or any(conn.alive and conn.waiting for conn in self._conns)):
            self._drained.set()

    async def answered(self, request: Request, asked_at: float) -> bool:
        """Wait for the reply to `request`, asked for at `asked_at`, while the server is heard
        from; False once it has sent nothing, on any connection, for `timeout` seconds since
        then (hung, or the network is). A slow server is waited for, however long a reply
        takes: replies on one connection come one after another, and a rate limit may be the
        server's as a whole, so a read asked for behind others waits for them."""
        while not request.done.is_set():
            silent_until = max(self.heard_at, asked_at) + self.options.timeout
            if trio.current_time() >= silent_until:
                return False
            with trio.move_on_at(silent_until):
                await request.done.wait()
        return True

    # ---- the connection pool --------------------------------------------------------------

    async def connection(self, what: str) -> Connection:
        """The least loaded usable connection; re-dial when there is none."""
        best = None
        usable = 0
        for conn in self._conns:
            if conn.usable:
                usable += 1
                if best is None or conn.load < best.load:
                    best = conn
        if best is not None:
            if (usable < self._target and not self._filling and not self._closed
                    and trio.current_time() >= self._next_attempt and self._nursery is not None):
                self._filling = True
                self._nursery.start_soon(self._refill)
            return best
        return await self._reconnect(what)

    async def _reconnect(self, what: str) -> Connection:
        async with self._reconnect_lock:
            for conn in self._conns:
                if conn.usable:
                    return conn
            if self._closed:
                raise SourceReadError(errno.ESHUTDOWN, f"{self.address.url}: source closed")
            now = trio.current_time()
            if now < self._next_attempt:
                raise SourceReadError(errno.ECONNREFUSED, (
                    f"{self.address.url}: {what}: server unreachable ({self._last_error}); "
                    f"next attempt in {self._next_attempt - now:.1f} s"))
            try:
                conn = await self._dial()
            except SourceReadError as exc:
                self._failed_attempt(exc.strerror)
                raise SourceReadError(exc.errno, f"{self.address.url}: {what}: cannot reconnect: "
                                      f"{exc.strerror}") from None
            self._attempt_succeeded()
            self.reconnects += 1
            self._follow_server(conn.info)
            self._adopt(conn)
            log.info("%s: reconnected", self.address.url)
            if self._target > 1 and not self._filling and self._nursery is not None:
                self._filling = True
                self._nursery.start_soon(self._refill)
            return conn

    def _failed_attempt(self, reason: str) -> None:
        o = self.options
        self._backoff = min(o.reconnect_max, self._backoff * 2 if self._backoff else o.reconnect_initial)
        self._next_attempt = trio.current_time() + self._backoff
        self._last_error = reason

    def _attempt_succeeded(self) -> None:
        self._backoff = 0.0
        self._next_attempt = 0.0

    async def _refill(self) -> None:
        """Bring the pool back to its target size (in the background)."""
        try:
            missing = self._target - sum(1 for c in self._conns if c.usable)
            async with trio.open_nursery() as nursery:
                for _ in range(max(0, missing)):
                    nursery.start_soon(self._add_one)
        finally:
            self._filling = False
            self._note_drained()

    async def _add_one(self) -> None:
        try:
            conn = await self._dial()
        except SourceReadError as exc:
            self._failed_attempt(exc.strerror)
            log.debug("%s: extra connection failed: %s", self.address.url, exc.strerror)
            return
        if self._closed:
            await conn.disconnect("source closed")
            return
        if _request_shape(conn.info) != _request_shape(self.info):
            # Requests are cut to one shape for the whole pool; the connections still open
            # hold the old one. The server restarted: they will go, and the reconnect that
            # follows takes the new shape.
            log.info("%s: an extra connection found other block sizes or flags (%s); not used",
                     self.address.url, _describe_shape(conn.info))
            await conn.disconnect("other block sizes or flags")
            return
        self._attempt_succeeded()
        self._adopt(conn)

    async def fill(self) -> None:
        if self._target > 1:
            self._filling = True
            await self._refill()

    def start(self, nursery: trio.Nursery, first: Connection) -> None:
        self._nursery = nursery
        self._info = first.info
        self._target = self._target_for(first.info)
        self._adopt(first)

    def _target_for(self, info: wire.ExportInfo) -> int:
        return max(1, self.options.connections) if info.can_multi_conn else 1

    def _follow_server(self, info: wire.ExportInfo) -> None:
        """A reconnect with no connection left open: the server may have restarted with other
        block sizes or flags (its size was checked by `_dial`). Requests from now on follow
        the new ones; with the old, every read would fail (EINVAL) until the next mount."""
        if _request_shape(info) != _request_shape(self.info):
            log.warning("%s: the export's block sizes or flags changed on reconnect: %s, was %s",
                        self.address.url, _describe_shape(info), _describe_shape(self.info))
        self._info = info
        self._target = self._target_for(info)

    def _adopt(self, conn: Connection) -> None:
        assert self._nursery is not None
        self._conns = [c for c in self._conns if c.alive]
        self._conns.append(conn)
        self._nursery.start_soon(self._reader if conn.tls is None else self._tls_reader, conn)

    # ---- dialling -------------------------------------------------------------------------

    async def dial_first(self) -> Connection:
        """The first connection; failures are SourceErrors naming the URL."""
        try:
            conn = await self._dial()
        except SourceReadError as exc:
            raise SourceError(f"{self.address.url}: {exc.strerror}") from None
        return conn

    async def _dial(self) -> Connection:
        """Connect and handshake. Raises SourceReadError with a one-line reason."""
        timeout = self.options.connect_timeout
        sock = None
        try:
            with trio.fail_after(timeout):
                sock = await self._connect_socket()
                info, leftover, tls = await self._handshake(sock)
        except trio.TooSlowError:
            if sock is not None:
                sock.close()
            stage = "connect" if sock is None else "the NBD handshake"
            raise SourceReadError(errno.ETIMEDOUT, f"no answer to {stage} within {timeout:g} s "
                                  "(is it an NBD server?)") from None
        except wire.NBDError as exc:
            sock.close()
            raise SourceReadError(errno.EPROTO, str(exc)) from None
        except trio.BrokenResourceError as exc:  # inside TLS, or TLS itself failed
            sock.close()
            raise SourceReadError(errno.EPROTO, describe_failure(exc)) from None
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise SourceReadError(exc.errno or errno.EIO,
                                  f"cannot connect to {self.address.where}: {_reason(exc)}") from None
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        if self._info is not None:
            if info.size != self._info.size:
                sock.close()
                raise SourceReadError(errno.EIO, f"the export's size changed from {self._info.size} "
                                      f"to {info.size} bytes")
        codec = Transmission(info, header_buffer=self.options.header_buffer)
        if leftover:
            codec.receive_data(leftover)  # unexpected, but parsed like any reply (and refused)
        self._numbers += 1
        return Connection(sock, info, codec, self._numbers, self.address.url, tls)

    async def _connect_socket(self) -> socket.socket:
        a = self.address
        if a.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await trio.socket.from_stdlib_socket(sock).connect(a.socket_path)
            except BaseException:
                sock.close()
                raise
            return sock
        infos = await trio.socket.getaddrinfo(a.host, a.port, type=socket.SOCK_STREAM)
        last: OSError | None = None
        for family, kind, protocol, _, address in infos:
            sock = socket.socket(family, kind, protocol)
            try:
                await trio.socket.from_stdlib_socket(sock).connect(address)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            except BaseException:
                sock.close()
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            return sock
        raise last or OSError(errno.EHOSTUNREACH, "no address")

    async def _handshake(self, sock: socket.socket
                         ) -> tuple[wire.ExportInfo, bytes, trio.SSLStream | None]:
        """The NBD handshake; with TLS, the TLS stream it continued in."""
        hs = Handshake(self.address.export, structured_replies=True,
                       meta_contexts=(wire.CONTEXT_BASE_ALLOCATION,) if self.options.block_status else (),
                       tls=self._tls is not None)
        tsock = trio.socket.from_stdlib_socket(sock)
        tls: trio.SSLStream | None = None

        async def send_plain(out: bytes) -> None:
            while out:
                sent = await tsock.send(out)
                out = out[sent:]

        send, receive = send_plain, tsock.recv
        answered_inside_tls = False
        while not hs.done:
            try:
                await send(hs.data_to_send())
                if hs.wants_tls:
                    assert self._tls is not None
                    tls = self._tls.wrap(trio.SocketStream(tsock))
                    await tls.do_handshake()
                    send, receive = tls.send_all, tls.receive_some
                    hs.tls_started()
                    continue
                data = await receive(65536)
            except ConnectionResetError:
                data = b""
            except trio.BrokenResourceError as exc:
                if tls is None or answered_inside_tls or isinstance(exc.__cause__, ssl.SSLError):
                    raise
                data = b""  # a reset just after the TLS handshake: see below
            if tls is not None and not answered_inside_tls and not data:
                # TLS 1.3 ends the client's handshake before the server has checked the
                # client's certificate: a server that refuses it (or its absence) just hangs
                # up on the first option inside TLS.
                raise wire.HandshakeError(self._tls.hang_up_reason())
            answered_inside_tls = tls is not None
            hs.receive_data(data)
        assert hs.info is not None
        return hs.info, hs.trailing_data(), tls

    # ---- the reader -----------------------------------------------------------------------

    async def _reader(self, conn: Connection) -> None:
        """Route replies to their requests until the connection ends; then fail what waits."""
        sock, codec = conn.sock, conn.codec
        reason = "closed"
        spins = 0
        try:
            while True:
                buf = codec.get_buffer()
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    spins = 0
                    continue
                if n == 0:
                    reason = "the server closed the connection"
                    break
                self.heard_at = trio.current_time()
                events = codec.buffer_updated(n)
                spins += 1
                if events and self._dispatch(conn, events) or spins >= 64:
                    spins = 0
                    await trio.lowlevel.checkpoint()  # let the woken readers run
        except trio.ClosedResourceError:
            reason = conn.reason or "closed"
        except wire.ProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.error("%s: %s", self.address.url, reason)
        except OSError as exc:
            reason = conn.reason or str(exc)
        finally:
            self._ended(conn, reason)

    async def _tls_reader(self, conn: Connection) -> None:
        """`_reader` for a connection inside TLS: trio's SSLStream hands out decrypted bytes,
        which the codec copies where they belong."""
        assert conn.tls is not None
        reason = "closed"
        try:
            while True:
                data = await conn.tls.receive_some(TLS_RECEIVE_SIZE)
                if not data:
                    reason = "the server closed the connection"
                    break
                self.heard_at = trio.current_time()
                events = conn.codec.receive_data(data)
                if events:
                    self._dispatch(conn, events)
        except trio.ClosedResourceError:
            reason = conn.reason or "closed"
        except trio.BrokenResourceError as exc:
            reason = conn.reason or describe_failure(exc)
        except wire.ProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.error("%s: %s", self.address.url, reason)
        finally:
            self._ended(conn, reason)

    def _ended(self, conn: Connection, reason: str) -> None:
        """A reader stopped: the connection is gone, and what waits on it fails."""
        # A reader cancelled with the source's scope (a mount stopping) lost nothing: quiet.
        if conn.alive and not self._closed and trio.current_effective_deadline() != -math.inf:
            log.warning("%s: connection %d lost: %s", self.address.url, conn.number, reason)
        conn.kill(conn.reason or reason)
        self.on_connection_lost()
        self._note_drained()

    def _dispatch(self, conn: Connection, events: list) -> bool:
        woke = False
        for event in events:
            kind = type(event)
            if kind is ReplyDone:
                request = conn.waiting.pop(event.cookie, None)
                if request is None:
                    continue
                conn.load -= request.nbytes
                if event.error:
                    name = wire.error_name(event.error)
                    text = f"{self.address.url}: {request.what}: server error {name}"
                    if event.message:
                        text += f": {event.message}"
                    request.error = SourceReadError(_errno(event.error), text)
                    if event.error == wire.ESHUTDOWN:
                        self._drain(conn)
                request.done.set()
                woke = True
            elif kind is BlockStatus:
                request = conn.waiting.get(event.cookie)
                if request is not None and event.context_id == conn.info.base_allocation:
                    request.descriptors.extend(event.descriptors)
        if conn.draining and not conn.waiting and conn.alive:
            conn.disconnect_now("the server is shutting down")
        if self._drained is not None and not conn.waiting:
            self._note_drained()  # a close waits, and this connection's last reply is in
        return woke

    def _drain(self, conn: Connection) -> None:
        """ESHUTDOWN: the client must disconnect; finish what is in flight first."""
        conn.usable = False
        conn.draining = True


def _request_shape(info: wire.ExportInfo) -> tuple[int, int, int, int]:
    """What the requests made for an export depend on (meta-context ids are per connection)."""
    return info.min_block_size, info.preferred_block_size, info.max_block_size, info.flags


def _describe_shape(info: wire.ExportInfo) -> str:
    return (f"block sizes {info.min_block_size}/{info.preferred_block_size}/"
            f"{info.max_block_size}, flags {info.flags:#x}")


def _errno(nbd_error: int) -> int:
    return {wire.EPERM: errno.EPERM, wire.EIO: errno.EIO, wire.ENOMEM: errno.ENOMEM,
            wire.EINVAL: errno.EINVAL, wire.ENOSPC: errno.ENOSPC, wire.EOVERFLOW: errno.EOVERFLOW,
            wire.ENOTSUP: errno.ENOTSUP, wire.ESHUTDOWN: errno.ESHUTDOWN}.get(nbd_error, errno.EIO)


def _reason(exc: OSError) -> str:
    """Why a connect failed, in a few words: trio's connect errors repeat the address."""
    if isinstance(exc, socket.gaierror) or not exc.errno:
        return exc.strerror or str(exc)
    return os.strerror(exc.errno)
