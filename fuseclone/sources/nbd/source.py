"""An NBD server as the source: `nbd://host[:port][/export]`, `nbd+unix:///export?socket=PATH`,
and the same inside TLS, `nbds://` and `nbds+unix://` (see `tls`).

The protocol itself lives in `wire`, `handshake` and `transmission` (sans I/O); this module and
its neighbours are its trio transport:

* `pool`: a pool of connections — several when the server advertises NBD_FLAG_CAN_MULTI_CONN,
  else one — each with many requests in flight, replies matched by cookie by one reader task
  per connection. Reads are split at the server's maximum block size (and into `request_size`
  pieces) and spread over the least loaded connections; their data is received straight into
  the result buffer (`buffers`).
* `extents`: block status (base:allocation) fetched a window at a time and cached.
* failures are reads that raise SourceReadError — a server error, a request that timed out
  (`timeout`: the server sent nothing, on any connection, for 30 s; a slow one is waited
  for), a connection that dropped. A dropped pool is re-dialled by the next
  request, with exponential backoff between failed attempts; a read during an outage fails
  after at most one connection attempt instead of hanging.
* a server dialled again may have restarted on other data: once the source has its data
  sample (`open_source` takes it), no read or block status is handed out after a connection
  was dialled until the sample has been read again and found equal; a differing one fails
  every later read (EIO), as a local file that changed does.

All tasks belong to the nursery `open_nbd_source` owns; leaving it sends NBD_CMD_DISC, closes
the sockets and cancels the readers. Only NBD_CMD_READ, NBD_CMD_BLOCK_STATUS and NBD_CMD_DISC
are ever sent: the source is never written.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import urllib.parse
from dataclasses import dataclass
from typing import AsyncIterator

import trio

from ...errors import SourceError
from ..base import Extent, SampleCheck, Source, SourceReadError
from . import wire
from .buffers import KiB, MiB, BufferPool
from .extents import ExtentCache
from .pool import ConnectionPool, Request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NbdOptions:
    """Tunables of the NBD source."""

    connections: int = 4  # used when the server advertises NBD_FLAG_CAN_MULTI_CONN
    request_size: int = 1 * MiB  # reads are split into pieces of at most this much
    max_request: int = 32 * MiB  # cap on the server's maximum block size
    timeout: float = 30.0  # a server silent this long while it owes replies is taken for hung
    connect_timeout: float = 10.0  # dial + handshake
    extent_window: int = 64 * MiB  # block status is fetched and cached this much at a time
    extent_cache_windows: int = 16
    reconnect_initial: float = 0.05  # backoff after a failed reconnect, doubling...
    reconnect_max: float = 5.0  # ...up to this
    header_buffer: int = 16 * KiB
    block_status: bool = True  # ask for base:allocation
    recycled_bytes: int = 32 * MiB  # receive buffers kept for reuse (see NbdSource.recycle)


@dataclass(frozen=True)
class NbdAddress:
    """A parsed NBD URL."""

    url: str  # as the user gave it
    export: str
    socket_path: str | None = None  # nbd+unix
    host: str | None = None  # nbd
    port: int = wire.DEFAULT_PORT
    tls: bool = False  # nbds, nbds+unix
    tls_certificates: str | None = None  # ?tls-certificates=DIR

    @property
    def canonical(self) -> str:
        export = urllib.parse.quote(self.export, safe="")
        scheme = "nbds" if self.tls else "nbd"
        if self.socket_path is not None:
            return f"{scheme}+unix:///{export}?socket={self.socket_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{export}"

    @property
    def where(self) -> str:
        return self.socket_path if self.socket_path is not None else f"{self.host}:{self.port}"


def parse_nbd_url(spec: str) -> NbdAddress:
    """`nbd[s]://host[:port][/export]` or `nbd[s]+unix:///export?socket=PATH` (the NBD URI
    forms; the `s` asks for TLS, and `?tls-certificates=DIR` names its certificates)."""
    try:
        parts = urllib.parse.urlsplit(spec)
        port = parts.port
    except ValueError as exc:
        raise SourceError(f"{spec}: not a valid NBD URL ({exc})") from None
    scheme = parts.scheme.lower()
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = urllib.parse.parse_qs(parts.query)
    tls = scheme in ("nbds", "nbds+unix")
    certificates = query.get("tls-certificates", [None])[0]
    if certificates is not None and not tls:
        raise SourceError(f"{spec}: tls-certificates= needs TLS (nbds:// or nbds+unix://)")
    security = {"tls": tls, "tls_certificates": certificates and os.path.abspath(certificates)}
    if scheme in ("nbd+unix", "nbds+unix"):
        sockets = query.get("socket")
        if not sockets or not sockets[0]:
            raise SourceError(f"{spec}: {scheme}:// needs ?socket=PATH "
                              f"(e.g. {scheme}:///export?socket=/run/nbd.sock)")
        if parts.netloc:
            raise SourceError(f"{spec}: {scheme}:// takes no host (write {scheme}:///export?socket=PATH)")
        return NbdAddress(spec, export, socket_path=os.path.abspath(sockets[0]), **security)
    if scheme in ("nbd", "nbds"):
        if not parts.hostname:
            raise SourceError(f"{spec}: {scheme}:// needs a host ({scheme}://host[:port][/export])")
        if port == 0:  # not "the default": no server listens on port 0
            raise SourceError(f"{spec}: port 0 is not a port (leave it out for {wire.DEFAULT_PORT})")
        return NbdAddress(spec, export, host=parts.hostname, port=port or wire.DEFAULT_PORT,
                          **security)
    raise SourceError(f"{spec}: not an NBD URL (use nbd[s]://host[:port][/export] or "
                      "nbd[s]+unix:///export?socket=PATH)")


@contextlib.asynccontextmanager
async def open_nbd_source(spec: str, **options) -> AsyncIterator[NbdSource]:
    """The NBD source named by `spec`, for the duration of the block:

        async with open_nbd_source("nbd+unix:///?socket=/tmp/s") as source:
            data = await source.read(0, 4096)

    Raises SourceError (one line naming the URL) when the server cannot be reached or refuses.
    Keyword arguments override `NbdOptions` fields. The source's tasks (one reader per
    connection, extent prefetches) live in a nursery this opener owns."""
    source = NbdSource(parse_nbd_url(spec), NbdOptions(**options))
    first = await source.pool.dial_first()  # outside the nursery: errors stay plain SourceErrors
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            source.pool.start(nursery, first)
            await source.pool.fill()
            yield source
        except BaseException as exc:
            # Raised again below, outside the nursery, so that it propagates unchanged
            # instead of inside an ExceptionGroup.
            body_error = exc
        finally:
            await source.aclose()  # cancels the nursery's tasks
    if body_error is not None:
        raise body_error


class NbdSource(Source):
    """Read-only access to one NBD export over a pool of connections."""

    # From nbdkit with 2 ms latency reading a cold disk, 16 MiB in flight hydrated at ~720 MB/s,
    # 64 MiB (what nbdcopy keeps: 4 connections x 64 requests x 256 KiB) at ~720-760 and
    # 128 MiB at ~820 (1 GiB, alternating runs): deeper makes up for Python's slower start.
    hydration_depth = 128 << 20
    # Copies of 8 MiB (8 requests) instead of 4: half the hand-offs to DST's writer threads,
    # whose ~1 ms gaps left them idle a quarter of the time; 4% faster hydrating 1 GiB (hydrate
    # phase, medians of 6 alternating: 0.83 -> 0.79 s source cached, 1.50 -> 1.44 s cold).
    hydration_batch = 8 << 20

    def __init__(self, address: NbdAddress, options: NbdOptions) -> None:
        self.address = address
        self.options = options
        self.description = address.url
        self.pool = ConnectionPool(address, options)
        self.buffers = BufferPool(options.recycled_bytes)
        self.extent_cache = ExtentCache(self.pool)
        self.pool.on_connection_lost = self.extent_cache.clear
        # The sample is read again after a connection was dialled: the server was away.
        self.sample_check = SampleCheck(self, lambda: self.pool.dialled,
                                        lambda offset, length: self._read(offset, length,
                                                                          aligned=False))

    # ---- Source ---------------------------------------------------------------------------

    @property
    def info(self) -> wire.ExportInfo:
        return self.pool.info

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def has_version_mark(self) -> bool:
        return False  # NBD has none: a server restarted on other data looks the same

    def own_identity(self) -> dict[str, str | int]:
        ident: dict[str, str | int] = {"kind": "nbd", "url": self.address.canonical,
                                       "export": self.address.export, "size": self.size}
        if self.address.socket_path is not None:
            ident["socket"] = self.address.socket_path
        else:
            ident["host"] = self.address.host or ""
            ident["port"] = self.address.port
        return ident

    def same_identity(self, stored: dict, current: dict) -> bool:
        return same_nbd_export(stored, current)

    @property
    def connections(self) -> int:
        """Connections open right now."""
        return self.pool.open_connections

    @property
    def reconnects(self) -> int:
        """Connections re-dialled after a loss (for tests and status)."""
        return self.pool.reconnects

    async def take_sample(self) -> None:
        await self.sample_check.taking(super().take_sample)

    async def read(self, offset: int, length: int) -> bytes:
        """The bytes at [offset, offset+length), clipped to the size. The result is a bytearray
        that belongs to the caller (bytes-like, as the engine needs; no extra copy)."""
        return await self.sample_check.trusted(lambda: self._read(offset, length, aligned=False))

    async def read_for_copy(self, offset: int, length: int):
        """`read` into page-aligned memory (an anonymous mmap) when it is large."""
        return await self.sample_check.trusted(lambda: self._read(offset, length, aligned=True))

    async def _read(self, offset: int, length: int, aligned: bool):
        size = self.size
        if offset < 0:
            raise SourceReadError(errno.EINVAL, f"source read at negative offset {offset}")
        length = max(0, min(length, size - offset))
        if length == 0:
            return b""
        align = self.info.min_block_size
        lo = offset - offset % align
        hi = min(size, -(-(offset + length) // align) * align)
        exact = lo == offset and hi - lo == length
        buf = self.buffers.take(length, aligned) if exact else bytearray(hi - lo)
        view = memoryview(buf)
        piece = self._piece_size()
        what = f"read of {length} bytes at {offset}"
        requests: list[Request] = []
        asked_at = trio.current_time()
        with trio.move_on_after(self.options.timeout) as scope:
            pos = lo
            while pos < hi:
                n = min(piece, hi - pos)
                conn = await self.pool.connection(what)
                cookie, message = conn.codec.read(pos, n, view[pos - lo:pos - lo + n])
                request = Request(conn, n, what)
                conn.waiting[cookie] = request
                conn.load += n
                requests.append(request)
                await conn.send(message, self.options.timeout)
                pos += n
        if scope.cancelled_caught:
            self._timed_out(requests, what)
        for request in requests:
            if not await self.pool.answered(request, asked_at):
                self._timed_out(requests, what)
            if request.error is not None:
                raise request.error
        if exact:
            view.release()
            return buf
        return bytes(view[offset - lo:offset - lo + length])

    def recycle(self, data: bytes | bytearray | mmap.mmap) -> None:
        self.buffers.recycle(data)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        # Trusted like data: a hole of other data would be hydrated as zeros.
        return await self.sample_check.trusted(lambda: self.extent_cache.extents(offset, length))

    async def aclose(self) -> None:
        """Let the replies already asked for arrive, disconnect politely, close every socket,
        stop the tasks (see ConnectionPool.close)."""
        await self.pool.close()

    # ---- reads: helpers -------------------------------------------------------------------

    def _piece_size(self) -> int:
        info = self.info
        piece = min(self.options.request_size, self.options.max_request, info.max_block_size)
        piece -= piece % info.min_block_size
        return max(piece, info.min_block_size)

    def _timed_out(self, requests: list[Request], what: str) -> None:
        # A server that sends nothing for the timeout is presumed hung (or the network
        # half-open): drop its connections so the next request dials afresh.
        silence = f"the server sent nothing for {self.options.timeout:g} s"
        for request in requests:
            if not request.done.is_set():
                request.conn.kill(silence)
        raise SourceReadError(errno.ETIMEDOUT, f"{self.address.url}: {what} timed out ({silence})")


def same_nbd_export(stored: dict, current: dict) -> bool:
    """Whether two NBD identities name the same export. Equal identities do; so do two served
    on Unix sockets at different paths with the same export name and size: a socket path is
    usually made up per run (`nbdkit -U -`, a temporary directory), and a clone resumed with a
    new one must not be refused. A TCP host or port, or another export name, still counts."""
    if stored == current:
        return True
    if "socket" not in stored or "socket" not in current:
        # The URL repeats host, port and export; only its scheme can differ (nbd:// or
        # nbds://), and TLS is how the export is reached, not which export it is.
        return _without(stored, "url") == _without(current, "url")
    same = _without(stored, "socket", "url") == _without(current, "socket", "url")
    if same:
        log.info("the NBD socket moved from %s to %s: taking it for the same export",
                 stored["socket"], current["socket"])
    return same


def _without(identity: dict, *keys: str) -> dict:
    return {k: v for k, v in identity.items() if k not in keys}
