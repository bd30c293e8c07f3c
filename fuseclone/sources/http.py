"""An HTTP(S) source: Range requests over pooled HTTP/1.1 connections (httpx on trio).

    async with open_http_source("https://host/image.raw") as source:
        data = await source.read(offset, length)

`open_http_source` is an async context manager: the httpx.AsyncClient and its connections live
for the duration of the block. The source only ever sends HEAD and GET (SPEC invariant 4).

Opening (one clear SourceError line naming the URL if anything is wrong), within the connect
timeout (10 s) as a whole, like an NBD dial and handshake:
- HEAD, following redirects; later reads go straight to the final URL (when it refuses a read
  with 401/403/404/410, as an expired pre-signed target does, the URL as given is asked again,
  and followed if it leads to the same file: size and version mark). Its Content-Length is the
  image size; its ETag and Last-Modified identify this version of the file. A redirect from
  https:// to http:// is refused, and the header file's headers go only to the server the URL
  names, never to where a redirect leads (_RedirectGuard).
- Range support is required: `Accept-Ranges: bytes`, or else a probe `GET Range: bytes=0-0` must
  answer 206. A server that ignores Range is refused. If HEAD itself is refused (403/405/501, as
  with URLs pre-signed for GET only), the probe answers for it: Content-Range gives the size.
- `Accept-Encoding: identity` is sent everywhere, so sizes and ranges are of the file's own bytes;
  a file the server sends encoded all the same (Content-Encoding: gzip) is refused.

Identity (stored in the metadata, SPEC invariant 7): kind "http", the URL as given (normalised
by httpx; a password in it is replaced by ***), size, and ETag and Last-Modified when the server
sends them. Metadata made for one version of the file is refused for another. Without a strong
ETag the identity also holds the data sample (`Source.take_sample`: its first and last 64 KiB),
which tells versions apart that a weak ETag, a Last-Modified or the size alone would not.
(nginx's ETag is mtime and size: a same-size file replaced within the same second keeps its ETag.)
Such a file's sample is also read again after any request failed or a new connection was
opened (the server was stopped, restarted, failed over: it may have come back with another
file, and a restart between two reads fails none of them), before anything received since is
handed out, as after an NBD server was dialled again; other data fails every later read (EIO:
hydration stops, status says the source changed).

Reads: `read(offset, length)` splits into pieces of `piece_size` bytes (default 1 MiB) fetched
concurrently; at most `max_connections` (16) requests of copies (`read_for_copy`) are in flight
across the whole source, and the engine's own concurrency (hydration_threshold) keeps them busy;
a quarter more connections (4) are for the reads users wait for (`read`) alone, which then
never queue behind copies, not even behind copies a hung server holds until they time out.
Each body is received straight into its place in the read's buffer (from a BufferPool;
page-aligned for hydration copies, which DST then takes with direct I/O), 1 MiB per socket
read. Every GET carries `If-Match: <etag>` (or `If-Unmodified-Since: <last-modified>` when
the ETag is weak or missing), and each answer's Content-Range, ETag and Last-Modified are
checked, so a file that changes mid-clone fails instead of mixing versions. Connection
failures, 5xx answers and answers for another range (an earlier answer sent twice, left on a
kept-alive connection) are retried twice within a quarter of a second, on another connection
(a keep-alive connection the server just closed is not a fault worth an EIO); so is a request
that timed out (`timeout` seconds without progress, 30 by default) while the server completed
other answers (it hung alone), but not one that timed out in the server's silence. Then, like
any non-206 answer, a short or long body, or an answer slower than its deadline (twice the
timeout plus its size at `min_rate`, 4 KiB/s: a server trickling a byte at a time), the read
raises SourceReadError (EIO) with a message naming the URL and range. The engine turns that
into EIO for user reads and back-off for hydration.
A connection left with bytes past an answer's end (a server or proxy that sent more than the
Content-Length, or an answer nobody asked for) is closed, never reused, so they are never
taken for the next request's answer.

TLS: certificates and host names are verified (there is no switch to turn that off) against the
system's CA store plus certifi's bundle. OpenSSL's usual variables name other trust anchors:
`SSL_CERT_FILE=/path/ca.pem` replaces the system's CA file, `SSL_CERT_DIR=/path/certs` its CA
directory; with either set, certifi's bundle is not added.
Proxies come from HTTP_PROXY / HTTPS_PROXY / ALL_PROXY / NO_PROXY, as with other tools.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import logging
import math
import mmap
import os
import re
import socket
import ssl
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import httpx
import trio

from .. import __version__
from ..blockio import read_regular_text
from ..errors import SourceError
from ..threads import in_thread
from . import describe_spec
from .base import SampleCheck, Source, SourceReadError
from .nbd.buffers import BufferPool

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB

PIECE_SIZE = 1 * MiB
MAX_CONNECTIONS = 16
TIMEOUT = 30.0  # seconds without progress on one request
# Bytes a second a request's answer must average, after twice TIMEOUT (so that silence is
# reported as such): a 1 MiB piece gets 316 s, a 4 KiB read 61 s. Low enough for a slow link
# shared by every connection of the pool (and by other clients); a server trickling a byte at a
# time is stopped instead of waited for.
MIN_RATE = 4 * KiB
CONNECT_TIMEOUT = 10.0
RETRY_DELAYS = (0.05, 0.2)  # after the first and second failed attempt of a read
KEEPALIVE_EXPIRY = 5.0
RECYCLED_BYTES = 32 * MiB  # receive buffers kept for reuse (see HttpSource.recycle)
RECEIVE_BYTES = 1 * MiB  # the most one socket read of a response may take (httpcore: 64 KiB)

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_HEADERS = {
    "Accept-Encoding": "identity",  # ranges and sizes of the file's own bytes
    "User-Agent": f"fuseclone/{__version__}",
}


HttpSourceT = TypeVar("HttpSourceT", bound="HttpSource")


class _RequestLines(logging.Filter):
    """httpx logs a line per request at INFO: kept only at debug level (hydrating a TiB writes
    millions of them, into a log in /run's memory by default), and in the form describe_spec
    gives the URL, without a pre-signed URL's signature."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and not logging.getLogger().isEnabledFor(logging.DEBUG):
            return False
        if isinstance(record.args, tuple):
            record.args = tuple(describe_spec(str(arg)) if isinstance(arg, httpx.URL) else arg
                                for arg in record.args)
        return True


logging.getLogger("httpx").addFilter(_RequestLines())


# When a file without version mark has its data sample compared (see HttpSource.sample_check).
_SAMPLE_COMPARED = ("the data sample is compared at each mount, after a failed request and before "
                    "using a new connection")

# What a pre-signed redirect target answers once it has expired (S3: 403; others 401, 404, 410).
_EXPIRED_TARGET = frozenset({401, 403, 404, 410})


class _TargetRefused(Exception):
    """A read refused by where opening was redirected (maybe expired); carries the message."""


class _Transient(Exception):
    """A failed attempt worth repeating (connection trouble, 5xx); carries the final message."""


class _TimedOut(_Transient):
    """A request the server sent nothing for within the timeout, sent at `asked_at` (trio
    time): repeated only if the server completed another answer since (see HttpSource._fetch)."""

    def __init__(self, message: str, asked_at: float) -> None:
        super().__init__(message)
        self.asked_at = asked_at


@contextlib.asynccontextmanager
async def open_http_source(spec: str, *, header_file: str | None = None,
                           **tuning) -> AsyncIterator[HttpSource]:
    """Open `spec` (an http:// or https:// URL) for the duration of the block; every request
    carries the headers of `header_file` (see HeaderFile). `tuning`: piece_size,
    max_connections, timeout, connect_timeout, retry_delays, min_rate."""
    url, description, canonical = _parse_url(spec)
    headers = await HeaderFile.load(header_file) if header_file else None
    basic = _basic_authorization(url)
    if basic is not None and headers is not None and any(
            name.lower() == "authorization" for name in headers.headers):
        raise SourceError(f"{description}: the URL's password and the Authorization header of "
                          f"{header_file} cannot both be sent; give one of them")
    auth = RequestAuth(headers, basic=basic) if headers or basic else None
    # The password goes in RequestAuth's header, to the named server alone: httpx would send
    # the URL's only to the first hop (a redirect's Location has none) and not at all beside
    # a header file (an auth of the client's own replaces it).
    url = url.copy_with(userinfo=b"")
    async with serving(HttpSource, url, description, auth, canonical=canonical,
                       **tuning) as source:
        yield source


@contextlib.asynccontextmanager
async def serving(cls: type[HttpSourceT], url: httpx.URL, description: str,
                  auth: RequestAuth | None,
                  *, piece_size: int = PIECE_SIZE, max_connections: int = MAX_CONNECTIONS,
                  timeout: float = TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT,
                  retry_delays: tuple[float, ...] = RETRY_DELAYS, min_rate: float = MIN_RATE,
                  **source_args) -> AsyncIterator[HttpSourceT]:
    """An HttpSource (or subclass `cls`, given `source_args`) on its own pooled client, probed,
    for the duration of the block."""
    if piece_size <= 0 or max_connections <= 0 or min_rate <= 0:
        raise ValueError("piece_size, max_connections and min_rate must be positive")
    connect_timeout = min(connect_timeout, timeout)
    client = httpx.AsyncClient(
        transport=_transport(_ssl_context(), max_connections + _for_users(max_connections)),
        headers=_HEADERS,
        # The pool wait is bounded by our own limiter, not by a timeout.
        timeout=httpx.Timeout(timeout, connect=connect_timeout, pool=None),
        follow_redirects=False,
        auth=auth,
        event_hooks={"request": [_RedirectGuard(url, description, auth)]},
    )
    source = cls(client, url, description, piece_size=piece_size,
                 max_connections=max_connections, timeout=timeout, retry_delays=retry_delays,
                 min_rate=min_rate, **source_args)
    try:
        # Connecting and the first answers together, like an NBD dial and handshake: a server
        # that accepts and says nothing holds a mount up no longer than one that never accepts.
        with trio.move_on_after(connect_timeout) as opening:
            await source._probe()
        if opening.cancelled_caught:
            raise SourceError(f"{description}: no answer within {connect_timeout:g} s (is it an "
                              "HTTP server?)")
        yield source
    finally:
        await source.aclose()


class HeaderFile:
    """Request headers kept in a file (`--http-header-file`), so that secrets such as
    `Authorization: Bearer ...` stay out of argv: one `Name: value` per line; blank lines and
    lines starting with # are ignored. Re-read when the server refuses a request (401/403),
    so a rotated token is picked up without a remount. Its values are never logged or shown."""

    def __init__(self, path: str, headers: dict[str, str]) -> None:
        self.path = path
        self.headers = headers

    @classmethod
    async def load(cls, path: str) -> HeaderFile:
        """Read `path`; one SourceError line (never quoting a value) if it is unusable."""
        return cls(path, await in_thread(_read_header_file, path))

    async def reload(self) -> dict[str, str]:
        """Read the file again and return its headers. An unreadable or malformed file keeps
        the headers read before (logged), so a rotation caught half-way does no harm."""
        try:
            fresh = await in_thread(_read_header_file, self.path)
        except SourceError as exc:
            log.warning("%s", exc)
            return self.headers
        if fresh != self.headers:
            log.info("%s: re-read after the server refused a request", self.path)
            self.headers = fresh
        return fresh


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _read_header_file(path: str) -> dict[str, str]:
    try:
        lines = read_regular_text(path).splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SourceError(f"cannot read the header file {path}: {reason}") from None
    headers: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not _HEADER_NAME.match(name) or not value.strip():
            raise SourceError(f"{path}, line {number}: not a header (expected `Name: value`)")
        headers[name] = value.strip()
    return headers


class _RedirectGuard:
    """Looks at every request a source's client sends, each hop of a redirect too (httpx
    copies a request's headers into the next hop, and reads go to where opening was sent):
    a redirect may not lead from https:// to plain http://, and the header file's headers (a
    bearer token, an API key) go only to the server the user named, not to another host (a
    download redirected to a pre-signed URL, or a server that redirects anywhere). A signed
    source's (S3) requests are signed here, each hop over its own URL (SigV4 signs the host
    and the path: a hop sent with the signature of the first was refused), and never sent to
    another server: the hop would carry the session token (X-Amz-Security-Token), and a
    signature for that server in the user's name."""

    def __init__(self, named: httpx.URL, description: str, auth: RequestAuth | None) -> None:
        self._named = named
        self._description = description
        self._auth = auth

    async def __call__(self, request: httpx.Request) -> None:
        if self._named.scheme == "https" and request.url.scheme != "https":
            raise SourceError(f"{self._description}: redirected to a plain http:// URL "
                              f"({describe_spec(str(request.url))}); fuseclone does not give "
                              "up TLS")
        if self._auth is None:
            return
        if _same_server(self._named, request.url):
            await self._auth.sign(request)
        elif self._auth.signs:
            raise SourceError(f"{self._description}: redirected to another server "
                              f"({describe_spec(str(request.url))}); requests signed with the "
                              "AWS credentials go only to the endpoint configured: if the bucket "
                              "is in another region, set AWS_REGION to it, or "
                              "AWS_ENDPOINT_URL_S3 to that server")
        else:
            self._auth.withhold(request)


def _same_server(named: httpx.URL, url: httpx.URL) -> bool:
    """Whether `url` is on the server `named` names: the same scheme, host and port, or the
    same host upgraded from http to https on the default ports."""
    if url.host != named.host:
        return False
    if (url.scheme, url.port) == (named.scheme, named.port):
        return True
    return (named.scheme, url.scheme) == ("http", "https") and named.port in (None, 80) \
        and url.port in (None, 443)


SignRequest = Callable[[httpx.Request], Awaitable[None]]


class RequestAuth(httpx.Auth):
    """What every request of a source carries: the URL's password as basic auth (`basic`: the
    Authorization header's value), the header file's headers, and (S3) a signature, made last
    by _RedirectGuard over each request as it is sent (`sign`). A 401 or 403 answer re-reads
    the header file; if it changed, the request is sent once more with the new headers."""

    def __init__(self, header_file: HeaderFile | None = None,
                 sign: SignRequest | None = None, *, basic: str | None = None) -> None:
        self.header_file = header_file
        self._sign = sign
        self._basic = basic

    async def async_auth_flow(self, request: httpx.Request):
        sent = await self._prepare(request)
        response = yield request
        # Compared with what this request carried: a concurrent request may have re-read first.
        if (response.status_code in (401, 403) and self.header_file is not None
                and await self.header_file.reload() != sent):
            await self._prepare(request)
            yield request

    def sync_auth_flow(self, request: httpx.Request):
        raise RuntimeError("sources use httpx's async client only")

    def withhold(self, request: httpx.Request) -> None:
        """Take the password and the header file's headers off `request` (bound for another
        server)."""
        if self._basic is not None:
            request.headers.pop("Authorization", None)
        if self.header_file is not None:
            for name in self.header_file.headers:
                request.headers.pop(name, None)

    @property
    def signs(self) -> bool:
        """Whether requests are signed (S3 with credentials)."""
        return self._sign is not None

    async def sign(self, request: httpx.Request) -> None:
        """Sign `request` as it is about to be sent (a no-op without a signer)."""
        if self._sign is not None:
            await self._sign(request)

    async def _prepare(self, request: httpx.Request) -> dict[str, str] | None:
        """Add the headers; the header file's headers added."""
        if self._basic is not None:
            request.headers["Authorization"] = self._basic
        headers = self.header_file.headers if self.header_file is not None else None
        if headers is not None:
            request.headers.update(headers)
        return headers


class HttpSource(Source):
    """A file on an HTTP(S) server that honours Range requests. Open with open_http_source."""

    hydration_depth = 64 << 20  # latency-bound like NBD: enough pieces for every pooled connection

    #: Whether opening starts with HEAD (S3 opens with the Range probe alone: its error
    #: answers say what is wrong in their body, which a HEAD answer has not).
    probe_with_head = True

    def __init__(self, client: httpx.AsyncClient, url: httpx.URL, description: str, *,
                 canonical: str, piece_size: int, max_connections: int, timeout: float,
                 retry_delays: tuple[float, ...], min_rate: float) -> None:
        self.description = description
        self._canonical = canonical
        self._client = client
        self._named = url  # the URL as given
        self._url = url  # where reads go: the URL after redirects
        self._following_again = trio.Lock()  # one request for a new target at a time
        self._query = url.query.decode("ascii")  # as given: part of the identity
        self._piece = piece_size
        self._timeout = timeout
        self._min_rate = min_rate
        self._retry_delays = tuple(retry_delays)
        self._limiter = trio.CapacityLimiter(max_connections + _for_users(max_connections))
        self._copy_limiter = trio.CapacityLimiter(max_connections)
        self._size = -1
        self.etag: str | None = None
        self.last_modified: str | None = None
        self._conditions: dict[str, str] = {}
        self.buffers = BufferPool(RECYCLED_BYTES)
        self._closed = False
        self._failed_attempts = 0  # requests that failed (the server may have changed since)
        self._connections_opened = 0  # counted only for a source known by its sample
        self._answered_at = -math.inf  # trio time the server last completed an answer
        # Without a strong ETag, the sample is read again after a request failed or a new
        # connection was opened (the server was stopped, restarted, failed over: it may have
        # come back with another file; one restarted between two reads failed neither).
        self.sample_check = SampleCheck(self,
                                        lambda: self._failed_attempts + self._connections_opened,
                                        lambda offset, length: self._read(
                                            offset, length, aligned=False, for_copy=False))

    # ---- Source interface -----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def url(self) -> str:
        """Where reads go (after redirects)."""
        return str(self._url)

    @property
    def has_version_mark(self) -> bool:
        return is_strong_etag(self.etag)

    def own_identity(self) -> dict[str, str | int]:
        ident: dict[str, str | int] = {"kind": "http", "url": self._canonical, "size": self._size}
        if self._query:
            ident["query_sha256"] = _query_sha256(self._query)
        if self.etag is not None:
            ident["etag"] = self.etag
        if self.last_modified is not None:
            ident["last_modified"] = self.last_modified
        return ident

    def same_identity(self, stored: dict, current: dict) -> bool:
        return same_http_object(stored, current)

    async def take_sample(self) -> None:
        await self.sample_check.taking(super().take_sample)

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        return await self.sample_check.trusted(lambda: self._read(offset, length, aligned=False,
                                                                  for_copy=False))

    async def read_for_copy(self, offset: int, length: int):
        """`read` into page-aligned memory (an anonymous mmap) when it is large, which DST
        takes with direct I/O; on the connections copies may take."""
        return await self.sample_check.trusted(lambda: self._read(offset, length, aligned=True,
                                                                  for_copy=True))

    def recycle(self, data: bytes | bytearray | mmap.mmap) -> None:
        self.buffers.recycle(data)

    async def _read(self, offset: int, length: int, aligned: bool, for_copy: bool):
        if offset < 0 or length < 0:
            raise SourceReadError(errno.EINVAL, f"bad source read ({offset}, {length})")
        end = min(offset + length, self._size)
        if offset >= end:
            return b""
        # Each body is received straight into its place in the caller's buffer: no join.
        buf = self.buffers.take(end - offset, aligned)
        view = memoryview(buf)
        if end - offset <= self._piece:
            await self._fetch(offset, view, for_copy)
        else:
            await self._fetch_pieces(offset, view, for_copy)
        view.release()
        return buf  # the caller's to keep: no second copy

    async def _fetch_pieces(self, offset: int, view: memoryview, for_copy: bool) -> None:
        """Several pieces at once; the first failure cancels the rest and is the one reported."""
        failure: list[SourceReadError] = []

        async def piece(start: int, into: memoryview, cancel: trio.CancelScope) -> None:
            try:
                await self._fetch(start, into, for_copy)
            except SourceReadError as exc:
                failure.append(exc)
                cancel.cancel()

        async with trio.open_nursery() as nursery:
            for lo in range(0, len(view), self._piece):
                nursery.start_soon(piece, offset + lo, view[lo:lo + self._piece],
                                   nursery.cancel_scope)
        if failure:
            raise failure[0]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Closing sockets must happen even when the caller is being cancelled.
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await self._client.aclose()

    # ---- opening --------------------------------------------------------------------------

    async def _probe(self) -> None:
        """HEAD (and if needed a one-byte Range GET): size, validators, Range support."""
        where = self.description
        head = None
        ranges_ok = False
        size: int | None = None
        if self.probe_with_head:
            head = await self._open_request("HEAD", self._url, follow_redirects=True)
            if head.is_success:
                _refuse_encoded(head, where)
                self._url = head.url
                size = _content_length(head)
                self._take_validators(head)
                ranges_ok = "bytes" in _tokens(head.headers.get("accept-ranges", ""))
            elif head.status_code not in (403, 405, 501):  # 403/405/501: try a GET first
                raise SourceError(f"{where}: {await self._refusal(head)}")
        if ranges_ok and size is not None:
            self._set_size(size)
            return

        headers = {"Range": "bytes=0-0"}
        try:
            async with self._client.stream("GET", self._url, headers=headers,
                                           follow_redirects=True) as probe:
                # The body is left unread: a server without ranges may be sending the whole file.
                status = probe.status_code
                if status == 206:
                    _refuse_encoded(probe, where)
                    self._url = probe.url
                    if head is None or not head.is_success:
                        self._take_validators(probe)
                    total = _content_range(probe)[2] if "content-range" in probe.headers else None
                    if size is None:
                        size = total
                elif 200 <= status < 300:
                    raise SourceError(f"{where}: the server does not support Range requests "
                                      f"(it answered {_status_line(probe)} to one); "
                                      "fuseclone needs them")
                else:
                    raise SourceError(f"{where}: {await self._refusal(probe)}")
        except httpx.HTTPError as exc:
            raise SourceError(f"{where}: {_describe_transport_error(exc)}") from None
        except (ValueError, SourceReadError) as exc:
            raise SourceError(f"{where}: {exc}") from None
        if size is None:
            raise SourceError(f"{where}: the server does not say how large the file is "
                              "(no Content-Length); fuseclone needs the size")
        self._set_size(size)

    async def _refusal(self, response: httpx.Response) -> str:
        """Why the server refused a request, in a few words (its body may be unread)."""
        return _status_line(response)

    async def _open_request(self, method: str, url: httpx.URL, **kwargs) -> httpx.Response:
        try:
            response = await self._client.request(method, url, **kwargs)
        except httpx.TooManyRedirects:
            raise SourceError(f"{self.description}: too many redirects") from None
        except httpx.HTTPError as exc:
            raise SourceError(f"{self.description}: {_describe_transport_error(exc)}") from None
        except ValueError as exc:  # e.g. a malformed header
            raise SourceError(f"{self.description}: {exc}") from None
        return response

    def _take_validators(self, response: httpx.Response) -> None:
        etag = response.headers.get("etag")
        modified = response.headers.get("last-modified")
        self.etag = etag.strip() if etag else None
        self.last_modified = modified.strip() if modified else None
        if is_strong_etag(self.etag):
            self._conditions = {"If-Match": self.etag}
        elif self.last_modified:
            self._conditions = {"If-Unmodified-Since": self.last_modified}
        elif self.etag:
            self._conditions = {}  # If-Match compares strongly: a weak ETag never matches
            log.warning("%s: the server sends only a weak ETag (%s) and no Last-Modified; reads "
                        "cannot be conditional, so a change of the file while the server keeps "
                        "serving is noticed only in answers that carry another ETag (%s)",
                        self.description, self.etag, _SAMPLE_COMPARED)
        else:
            self._conditions = {}
            log.warning("%s: the server sends neither ETag nor Last-Modified; a change of the "
                        "file while the server keeps serving cannot be detected (%s)",
                        self.description, _SAMPLE_COMPARED)

    def _set_size(self, size: int) -> None:
        if size < 0:
            raise SourceError(f"{self.description}: the server reports a negative size")
        self._size = size

    # ---- reads ----------------------------------------------------------------------------

    async def _fetch(self, start: int, into: memoryview, for_copy: bool) -> None:
        """Bytes [start, start + len(into)) into `into`, in one Range GET, retried on transient
        failures; a copy's on the connections copies may take."""
        attempt = 0
        followed_again = False
        while True:
            url = self._url
            try:
                async with self._copy_limiter if for_copy else contextlib.nullcontext(), \
                        self._limiter:
                    return await self._fetch_once(start, into, url)
            except _TargetRefused as exc:
                if followed_again:
                    raise SourceReadError(errno.EIO, str(exc)) from None
                followed_again = True
                await self._follow_again(url, str(exc))
            except _Transient as exc:
                self._failed_attempts += 1
                # A request that timed out while the server answered others meanwhile hung
                # alone (a stuck backend, a lost connection): sent again on another connection.
                # One that timed out in the server's silence is not: the server had its chance,
                # as with NBD's timeout, which counts the silence of the server as a whole.
                hung_alone = not isinstance(exc, _TimedOut) or self._answered_at > exc.asked_at
                if attempt >= len(self._retry_delays) or not hung_alone:
                    raise SourceReadError(errno.EIO, str(exc)) from None
                log.debug("retrying %s", exc)
                await trio.sleep(self._retry_delays[attempt])
                attempt += 1

    async def _fetch_once(self, start: int, into: memoryview, url: httpx.URL) -> None:
        want = len(into)
        where = f"{self.description}: bytes {start}-{start + want - 1}"
        asked_at = trio.current_time()
        # The timeout bounds silence; a server that keeps sending a byte now and then is
        # bounded by this deadline on the whole answer.
        allowed = 2 * self._timeout + want / self._min_rate
        try:
            with trio.move_on_after(allowed) as deadline:
                got = await self._receive(start, into, url, where)
        except httpx.TimeoutException as exc:
            raise _TimedOut(f"{where}: {_describe_transport_error(exc)} ({self._timeout:g} s)",
                            asked_at) from None
        except httpx.TransportError as exc:  # connection refused/reset, early close: retry
            raise _Transient(f"{where}: {_describe_transport_error(exc)}") from None
        except httpx.HTTPError as exc:
            raise SourceReadError(errno.EIO, f"{where}: {exc}") from None
        if deadline.cancelled_caught:  # its connection was closed with the unfinished answer
            raise SourceReadError(errno.EIO, f"{where}: the server is too slow (the answer "
                                             f"took over {allowed:g} s: twice {self._timeout:g} s "
                                             f"and {self._min_rate:g} bytes a second)")
        if got != want:
            raise _Transient(f"{where}: short body ({got} of {want} bytes)")
        self._answered_at = trio.current_time()

    async def _receive(self, start: int, into: memoryview, url: httpx.URL, where: str) -> int:
        """One Range GET of len(into) bytes at `start`, its body into `into`; the bytes got."""
        want = len(into)
        stop = start + want
        headers = {"Range": f"bytes={start}-{stop - 1}", **self._conditions}
        async with self._client.stream("GET", url, headers=headers,
                                       extensions=self._connection_counting()) as response:
            if 400 <= response.status_code < 500 and response.status_code != 412:
                refusal = f"{where}: {await self._refusal(response)}"
                if url != self._named and response.status_code in _EXPIRED_TARGET:
                    raise _TargetRefused(refusal)
                raise SourceReadError(errno.EIO, refusal)
            self._check_answer(response, where, start, stop)
            got = 0
            async for chunk in response.aiter_raw():
                end = got + len(chunk)
                if end > want:
                    raise SourceReadError(errno.EIO, f"{where}: the server sent more than "
                                                     f"the {want} bytes asked for")
                into[got:end] = chunk
                got = end
        return got

    async def _follow_again(self, refused: httpx.URL, why: str) -> None:
        """Reads go where opening was redirected, and such a target may expire (a release
        download's pre-signed URL, within minutes): the URL as given is asked again where the
        file is now, with a one-byte Range GET (a URL pre-signed for GET refuses HEAD) under
        the reads' own conditions and checks. Only a file with a version mark is followed."""
        async with self._following_again:
            if self._url != refused:
                return  # another read has followed it meanwhile
            if not (is_strong_etag(self.etag) or self.last_modified):
                raise SourceReadError(errno.EIO, f"{why} (the file has no version mark: "
                                                 "where the URL now leads is not followed)")
            headers = {"Range": "bytes=0-0", **self._conditions}
            try:
                async with self._client.stream("GET", self._named, headers=headers,
                                               follow_redirects=True) as probe:
                    self._check_answer(probe, f"{self.description} asked again", 0, 1)
                    target = probe.url
            except (SourceReadError, _Transient) as exc:
                raise SourceReadError(errno.EIO, f"{why}; it now leads to another file or "
                                                 f"none: {exc}") from None
            except (httpx.HTTPError, SourceError, ValueError) as exc:
                raise SourceReadError(errno.EIO, f"{why}; asking {self.description} again: "
                                                 f"{exc}") from None
            log.info("%s: reads go to %s from now on (%s)", self.description,
                     describe_spec(str(target)), why)
            self._url = target

    def _connection_counting(self) -> dict:
        """The extensions of a request that count the connections it opens (httpcore's trace),
        for a source known by its data sample alone (see `sample_check`); none for one with a
        version mark, whose answers carry it."""
        return {} if self.has_version_mark else {"trace": self._count_connections}

    async def _count_connections(self, event: str, info: dict) -> None:
        if event == "connection.connect_tcp.complete":
            self._connections_opened += 1

    def _check_answer(self, response: httpx.Response, where: str, start: int, stop: int) -> None:
        status = response.status_code
        if status == 412:
            raise SourceReadError(errno.EIO, f"{where}: the file changed on the server since the "
                                             f"clone began ({self._validator_text()} no longer "
                                             "matches)")
        if status >= 500:
            raise _Transient(f"{where}: {_status_line(response)}")
        if status == 200:
            raise SourceReadError(errno.EIO, f"{where}: the server ignored the Range request "
                                             "(answered 200 with the whole file)")
        if status != 206:
            raise SourceReadError(errno.EIO, f"{where}: {_status_line(response)}")
        try:
            first, last, total = _content_range(response)
        except ValueError as exc:
            raise SourceReadError(errno.EIO, f"{where}: {exc}") from None
        if total is not None and total != self._size:
            raise SourceReadError(errno.EIO, f"{where}: the file changed on the server since the "
                                             f"clone began (size {self._size}, now {total})")
        if (first, last) != (start, stop - 1):
            # Most likely an answer to an earlier request left on this kept-alive connection
            # (a server that sent it twice): leaving its body unread closes the connection,
            # and the request is sent again on another.
            raise _Transient(f"{where}: the server answered with bytes {first}-{last} instead")
        etag = response.headers.get("etag")
        modified = response.headers.get("last-modified")
        if (etag is not None and self.etag is not None and etag.strip() != self.etag) or (
                modified is not None and self.last_modified is not None
                and modified.strip() != self.last_modified):
            raise SourceReadError(errno.EIO, f"{where}: the file changed on the server since the "
                                             f"clone began ({self._validator_text()} no longer "
                                             "matches)")
        coding = _content_coding(response)
        if coding is not None:
            raise SourceReadError(errno.EIO, f"{where}: the server sent an encoded body "
                                             f"(Content-Encoding: {coding})")

    def _validator_text(self) -> str:
        if self.etag is not None:
            return f"ETag {self.etag}"
        if self.last_modified is not None:
            return f"Last-Modified {self.last_modified}"
        return "its size"


# ---- helpers ------------------------------------------------------------------------------


def _parse_url(spec: str) -> tuple[httpx.URL, str, str]:
    """The URL to request, how to name it in messages (the spec as given) and in the identity
    (normalised); neither has the query (`query_sha256` stands for it in the identity), and a
    password in the URL is replaced by *** in both."""
    try:
        url = httpx.URL(spec)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise SourceError(f"{describe_spec(spec)}: not a valid URL ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise SourceError(f"{describe_spec(spec)}: not a valid http:// or https:// URL")
    canonical = url.copy_with(query=None, fragment=None)
    if url.password:
        canonical = canonical.copy_with(username=url.username, password="***")
    return url, describe_spec(spec), str(canonical)


def _basic_authorization(url: httpx.URL) -> str | None:
    """The Authorization header's value for the user and password in `url`, if it has any."""
    if not (url.username or url.password):
        return None
    credentials = f"{url.username}:{url.password}".encode()
    return f"Basic {base64.b64encode(credentials).decode('ascii')}"


def _query_sha256(query: str) -> str:
    """What an identity records of a URL's query: a digest, which tells two queries apart
    without keeping a signature in it."""
    return hashlib.sha256(query.encode()).hexdigest()


def _in_current_form(identity: dict) -> dict:
    """IDENTITY as this version records it: an older one kept the URL's query (and fragment)
    in `url`."""
    url = identity.get("url")
    if not isinstance(url, str) or not ("?" in url or "#" in url):
        return identity
    base, _, query = url.split("#", 1)[0].partition("?")
    current = {**identity, "url": base}
    if query:
        current["query_sha256"] = _query_sha256(query)
    return current


def _ssl_context() -> ssl.SSLContext:
    """Verifying context: the system's CA store (or SSL_CERT_FILE/SSL_CERT_DIR) and certifi."""
    ctx = ssl.create_default_context()
    if not (os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR")):
        try:
            import certifi

            ctx.load_verify_locations(cafile=certifi.where())
        except (ImportError, OSError, ssl.SSLError):  # the system store alone, then
            pass
    return ctx


def is_strong_etag(etag: object) -> bool:
    """Whether ETAG (a header's value, or an identity's) names one version's content."""
    return isinstance(etag, str) and bool(etag) and not etag.startswith("W/")


def same_http_object(stored: dict, current: dict) -> bool:
    """Whether two HTTP identities name the same object. Equal identities do; so do two whose
    URLs differ only in the query, when both carry the same strong ETag: a pre-signed URL (S3,
    GCS, Azure SAS) changes its query each time it is issued, and a clone resumed the next day
    must accept the new one. The strong ETag names the object's content (reads send it in
    If-Match as well), so the query no longer has to."""
    stored, current = _in_current_form(stored), _in_current_form(current)
    if stored == current:
        return True
    etag = stored.get("etag")
    if not is_strong_etag(etag) or etag != current.get("etag"):
        return False
    return _without_query(stored) == _without_query(current)


def _without_query(identity: dict) -> dict:
    return {key: value for key, value in identity.items() if key != "query_sha256"}


def _for_users(max_connections: int) -> int:
    """Connections beyond `max_connections` that only reads users wait for may take."""
    return max(1, max_connections // 4)


def _transport(ssl_context: ssl.SSLContext, max_connections: int) -> httpx.AsyncHTTPTransport:
    """httpx's own transport, HTTP/1.1 only, with a pool as large as the reads in flight."""
    _receive_larger_reads()
    _close_connections_left_with_unasked_bytes()
    limits = httpx.Limits(max_connections=max_connections,
                          max_keepalive_connections=max_connections,
                          keepalive_expiry=KEEPALIVE_EXPIRY)
    return httpx.AsyncHTTPTransport(verify=ssl_context, http1=True, http2=False, limits=limits)


def _receive_larger_reads() -> None:
    """Let httpcore read responses RECEIVE_BYTES at a time instead of 64 KiB. Each socket read
    travels through h11 and a stack of async generators up to our loop: reading 512 MiB from
    SeaweedFS (8 MiB GETs, 4 in flight) took 0.58-0.69 s of user CPU with 64 KiB reads and
    0.34-0.40 s with 1 MiB ones (the socket returns what has arrived, so latency is unchanged).
    httpcore has no setting for it, only this class attribute, which tests/sources_http checks
    still exists; every client in the process shares it (the daemon's are all sources)."""
    from httpcore._async.http11 import AsyncHTTP11Connection

    AsyncHTTP11Connection.READ_NUM_BYTES = RECEIVE_BYTES


def _close_connections_left_with_unasked_bytes() -> None:
    """Bytes a server sent past an answer's end (more than its Content-Length, an answer sent
    twice, or a forged one appended for the next range) stay in httpcore's buffer, and the next
    request on the kept-alive connection would take them for its answer. A connection left
    with any is closed instead of going back to the pool. Like _receive_larger_reads, this
    reaches into httpcore (tests/sources_http checks it still works); installed once."""
    from httpcore._async.http11 import AsyncHTTP11Connection, HTTPConnectionState

    response_closed = AsyncHTTP11Connection._response_closed
    if getattr(response_closed, "closes_unasked_bytes", False):
        return

    async def _response_closed(self: AsyncHTTP11Connection) -> None:
        await response_closed(self)
        # Before the pool hands the connection to another request: nothing awaits in between.
        if self._state is HTTPConnectionState.IDLE and self._h11_state.trailing_data[0]:
            log.debug("closing a connection: the server sent more than it was asked for")
            await self.aclose()

    _response_closed.closes_unasked_bytes = True  # type: ignore[attr-defined]
    AsyncHTTP11Connection._response_closed = _response_closed  # type: ignore[method-assign]


def _tokens(value: str) -> set[str]:
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _content_coding(response: httpx.Response) -> str | None:
    """The Content-Encoding of `response` (gzip, br...), or None for the file's own bytes."""
    coding = response.headers.get("content-encoding", "identity").strip().lower()
    return None if coding in ("", "identity") else coding


def _refuse_encoded(response: httpx.Response, where: str) -> None:
    """A file the server keeps encoded (an S3 object stored with Content-Encoding: gzip, a
    precompressed file) has its sizes and ranges in encoded bytes, whatever Accept-Encoding
    asks: refused at opening, where it would otherwise fail every read."""
    coding = _content_coding(response)
    if coding is not None:
        raise SourceError(f"{where}: the server sends the file encoded (Content-Encoding: "
                          f"{coding}), not its own bytes; fuseclone needs those")


def _content_range(response: httpx.Response) -> tuple[int, int, int | None]:
    value = response.headers.get("content-range")
    if value is None:
        raise ValueError("a 206 answer without Content-Range")
    m = _CONTENT_RANGE.match(value)
    if not m:
        raise ValueError(f"an unexpected Content-Range: {value!r}")
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


def _status_line(response: httpx.Response) -> str:
    return f"HTTP {response.status_code} {response.reason_phrase}".rstrip()


def _describe_transport_error(exc: httpx.HTTPError) -> str:
    """One line for a connection-level failure: refused, DNS, TLS, timeout, early close."""
    tls: ssl.SSLError | None = None
    oserr: OSError | None = None
    stack: list[BaseException] = [exc]
    seen: set[int] = set()
    while stack:  # the causes, including the attempts inside trio's exception groups
        err = stack.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, ssl.SSLError):
            tls = tls or err
        elif isinstance(err, OSError) and err.errno is not None and oserr is None:
            oserr = err
        if isinstance(err, BaseExceptionGroup):
            stack.extend(reversed(err.exceptions))
        stack.extend(e for e in (err.__context__, err.__cause__) if e is not None)
    text = str(exc).strip()
    if tls is not None:
        reason = getattr(tls, "verify_message", None) or getattr(tls, "reason", None) or str(tls)
        return f"TLS failure: {reason}"
    if isinstance(exc, httpx.ConnectTimeout):
        return "timed out connecting"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out waiting for the server"
    detail = text
    if oserr is not None:
        if isinstance(oserr, socket.gaierror):
            return f"cannot resolve the host name ({oserr.strerror})"
        detail = os.strerror(oserr.errno) if oserr.errno > 0 else (oserr.strerror or text)
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect: {detail or 'connection failed'}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"the server broke off the answer ({text or 'protocol error'})"
    if isinstance(exc, (httpx.ReadError, httpx.WriteError)):
        return f"connection lost ({detail or type(exc).__name__})"
    return text or type(exc).__name__
