"""An NBD server as the source: `nbd://host[:port][/export]` and `nbd+unix:///export?socket=PATH`.

The protocol itself lives in `nbdproto` (sans I/O); this module is its trio transport:

* a pool of connections — several when the server advertises NBD_FLAG_CAN_MULTI_CONN, else
  one — each with many requests in flight, replies matched by cookie by one reader task per
  connection. Reads are split at the server's maximum block size (and into `request_size`
  pieces) and spread over the least loaded connections; their data is received straight into
  the result buffer.
* block status (base:allocation) fetched a window at a time (`extent_window`, 64 MiB) and
  cached, with the next window prefetched, so 1 MiB hydration batches do not each pay a round
  trip.
* failures are reads that raise SourceReadError — a server error, a request that timed out
  (`timeout`, 30 s), a connection that dropped. A dropped pool is re-dialled by the next
  request, with exponential backoff between failed attempts; a read during an outage fails
  after at most one connection attempt instead of hanging.

All tasks belong to a nursery owned by the async context manager `open_nbd_source` returns;
leaving it sends NBD_CMD_DISC, closes the sockets and cancels the readers. Only NBD_CMD_READ,
NBD_CMD_BLOCK_STATUS and NBD_CMD_DISC are ever sent: the source is never written.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import mmap
import os
import socket
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass

import trio

from ..errors import SourceError
from . import nbdproto as proto
from .base import Extent, Source, SourceReadError

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
ALIGNED_BUFFER_MIN = 64 * KiB  # reads this large are received into page-aligned memory
HUGE_PAGE = 2 * MiB  # receive buffers this large ask for transparent huge pages
DRAIN_TIMEOUT = 1.0  # seconds a close waits for replies already asked for
DRAIN_POLL = 0.005


@dataclass(frozen=True)
class NbdOptions:
    """Tunables of the NBD source."""

    connections: int = 4  # used when the server advertises NBD_FLAG_CAN_MULTI_CONN
    request_size: int = 1 * MiB  # reads are split into pieces of at most this much
    max_request: int = 32 * MiB  # cap on the server's maximum block size
    timeout: float = 30.0  # per read / block status call
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
    port: int = proto.DEFAULT_PORT

    @property
    def canonical(self) -> str:
        export = urllib.parse.quote(self.export, safe="")
        if self.socket_path is not None:
            return f"nbd+unix:///{export}?socket={self.socket_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{export}"

    @property
    def where(self) -> str:
        return self.socket_path if self.socket_path is not None else f"{self.host}:{self.port}"


def parse_nbd_url(spec: str) -> NbdAddress:
    """`nbd://host[:port][/export]` or `nbd+unix:///export?socket=PATH` (the NBD URI forms)."""
    try:
        parts = urllib.parse.urlsplit(spec)
        port = parts.port
    except ValueError as exc:
        raise SourceError(f"{spec}: not a valid NBD URL ({exc})") from None
    scheme = parts.scheme.lower()
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = urllib.parse.parse_qs(parts.query)
    if scheme == "nbd+unix":
        sockets = query.get("socket")
        if not sockets or not sockets[0]:
            raise SourceError(f"{spec}: nbd+unix:// needs ?socket=PATH "
                              "(e.g. nbd+unix:///export?socket=/run/nbd.sock)")
        if parts.netloc:
            raise SourceError(f"{spec}: nbd+unix:// takes no host (write nbd+unix:///export?socket=PATH)")
        return NbdAddress(spec, export, socket_path=os.path.abspath(sockets[0]))
    if scheme == "nbd":
        if not parts.hostname:
            raise SourceError(f"{spec}: nbd:// needs a host (nbd://host[:port][/export])")
        return NbdAddress(spec, export, host=parts.hostname, port=port or proto.DEFAULT_PORT)
    raise SourceError(f"{spec}: not an NBD URL (use nbd://host[:port][/export] or "
                      "nbd+unix:///export?socket=PATH)")


def open_nbd_source(spec: str, **options) -> _NbdOpener:
    """The NBD source named by `spec`, as an async context manager:

        async with open_nbd_source("nbd+unix:///?socket=/tmp/s") as source:
            data = await source.read(0, 4096)

    Raises SourceError (one line naming the URL) when the server cannot be reached or refuses.
    Keyword arguments override `NbdOptions` fields."""
    return _NbdOpener(parse_nbd_url(spec), NbdOptions(**options))


class _NbdOpener:
    """Owns the nursery of the source's tasks for the duration of an `async with` block."""

    def __init__(self, address: NbdAddress, options: NbdOptions) -> None:
        self._address = address
        self._options = options
        self._nursery_manager = None
        self._source: NbdSource | None = None

    async def __aenter__(self) -> NbdSource:
        source = NbdSource(self._address, self._options)
        first = await source._dial_for_open()  # outside the nursery: errors stay plain SourceErrors
        self._nursery_manager = trio.open_nursery()
        nursery = await self._nursery_manager.__aenter__()
        try:
            source._start(nursery, first)
            await source._fill_pool()
        except BaseException:
            await source.aclose()
            await self._nursery_manager.__aexit__(None, None, None)
            raise
        self._source = source
        return source

    async def __aexit__(self, etype, exc, tb) -> bool:
        assert self._source is not None and self._nursery_manager is not None
        try:
            await self._source.aclose()
        finally:
            # The body's own exception is not fed to the nursery: it propagates unchanged
            # instead of inside an ExceptionGroup. The nursery only waits for its (cancelled)
            # tasks here.
            await self._nursery_manager.__aexit__(None, None, None)
        return False


class _Request:
    __slots__ = ("conn", "done", "error", "descriptors", "nbytes", "what")

    def __init__(self, conn: _Connection, nbytes: int, what: str) -> None:
        self.conn = conn
        self.done = trio.Event()
        self.error: SourceReadError | None = None
        self.descriptors: list[tuple[int, int]] = []
        self.nbytes = nbytes
        self.what = what


class _Connection:
    """One socket in the transmission phase, its codec and the requests waiting on it."""

    def __init__(self, sock: socket.socket, info: proto.ExportInfo, codec: proto.Transmission,
                 number: int, url: str) -> None:
        self.url = url
        self.sock = sock
        self.info = info
        self.codec = codec
        self.number = number
        self.waiting: dict[int, _Request] = {}
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
        if not self._slow_senders:
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
        # The socket buffer is full: queue behind earlier slow senders. A half-sent message
        # must be finished whatever happens to the caller, or the stream is corrupt.
        self._slow_senders += 1
        try:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + timeout
                async with self._send_lock:
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
            if scope.cancelled_caught:
                self.kill(f"could not send a request within {timeout:g} s")
        except trio.ClosedResourceError:
            pass
        finally:
            self._slow_senders -= 1
        if not self.alive:
            raise SourceReadError(errno.ECONNRESET, f"{self.url}: connection lost: {self.reason}")

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
        self._info: proto.ExportInfo | None = None
        self._conns: list[_Connection] = []
        self._target = 1
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._numbers = 0
        self._reconnect_lock = trio.Lock()
        self._filling = False
        self._backoff = 0.0
        self._free_buffers: dict[tuple[type, int], list] = {}  # by kind and length
        self._free_bytes = 0
        self._next_attempt = 0.0
        self._last_error = ""
        # block status cache: window index -> (run starts, runs of (start, stop, zero))
        self._windows: OrderedDict[int, tuple[list[int], list[tuple[int, int, bool]]]] = OrderedDict()
        self._fetching: dict[int, trio.Event] = {}
        self._fetch_errors: dict[int, SourceReadError] = {}
        self.reconnects = 0  # connections re-dialled after a loss (for tests and status)

    # ---- Source ---------------------------------------------------------------------------

    @property
    def info(self) -> proto.ExportInfo:
        assert self._info is not None
        return self._info

    @property
    def size(self) -> int:
        return self.info.size

    def identity(self) -> dict[str, str | int]:
        ident: dict[str, str | int] = {"kind": "nbd", "url": self.address.canonical,
                                       "export": self.address.export, "size": self.size}
        if self.address.socket_path is not None:
            ident["socket"] = self.address.socket_path
        else:
            ident["host"] = self.address.host or ""
            ident["port"] = self.address.port
        return ident

    def identity_matches(self, stored: dict) -> bool:
        return same_nbd_export(stored, self.identity())

    @property
    def connections(self) -> int:
        """Connections open right now."""
        return sum(1 for c in self._conns if c.alive)

    async def read(self, offset: int, length: int) -> bytes:
        """The bytes at [offset, offset+length), clipped to the size. The result is a bytearray
        that belongs to the caller (bytes-like, as the engine needs; no extra copy)."""
        return await self._read(offset, length, aligned=False)

    async def read_for_copy(self, offset: int, length: int):
        """`read` into page-aligned memory (an anonymous mmap) when it is large."""
        return await self._read(offset, length, aligned=True)

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
        buf = self._buffer(length, aligned) if exact else bytearray(hi - lo)
        view = memoryview(buf)
        piece = self._piece_size()
        what = f"read of {length} bytes at {offset}"
        requests: list[_Request] = []
        with trio.move_on_after(self.options.timeout) as scope:
            pos = lo
            while pos < hi:
                n = min(piece, hi - pos)
                conn = await self._connection(what)
                cookie, message = conn.codec.read(pos, n, view[pos - lo:pos - lo + n])
                request = _Request(conn, n, what)
                conn.waiting[cookie] = request
                conn.load += n
                requests.append(request)
                await conn.send(message, self.options.timeout)
                pos += n
            for request in requests:
                await request.done.wait()
                if request.error is not None:
                    raise request.error
        if scope.cancelled_caught:
            self._timed_out(requests, what)
        if exact:
            view.release()
            return buf
        return bytes(view[offset - lo:offset - lo + length])

    def _buffer(self, length: int, aligned: bool) -> bytearray | mmap.mmap:
        """A receive buffer: a recycled one of this length and kind, else a new one. Aligned
        ones are anonymous mmaps when large: page-aligned, so DST can take them with direct I/O.
        New buffers are zero-filled, and that memset was 8% of the daemon's CPU while hydrating
        from NBD."""
        kind = mmap.mmap if aligned and length >= ALIGNED_BUFFER_MIN else bytearray
        free = self._free_buffers.get((kind, length))
        if free:
            self._free_bytes -= length
            return free.pop()
        if kind is not mmap.mmap:
            return bytearray(length)
        # Private, not mmap's default shared mapping: shared anonymous memory is shmem, slower
        # to fault in (~3% of a hydration from NBD) and shared with forked children.
        buf = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if length >= HUGE_PAGE:
            _ask_for_huge_pages(buf)
        return buf

    def recycle(self, data: bytes | bytearray | mmap.mmap) -> None:
        # Only buffers of reads that returned come back, so no reply can still be arriving
        # into one (a cancelled or failed read's buffer is never handed back).
        n = len(data)
        kind = type(data)
        if kind not in (bytearray, mmap.mmap) or n > self.options.recycled_bytes:
            return
        key = (kind, n)
        # Smaller buffers go when a larger one comes back: they are the odd sizes of a sparse
        # source's extents, or the copies of a depth still ramping up, and would otherwise sit
        # in the daemon's memory (row 6 peaked 9 MiB higher). A full pool drops the sizes
        # recycled longest ago, so an odd size cannot keep the usual one out.
        for smaller in [k for k in self._free_buffers if k[1] < n]:
            self._free_bytes -= smaller[1] * len(self._free_buffers.pop(smaller))
        same = self._free_buffers.pop(key, [])
        while self._free_bytes + n > self.options.recycled_bytes and self._free_buffers:
            oldest = next(iter(self._free_buffers))
            self._free_bytes -= oldest[1] * len(self._free_buffers.pop(oldest))
        if self._free_bytes + n <= self.options.recycled_bytes:
            same.append(data)
            self._free_bytes += n
        if same:
            self._free_buffers[key] = same  # last: the most recently recycled size

    async def extents(self, offset: int, length: int) -> list[Extent]:
        size = self.size
        if offset < 0:
            raise SourceReadError(errno.EINVAL, f"block status at negative offset {offset}")
        length = max(0, min(length, size - offset))
        if length == 0:
            return []
        if self.info.base_allocation is None or not self.options.block_status:
            return [Extent(offset, length, zero=False)]
        window = self.options.extent_window
        end = offset + length
        out: list[Extent] = []
        pos = offset
        while pos < end:
            index = pos // window
            starts, runs = await self._window(index)
            i = max(0, bisect.bisect_right(starts, pos) - 1)
            window_end = min(size, (index + 1) * window)
            while pos < min(end, window_end) and i < len(runs):
                run_start, run_end, zero = runs[i]
                stop = min(run_end, end)
                if stop > pos:
                    if out and out[-1].zero == zero and out[-1].offset + out[-1].length == pos:
                        out[-1] = Extent(out[-1].offset, stop - out[-1].offset, zero)
                    else:
                        out.append(Extent(pos, stop - pos, zero))
                    pos = stop
                i += 1
            if pos < min(end, window_end):  # runs did not cover the window (cannot happen)
                out.append(Extent(pos, min(end, window_end) - pos, False))
                pos = min(end, window_end)
            # Prefetch the next window once a reader is past the middle of this one.
            nxt = index + 1
            if (pos - index * window > window // 2 and nxt * window < size
                    and nxt not in self._windows and nxt not in self._fetching
                    and self._nursery is not None and not self._closed):
                self._nursery.start_soon(self._prefetch, nxt)
        return out

    async def aclose(self) -> None:
        """Let the replies already asked for arrive (for at most DRAIN_TIMEOUT), disconnect
        politely (NBD_CMD_DISC), close every socket, stop the tasks."""
        if self._closed:
            return
        self._closed = True
        await self._await_replies()
        for conn in self._conns:
            if conn.alive:
                try:
                    conn.sock.send(conn.codec.disconnect())  # best effort, never blocks
                except OSError:
                    pass
                conn.kill("source closed")
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _await_replies(self) -> None:
        # A socket closed under replies still being sent makes the server fail its writes
        # (nbdkit 1.32 logged "Broken pipe", and once aborted on an assertion). Hydration's
        # paced depth is about 0.2 s of replies, so the wait is short; a hung server is not
        # waited for long. Shielded: the caller is usually being cancelled.
        with trio.CancelScope(shield=True), trio.move_on_after(DRAIN_TIMEOUT):
            while self._filling or any(conn.alive and conn.waiting for conn in self._conns):
                await trio.sleep(DRAIN_POLL)  # replies, and connections mid-handshake

    # ---- reads: helpers -------------------------------------------------------------------

    def _piece_size(self) -> int:
        info = self.info
        piece = min(self.options.request_size, self.options.max_request, info.max_block_size)
        piece -= piece % info.min_block_size
        return max(piece, info.min_block_size)

    def _timed_out(self, requests: list[_Request], what: str) -> None:
        # A server that does not answer within the timeout is presumed hung (or the network
        # half-open): drop its connections so the next request dials afresh.
        for request in requests:
            if not request.done.is_set():
                request.conn.kill(f"no reply within {self.options.timeout:g} s")
        raise SourceReadError(errno.ETIMEDOUT,
                              f"{self.address.url}: {what} timed out after {self.options.timeout:g} s")

    # ---- block status ---------------------------------------------------------------------

    async def _window(self, index: int) -> tuple[list[int], list[tuple[int, int, bool]]]:
        cached = self._windows.get(index)
        if cached is not None:
            self._windows.move_to_end(index)
            return cached
        while index in self._fetching:
            await self._fetching[index].wait()
            cached = self._windows.get(index)
            if cached is not None:
                return cached
            error = self._fetch_errors.get(index)
            if error is not None:
                raise SourceReadError(error.errno, error.strerror)
        done = self._fetching[index] = trio.Event()
        self._fetch_errors.pop(index, None)
        try:
            runs = await self._fetch_window(index)
        except SourceReadError as exc:
            self._fetch_errors[index] = exc
            raise
        finally:
            del self._fetching[index]
            done.set()
        cached = self._windows[index] = ([r[0] for r in runs], runs)
        while len(self._windows) > self.options.extent_cache_windows:
            self._windows.popitem(last=False)
        return cached

    async def _prefetch(self, index: int) -> None:
        try:
            await self._window(index)
        except SourceReadError as exc:
            log.debug("prefetch of block status window %d failed: %s", index, exc)

    async def _fetch_window(self, index: int) -> list[tuple[int, int, bool]]:
        window = self.options.extent_window
        start = index * window
        end = min(self.size, start + window)
        runs: list[tuple[int, int, bool]] = []
        pos = start
        what = f"block status at {start}"
        with trio.move_on_after(self.options.timeout) as scope:
            while pos < end:
                conn = await self._connection(what)
                context = conn.info.base_allocation
                if context is None:  # a reconnect lost block status: all data from here
                    runs.append((pos, end, False))
                    break
                cookie, message = conn.codec.block_status(pos, end - pos)
                request = _Request(conn, 0, what)
                conn.waiting[cookie] = request
                await conn.send(message, self.options.timeout)
                await request.done.wait()
                if request.error is not None:
                    if request.error.errno == errno.ECONNRESET:
                        raise request.error
                    # The server could not say: treat the rest as data (always correct).
                    log.warning("%s: %s; treating [%d, %d) as data", self.address.url,
                                request.error.strerror, pos, end)
                    runs.append((pos, end, False))
                    break
                before = pos
                for count, flags in request.descriptors:
                    stop = min(end, pos + count)
                    zero = bool(flags & proto.STATE_ZERO)
                    if runs and runs[-1][2] == zero and runs[-1][1] == pos:
                        runs[-1] = (runs[-1][0], stop, zero)
                    else:
                        runs.append((pos, stop, zero))
                    pos = stop
                    if pos >= end:
                        break
                if pos == before:
                    raise SourceReadError(errno.EIO, f"{self.address.url}: empty block status reply")
        if scope.cancelled_caught:
            raise SourceReadError(errno.ETIMEDOUT, f"{self.address.url}: {what} timed out "
                                  f"after {self.options.timeout:g} s")
        return runs

    # ---- the connection pool --------------------------------------------------------------

    async def _connection(self, what: str) -> _Connection:
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

    async def _reconnect(self, what: str) -> _Connection:
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

    async def _add_one(self) -> None:
        try:
            conn = await self._dial()
        except SourceReadError as exc:
            self._failed_attempt(exc.strerror)
            log.debug("%s: extra connection failed: %s", self.address.url, exc.strerror)
            return
        if self._closed:
            with contextlib.suppress(OSError):
                conn.sock.send(conn.codec.disconnect())
            conn.sock.close()
            return
        self._attempt_succeeded()
        self._adopt(conn)

    async def _fill_pool(self) -> None:
        if self._target > 1:
            self._filling = True
            await self._refill()

    def _start(self, nursery: trio.Nursery, first: _Connection) -> None:
        self._nursery = nursery
        self._info = first.info
        self._target = max(1, self.options.connections) if first.info.can_multi_conn else 1
        self._adopt(first)

    def _adopt(self, conn: _Connection) -> None:
        assert self._nursery is not None
        self._conns = [c for c in self._conns if c.alive]
        self._conns.append(conn)
        self._nursery.start_soon(self._reader, conn)

    # ---- dialling -------------------------------------------------------------------------

    async def _dial_for_open(self) -> _Connection:
        """The first connection; failures are SourceErrors naming the URL."""
        try:
            conn = await self._dial()
        except SourceReadError as exc:
            raise SourceError(f"{self.address.url}: {exc.strerror}") from None
        return conn

    async def _dial(self) -> _Connection:
        """Connect and handshake. Raises SourceReadError with a one-line reason."""
        timeout = self.options.connect_timeout
        sock = None
        try:
            with trio.fail_after(timeout):
                sock = await self._connect_socket()
                info, leftover = await self._handshake(sock)
        except trio.TooSlowError:
            if sock is not None:
                sock.close()
            stage = "connect" if sock is None else "the NBD handshake"
            raise SourceReadError(errno.ETIMEDOUT, f"no answer to {stage} within {timeout:g} s "
                                  "(is it an NBD server?)") from None
        except proto.NBDError as exc:
            sock.close()
            raise SourceReadError(errno.EPROTO, str(exc)) from None
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
        codec = proto.Transmission(info, header_buffer=self.options.header_buffer)
        if leftover:
            codec.receive_data(leftover)  # unexpected, but parsed like any reply (and refused)
        self._numbers += 1
        return _Connection(sock, info, codec, self._numbers, self.address.url)

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

    async def _handshake(self, sock: socket.socket) -> tuple[proto.ExportInfo, bytes]:
        hs = proto.Handshake(self.address.export, structured_replies=True,
                             meta_contexts=(proto.CONTEXT_BASE_ALLOCATION,) if self.options.block_status else ())
        tsock = trio.socket.from_stdlib_socket(sock)
        while not hs.done:
            out = hs.data_to_send()
            while out:
                sent = await tsock.send(out)
                out = out[sent:]
            try:
                data = await tsock.recv(65536)
            except ConnectionResetError:
                data = b""
            hs.receive_data(data)
        assert hs.info is not None
        return hs.info, hs.trailing_data()

    # ---- the reader -----------------------------------------------------------------------

    async def _reader(self, conn: _Connection) -> None:
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
                events = codec.buffer_updated(n)
                spins += 1
                if events and self._dispatch(conn, events) or spins >= 64:
                    spins = 0
                    await trio.lowlevel.checkpoint()  # let the woken readers run
        except trio.ClosedResourceError:
            reason = conn.reason or "closed"
        except proto.ProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.error("%s: %s", self.address.url, reason)
        except OSError as exc:
            reason = conn.reason or str(exc)
        finally:
            if conn.alive and not self._closed:
                log.warning("%s: connection %d lost: %s", self.address.url, conn.number, reason)
            conn.kill(conn.reason or reason)
            self._windows.clear()  # the server may have changed while it was away

    def _dispatch(self, conn: _Connection, events: list) -> bool:
        woke = False
        for event in events:
            kind = type(event)
            if kind is proto.ReplyDone:
                request = conn.waiting.pop(event.cookie, None)
                if request is None:
                    continue
                conn.load -= request.nbytes
                if event.error:
                    name = proto.error_name(event.error)
                    text = f"{self.address.url}: {request.what}: server error {name}"
                    if event.message:
                        text += f": {event.message}"
                    request.error = SourceReadError(_errno(event.error), text)
                    if event.error == proto.ESHUTDOWN:
                        self._drain(conn)
                request.done.set()
                woke = True
            elif kind is proto.BlockStatus:
                request = conn.waiting.get(event.cookie)
                if request is not None and event.context_id == conn.info.base_allocation:
                    request.descriptors.extend(event.descriptors)
        if conn.draining and not conn.waiting and conn.alive:
            try:
                conn.sock.send(conn.codec.disconnect())
            except OSError:
                pass
            conn.kill("the server is shutting down")
        return woke

    def _drain(self, conn: _Connection) -> None:
        """ESHUTDOWN: the client must disconnect; finish what is in flight first."""
        conn.usable = False
        conn.draining = True


def _errno(nbd_error: int) -> int:
    return {proto.EPERM: errno.EPERM, proto.EIO: errno.EIO, proto.ENOMEM: errno.ENOMEM,
            proto.EINVAL: errno.EINVAL, proto.ENOSPC: errno.ENOSPC, proto.EOVERFLOW: errno.EOVERFLOW,
            proto.ENOTSUP: errno.ENOTSUP, proto.ESHUTDOWN: errno.ESHUTDOWN}.get(nbd_error, errno.EIO)


def same_nbd_export(stored: dict, current: dict) -> bool:
    """Whether two NBD identities name the same export. Equal identities do; so do two served
    on Unix sockets at different paths with the same export name and size: a socket path is
    usually made up per run (`nbdkit -U -`, a temporary directory), and a clone resumed with a
    new one must not be refused. A TCP host or port, or another export name, still counts."""
    if stored == current:
        return True
    if "socket" not in stored or "socket" not in current:
        return False
    ignored = ("socket", "url")
    same = ({k: v for k, v in stored.items() if k not in ignored}
            == {k: v for k, v in current.items() if k not in ignored})
    if same:
        log.info("the NBD socket moved from %s to %s: taking it for the same export",
                 stored["socket"], current["socket"])
    return same


def _reason(exc: OSError) -> str:
    """Why a connect failed, in a few words: trio's connect errors repeat the address."""
    if isinstance(exc, socket.gaierror) or not exc.errno:
        return exc.strerror or str(exc)
    return os.strerror(exc.errno)


def _ask_for_huge_pages(buf: mmap.mmap) -> None:
    """Back BUF with huge pages where the kernel can. A direct write from 4 KiB pages becomes
    requests of at most the device's segment limit times 4 KiB (254 x 4 KiB on virtio-blk);
    from 2 MiB pages, of its max_sectors_kb (4 MiB). Hydrating 1 GiB from nbdkit, DST's writes
    went from 440-1540 requests of 0.7-2.4 MiB to 286 of 3.7 MiB, and the disk's busy time from
    1.17-1.60 s to 1.10-1.21 s. The kernel falls back to small pages when it has no huge one."""
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError) as exc:  # a kernel without transparent huge pages
        log.debug("no huge pages for receive buffers: %s", exc)
