"""The HTTP(S) source against real servers on 127.0.0.1: nginx (Range support, ETags, injected
500s, a location without ranges, TLS), Python's http.server (which ignores Range) and a small
scripted server for hangs and broken-off bodies. Also the engine hydrating from nginx."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import functools
import hashlib
import http.server
import logging
import mmap
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse

import pytest
import trio

from fuseclone.clone import open_clone, running
from fuseclone.engine import Settings
from fuseclone.errors import FusecloneError, MetadataError, SourceError
from fuseclone.sources import open_source
from fuseclone.sources.base import SourceReadError
from fuseclone.sources.http import RECEIVE_BYTES, open_http_source

KiB = 1024
MiB = 1024 * KiB
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

FILE_SIZE = 3 * MiB + 12345  # not a multiple of any piece or region size
# What /bearer/ wants in `Authorization: Bearer ...`: the first, then once {tmp}/rotated
# exists the second (distinctive: tests grep for them).
FIRST_TOKEN = "tok-first-9Xq2vL7"
SECOND_TOKEN = "tok-second-4Rm8kP1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def write_file(path, size, seed) -> bytes:
    data = random.Random(seed).randbytes(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


def replace_file(path, data: bytes, *, mtime_step: int = 10) -> None:
    """Swap in new content under the same name, with a visibly later mtime (nginx's ETag is
    mtime-size: a same-size file replaced within the same second would keep its ETag)."""
    old = os.stat(path).st_mtime
    tmp = f"{path}.new"
    with open(tmp, "wb") as f:
        f.write(data)
    os.utime(tmp, (old + mtime_step, old + mtime_step))
    os.replace(tmp, path)


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format fc escape=none
        '$request_method|$status|$http_range|$http_if_match|$http_if_unmodified_since|$uri|'
        '$connection';
    access_log {tmp}/access.log fc;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
{tls_server}
        root {root};
        location /fail/ {{ return 500; }}
        location /forbidden/ {{ return 403; }}
        location /norange/ {{ alias {root}/; max_ranges 0; }}
        location /noetag/ {{ alias {root}/; etag off; }}
        location /unversioned/ {{ alias {root}/; etag off; add_header Last-Modified ""; }}
        location /toggle/ {{
            alias {root}/;
            if (-f {tmp}/fault) {{ return 500; }}
        }}
        location ~ ^/redirect/(.*)$ {{ return 302 /$1; }}
        location ~ ^/plain/(.*)$ {{ return 302 http://127.0.0.1:{port}/$1; }}
        location /shortkeepalive/ {{ alias {root}/; keepalive_timeout 100ms; }}
        location /bearer/ {{
            alias {root}/;
            set $token "Bearer {first_token}";
            if (-f {tmp}/rotated) {{ set $token "Bearer {second_token}"; }}
            if ($http_authorization != $token) {{ return 401; }}
        }}
    }}
}}
"""

TLS_SERVER = """\
    }}
    server {{
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {tmp}/cert.pem;
        ssl_certificate_key {tmp}/key.pem;"""


class Nginx:
    """One nginx in the foreground, everything under `tmp`; stop() and start() again at will."""

    def __init__(self, tmp, *, tls: bool = False) -> None:
        self.tmp = tmp
        self.root = tmp / "www"
        self.root.mkdir()
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        tls_server = TLS_SERVER.format(tmp=tmp, root=self.root, tls_port=self.tls_port) if tls else ""
        self.conf = tmp / "nginx.conf"
        self.conf.write_text(NGINX_CONF.format(tmp=tmp, root=self.root, port=self.port,
                                               tls_server=tls_server, first_token=FIRST_TOKEN,
                                               second_token=SECOND_TOKEN))
        self.proc: subprocess.Popen | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def tls_url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.tls_port}/{path}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [NGINX, "-e", str(self.tmp / "error.log"), "-c", str(self.conf), "-p", str(self.tmp)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_port(self.port, self.proc)
            if self.tls_port:
                wait_for_port(self.tls_port, self.proc)
        except RuntimeError:
            self.stop()
            raise RuntimeError("nginx did not start: "
                               + (self.tmp / "error.log").read_text(errors="replace")[-2000:])

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # fast shutdown
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def log(self) -> list[list[str]]:
        """The access log, one list of fields per request (method, status, Range, If-Match,
        If-Unmodified-Since, uri, connection number)."""
        path = self.tmp / "access.log"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            rows.append(["" if field == "-" else field for field in line.split("|")])
        return rows


@pytest.fixture
def nginx(tmp_path):
    if NGINX is None:
        pytest.skip("nginx is not installed")
    server = Nginx(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()
    # the source is read-only: nothing but HEAD and GET ever reached the server
    assert {row[0] for row in server.log()} <= {"HEAD", "GET"}


@pytest.fixture
def image(nginx) -> bytes:
    return write_file(nginx.root / "image.raw", FILE_SIZE, seed=1)


def assert_one_line(exc_info, *needles):
    text = str(exc_info.value)
    assert "\n" not in text and text.strip() == text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


# ---- opening --------------------------------------------------------------------------------


async def test_size_identity_and_reads_are_ranged_and_conditional(nginx, image):
    url = nginx.url("image.raw")
    st = os.stat(nginx.root / "image.raw")
    async with open_source(url) as source:  # through the scheme dispatcher
        assert source.size == FILE_SIZE
        assert source.description == url
        etag = f'"{int(st.st_mtime):x}-{st.st_size:x}"'  # nginx: hex mtime - hex size
        ident = source.identity()
        assert ident["kind"] == "http" and ident["url"] == url and ident["size"] == FILE_SIZE
        assert ident["etag"] == etag
        assert ident["last_modified"].endswith(" GMT")
        assert await source.read(1000, 5000) == image[1000:6000]
    gets = [row for row in nginx.log() if row[0] == "GET"]
    assert gets and all(row[1] == "206" and row[3] == etag for row in gets)
    assert ["GET", "206", "bytes=1000-5999", etag, "", "/image.raw"] in [g[:6] for g in gets]


async def test_reads_equal_the_file_unaligned_split_and_the_partial_last_piece(nginx, image):
    async with open_http_source(nginx.url("image.raw"), piece_size=256 * KiB) as source:
        assert await source.read(0, FILE_SIZE) == image  # 13 pieces, the last one partial
        assert await source.read(12345, MiB + 7) == image[12345 : 12345 + MiB + 7]
        assert await source.read(FILE_SIZE - 1000, 5000) == image[-1000:]  # clipped at the end
        assert await source.read(FILE_SIZE - 1, 1) == image[-1:]
        assert await source.read(7, 0) == b""
        assert await source.read(FILE_SIZE, 4096) == b""
        with pytest.raises(SourceReadError):
            await source.read(-1, 10)
    ranges = [row[2] for row in nginx.log() if row[0] == "GET"]
    pieces = -(-FILE_SIZE // (256 * KiB))
    assert len(ranges) == pieces + 5 + 2  # the clipped and one-byte reads: one GET each
    assert f"bytes={(pieces - 1) * 256 * KiB}-{FILE_SIZE - 1}" in ranges


async def test_copies_arrive_in_page_aligned_buffers_that_are_reused(nginx, image):
    """Hydration copies land in page-aligned memory (DST takes them with direct I/O), split
    into pieces or not, and a recycled buffer serves the next copy of its size."""
    async with open_http_source(nginx.url("image.raw"), piece_size=256 * KiB) as source:
        for offset, length in ((0, MiB), (MiB, 256 * KiB)):  # four pieces, then one
            data = await source.read_for_copy(offset, length)
            assert ctypes.addressof(ctypes.c_char.from_buffer(data)) % mmap.PAGESIZE == 0
            assert data[:] == image[offset : offset + length]  # an mmap compares by identity
            source.recycle(data)
            again = await source.read_for_copy(offset + length, length)
            assert again is data and again[:] == image[offset + length : offset + 2 * length]


async def test_responses_are_read_in_large_socket_reads(nginx, image):
    from httpcore._async.http11 import AsyncHTTP11Connection

    async with open_http_source(nginx.url("image.raw")) as source:
        assert await source.read(0, 4096) == image[:4096]
        assert AsyncHTTP11Connection.READ_NUM_BYTES == RECEIVE_BYTES > 64 * KiB


async def test_many_concurrent_reads(nginx, image):
    rng = random.Random(7)
    wanted = [(rng.randrange(FILE_SIZE), rng.randrange(1, 300 * KiB)) for _ in range(64)]
    got = {}

    async with open_http_source(nginx.url("image.raw"), max_connections=4,
                                piece_size=128 * KiB) as source:
        async def one(i, off, n):
            got[i] = await source.read(off, n)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i, (off, n) in enumerate(wanted):
                    nursery.start_soon(one, i, off, n)
    for i, (off, n) in enumerate(wanted):
        assert got[i] == image[off : off + n], f"read {i} at {off}+{n}"
    gets = [row for row in nginx.log() if row[0] == "GET"]
    connections = {row[6] for row in gets}
    # pooled: at most 4 connections and the one more that users' reads may take, each reused
    assert len(connections) <= 5 < len(gets)


async def test_connections_the_server_closed_while_idle_are_not_reused(nginx, image):
    # nginx drops idle keep-alive connections after 100 ms here; without retries, a read
    # after that succeeds only if the pool notices and opens a new connection
    async with open_http_source(nginx.url("shortkeepalive/image.raw"), retry_delays=()) as source:
        for i in range(3):
            assert await source.read(i * 4096, 4096) == image[i * 4096 : (i + 1) * 4096]
            await trio.sleep(0.3)
    assert len({row[6] for row in nginx.log() if row[0] == "GET"}) == 3


async def test_identity_changes_when_the_file_changes(nginx, image):
    url = nginx.url("image.raw")
    async with open_http_source(url) as source:
        before = source.identity()
    replace_file(nginx.root / "image.raw", bytes(reversed(image)))
    async with open_http_source(url) as source:
        after = source.identity()
        assert await source.read(0, 100) == bytes(reversed(image))[:100]
    assert before["size"] == after["size"]
    assert before["etag"] != after["etag"] and before["last_modified"] != after["last_modified"]
    assert before != after


async def test_redirect_is_followed_and_reads_go_to_the_target(nginx, image):
    url = nginx.url("redirect/image.raw")
    async with open_http_source(url) as source:
        assert source.description == url and source.identity()["url"] == url
        assert source.url == nginx.url("image.raw")
        assert await source.read(100, 200) == image[100:300]
    redirected = [row for row in nginx.log() if row[5].startswith("/redirect/")]
    assert [row[:2] for row in redirected] == [["HEAD", "302"]]  # reads skip the redirect


async def test_password_in_the_url_is_not_shown(nginx, image):
    url = f"http://someone:secret@127.0.0.1:{nginx.port}/image.raw"
    async with open_http_source(url) as source:
        assert "secret" not in source.description and "someone:***@" in source.description
        assert "secret" not in str(source.identity())
        assert await source.read(0, 10) == image[:10]


# ---- refused at open: one clear line naming the URL --------------------------------------------


async def test_refused_when_nginx_has_ranges_turned_off(nginx, image):
    url = nginx.url("norange/image.raw")
    with pytest.raises(SourceError) as info:
        async with open_http_source(url):
            pass
    assert_one_line(info, url, "does not support Range requests", "fuseclone needs them")


async def test_refused_by_a_server_that_ignores_range(tmp_path):
    (tmp_path / "image.raw").write_bytes(b"x" * 100_000)
    handler = functools.partial(QuietFileHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/image.raw"
        with pytest.raises(SourceError) as info:
            async with open_http_source(url):
                pass
        assert_one_line(info, url, "does not support Range requests")
        assert [r[:2] for r in server.requests] == [("HEAD", None), ("GET", "bytes=0-0")]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize("path, needle", [
    ("missing.raw", "HTTP 404 Not Found"),
    ("forbidden/image.raw", "HTTP 403 Forbidden"),
    ("fail/image.raw", "HTTP 500 Internal Server Error"),
])
async def test_refused_http_errors(nginx, image, path, needle):
    url = nginx.url(path)
    with pytest.raises(SourceError) as info:
        async with open_source(url):
            pass
    assert_one_line(info, url, needle)


async def test_refused_connection_refused_and_bad_urls():
    url = f"http://127.0.0.1:{free_port()}/image.raw"
    with pytest.raises(SourceError) as info:
        async with open_http_source(url):
            pass
    assert_one_line(info, url, "cannot connect", "refused")
    for bad in ("http:///image.raw", "http://127.0.0.1:99999999/x"):
        with pytest.raises(SourceError) as info:
            async with open_http_source(bad):
                pass
        assert_one_line(info, bad)
    with pytest.raises(FusecloneError, match="unknown source URL scheme"):
        async with open_source("ftp://127.0.0.1/image.raw"):
            pass


# ---- faults while reading: SourceReadError (EIO), and recovery ---------------------------------


async def test_500_while_reading_is_a_read_error_and_recovers(nginx, image):
    async with open_http_source(nginx.url("toggle/image.raw"), retry_delays=(0.01,)) as source:
        assert await source.read(0, 4096) == image[:4096]
        (nginx.tmp / "fault").touch()
        with pytest.raises(SourceReadError) as info:
            await source.read(MiB, 4096)
        assert info.value.errno == errno.EIO
        assert "HTTP 500" in str(info.value) and nginx.url("toggle/image.raw") in str(info.value)
        (nginx.tmp / "fault").unlink()
        assert await source.read(MiB, 4096) == image[MiB : MiB + 4096]
    statuses = [row[1] for row in nginx.log() if row[0] == "GET"]
    assert statuses.count("500") == 2  # one retry, then the error


async def test_server_stopped_mid_way_then_restarted(nginx, image):
    async with open_http_source(nginx.url("image.raw")) as source:
        assert await source.read(0, 65536) == image[:65536]
        nginx.stop()
        with trio.fail_after(5):
            with pytest.raises(SourceReadError) as info:
                await source.read(2 * MiB, 65536)
        assert info.value.errno == errno.EIO and "bytes 2097152-2162687" in str(info.value)
        nginx.start()
        assert await source.read(2 * MiB, 3 * 65536) == image[2 * MiB : 2 * MiB + 3 * 65536]


async def test_file_replaced_mid_clone_fails_if_match(nginx, image):
    path = nginx.root / "image.raw"
    async with open_http_source(nginx.url("image.raw")) as source:
        etag = source.etag
        assert await source.read(0, 4096) == image[:4096]
        replace_file(path, random.Random(2).randbytes(FILE_SIZE))
        with pytest.raises(SourceReadError) as info:
            await source.read(4096, 4096)
        assert "changed on the server" in str(info.value) and etag in str(info.value)
    assert ["GET", "412"] == nginx.log()[-1][:2]


async def test_file_replaced_mid_clone_fails_if_unmodified_since_without_etag(nginx, image):
    path = nginx.root / "image.raw"
    async with open_http_source(nginx.url("noetag/image.raw")) as source:
        assert source.etag is None and source.last_modified
        assert "etag" not in source.identity() and "last_modified" in source.identity()
        assert await source.read(0, 4096) == image[:4096]
        replace_file(path, random.Random(3).randbytes(FILE_SIZE))
        with pytest.raises(SourceReadError, match="changed on the server"):
            await source.read(4096, 4096)
    last = nginx.log()[-1]
    assert last[:2] == ["GET", "412"] and last[4] == source.last_modified


async def test_file_shrunk_mid_clone_fails(nginx, image):
    async with open_http_source(nginx.url("noetag/image.raw")) as source:
        (nginx.root / "image.raw").write_bytes(image[: FILE_SIZE // 2])
        os.utime(nginx.root / "image.raw", (1, 1))  # an *older* mtime: only the size tells
        with pytest.raises(SourceReadError, match="changed on the server"):
            await source.read(0, 4096)
        with pytest.raises(SourceReadError):
            await source.read(FILE_SIZE - 4096, 4096)


async def test_a_file_without_version_mark_replaced_while_the_server_was_away_fails_reads(
        nginx, image):
    """A file served with neither ETag nor Last-Modified is known by its data sample alone: a
    server that failed a request (stopped, restarted) may have come back with another file,
    so the sample is read again before anything it sends is used; other data fails every
    later read instead of mixing two versions into one image."""
    async with open_source(nginx.url("unversioned/image.raw")) as source:
        assert source.etag is None and source.last_modified is None and source.sample
        assert await source.read(0, 4096) == image[:4096]
        nginx.stop()
        with pytest.raises(SourceReadError):
            await source.read(MiB, 4096)
        nginx.start()  # the same file: reads go on
        assert await source.read(MiB, 4096) == image[MiB : MiB + 4096]
        nginx.stop()
        with pytest.raises(SourceReadError):
            await source.read(MiB, 4096)
        (nginx.root / "image.raw").write_bytes(random.Random(5).randbytes(FILE_SIZE))
        nginx.start()
        for offset in (MiB, 0):
            with pytest.raises(SourceReadError) as info:
                await source.read(offset, 4096)
            assert info.value.errno == errno.EIO
            assert_one_line(info, nginx.url("unversioned/image.raw"),
                            "the source changed since the clone began")
    assert not any("last-modified" in row for row in nginx.log())


async def test_a_file_without_version_mark_replaced_while_no_request_was_out_fails_reads(
        nginx, image):
    """A server restarted between two reads fails neither: the next goes out on a new
    connection. That connection may reach the server back on another file (or another server
    of the name), so its answers wait for the sample, as after a failed request: the same file
    reads on, another fails every later read instead of mixing two versions into one image."""
    url = nginx.url("unversioned/image.raw")
    async with open_source(url) as source:
        assert await source.read(0, 4096) == image[:4096]
        nginx.stop()  # no read while it is away
        nginx.start()
        assert await source.read(MiB, 4096) == image[MiB : MiB + 4096]
        nginx.stop()
        (nginx.root / "image.raw").write_bytes(random.Random(6).randbytes(FILE_SIZE))
        nginx.start()
        for offset in (2 * MiB, 0):
            with pytest.raises(SourceReadError) as info:
                await source.read(offset, 4096)
            assert info.value.errno == errno.EIO
            assert_one_line(info, url, "the source changed since the clone began")


class ScriptedHandler(http.server.BaseHTTPRequestHandler):
    """HEAD answers like a ranged file server; GET does what `server.mode` says."""

    protocol_version = "HTTP/1.1"
    SIZE = 1 * MiB

    def log_message(self, *args):
        pass

    def expired(self):
        """A pre-signed URL whose signature is not the valid one: refused, as S3 does."""
        valid = self.server.valid_query
        if valid is None or urllib.parse.urlsplit(self.path).query == valid:
            return False
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def refused_without_password(self):
        """A server that wants `server.basic` in Authorization: 401 without it."""
        if self.server.basic is None or self.headers.get("Authorization") == self.server.basic:
            return False
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="images"')
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def redirected_here(self):
        """head "redirect-here": /image.raw is at /moved.raw on this server (an absolute URL,
        as nginx's `return 302 /...` sends)."""
        if self.server.head != "redirect-here" or self.path != "/image.raw":
            return False
        self.send_response(302)
        self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/moved.raw")
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def do_HEAD(self):
        self.server.requests.append((self.command, dict(self.headers)))
        if self.expired() or self.refused_without_password() or self.redirected_here():
            return
        if self.server.head == "redirect":  # to `server.location`
            self.send_response(self.server.redirect_status)
            self.send_header("Location", self.server.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.server.head == "gated":  # answered once the test opens the gate
            self.server.at_gate.set()
            self.server.gate.wait(30)
        if self.server.head == "405":  # e.g. a URL pre-signed for GET only
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        if self.server.head != "no-length":
            self.send_header("Content-Length", str(self.SIZE))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", self.etag())
        if self.server.head == "encoded":  # a file kept compressed (an S3 object's metadata)
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()

    def etag(self):
        return 'W/"v1"' if self.server.head == "weak-etag" else '"v1"'

    def do_GET(self):
        self.server.requests.append((self.command, dict(self.headers)))
        self.server.gets += 1
        if self.expired() or self.refused_without_password() or self.redirected_here():
            return
        if self.server.head == "redirect":  # a GET is redirected as a HEAD is
            self.send_response(self.server.redirect_status)
            self.send_header("Location", self.server.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        mode = self.server.mode
        first, last = (int(x) for x in self.headers["Range"].split("=")[1].split("-"))
        hang_once = mode == "hang-once" and first == 0 and not self.server.hung
        if mode == "hang" or (mode == "hang-large" and last - first >= 64 * KiB) or hang_once:
            self.server.hung = True
            self.server.release.wait(10)
            self.close_connection = True
            return
        if mode == "slow":  # latency: 0.2 s before each answer
            time.sleep(0.2)
        for _ in range(2 if mode == "twice" else 1):  # twice: once more, unasked
            self.answer(first, last, mode)

    def answer(self, first, last, mode):
        n = last - first + 1
        self.send_response(206)
        total = "*" if self.server.head == "no-length" else self.SIZE
        self.send_header("Content-Range", f"bytes {first}-{last}/{total}")
        self.send_header("Content-Length", str(n))
        self.send_header("ETag", '"v2"' if mode == "other-etag" else self.etag())
        if mode == "encoded":
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        if mode == "short":
            self.wfile.write(b"y" * (n // 2))
            self.close_connection = True
        elif mode == "forged":  # the body and, in the same packet, unasked, a well-formed
            # answer for the next range
            self.wfile.write(b"y" * n + b"HTTP/1.1 206 Partial Content\r\n"
                             + f"Content-Range: bytes {last + 1}-{last + n}/{self.SIZE}\r\n"
                               f"Content-Length: {n}\r\nETag: {self.etag()}\r\n\r\n".encode()
                             + b"F" * n)
        elif mode == "trickle":  # `server.rate` bytes a second, a byte at a time
            for _ in range(n):
                if self.server.release.wait(1 / self.server.rate):
                    break
                self.wfile.write(b"y")
                self.wfile.flush()
            self.close_connection = True
        else:
            self.wfile.write(b"y" * n)


class ScriptedServer(http.server.ThreadingHTTPServer):
    # socketserver's default listen backlog of 5: under load, a burst of 8 connects overflowed
    # it and one SYN was retried a second later, failing the latency test.
    request_queue_size = 64
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.mode, self.head, self.gets, self.release = "ok", "ok", 0, threading.Event()
        self.at_gate, self.gate = threading.Event(), threading.Event()
        self.requests: list[tuple[str, dict]] = []  # (method, headers) of each request
        self.location: str | None = None  # where head "redirect" sends a HEAD (and a GET)
        self.redirect_status = 302  # how
        self.valid_query: str | None = None  # if set, requests with another query get 403
        self.hung = False  # whether mode "hang-once" has hung its one GET
        self.basic: str | None = None  # if set, requests without this Authorization get 401
        self.rate = 10  # bytes a second in mode "trickle"


@pytest.fixture
def scripted():
    with serving_scripted() as (server, url):
        yield server, url


@contextlib.contextmanager
def serving_scripted():
    """A ScriptedServer on a free port, serving, and its URL."""
    server = ScriptedServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}/image.raw"
    finally:
        server.release.set()
        server.gate.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


async def test_size_from_the_range_probe_when_head_is_refused(scripted):
    server, url = scripted
    server.head = "405"
    async with open_http_source(url) as source:
        assert source.size == ScriptedHandler.SIZE and source.etag == '"v1"'
        assert await source.read(ScriptedHandler.SIZE - 10, 100) == b"y" * 10


async def test_a_weak_etag_alone_is_named_in_the_warning(scripted, caplog):
    """A weak ETag cannot make reads conditional (If-Match compares strongly), but it is kept
    in the identity: the warning says so instead of "neither ETag nor Last-Modified"."""
    server, url = scripted
    server.head = "weak-etag"
    with caplog.at_level(logging.WARNING, logger="fuseclone"):
        async with open_http_source(url) as source:
            assert await source.read(0, 10) == b"y" * 10
            assert source.identity()["etag"] == 'W/"v1"'
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "weak ETag" in warnings[0] and "neither" not in warnings[0]


@pytest.mark.parametrize("head, sampled", [("ok", False), ("weak-etag", True)])
async def test_only_an_object_without_a_strong_etag_is_known_by_a_data_sample(scripted, head,
                                                                              sampled):
    """A strong ETag names the object's content: no read at opening. Without one, the first
    and last 64 KiB are read (at once) and their SHA-256 joins the identity."""
    server, url = scripted
    server.head = head
    async with open_source(url) as source:
        sample = hashlib.sha256(b"y" * (128 * KiB)).hexdigest()
        assert source.identity().get("sample_sha256") == (sample if sampled else None)
        assert server.gets == (2 if sampled else 0)


async def test_refused_without_a_size(scripted):
    server, url = scripted
    server.head = "no-length"
    with pytest.raises(SourceError) as info:
        async with open_http_source(url):
            pass
    assert_one_line(info, url, "no Content-Length")


@pytest.mark.parametrize("head, mode", [("encoded", "encoded"), ("405", "encoded")])
async def test_a_file_the_server_sends_encoded_is_refused_at_opening(scripted, head, mode):
    """Sizes and ranges of a file kept encoded (Content-Encoding: gzip whatever the request
    asks) are the encoded bytes': refused at opening (HEAD, or the Range probe when HEAD is
    refused), not mounted to fail every read."""
    server, url = scripted
    server.head, server.mode = head, mode
    with pytest.raises(SourceError) as info:
        async with open_source(url):
            pass
    assert_one_line(info, url, "the server sends the file encoded (Content-Encoding: gzip)")


async def test_opening_is_bounded_by_the_connect_timeout(scripted):
    """A server that accepts but never answers HEAD: opening fails after the connect timeout,
    as an NBD dial and handshake does, not after the 30 s of a read (a resumed clone's mount
    waits for the first attempt)."""
    server, url = scripted
    server.head = "gated"
    start = trio.current_time()
    with pytest.raises(SourceError) as info:
        async with open_http_source(url, connect_timeout=0.5, timeout=20):
            pass
    assert trio.current_time() - start < 5
    assert_one_line(info, url, "no answer within 0.5 s")


async def test_the_header_file_goes_to_the_named_server_alone(scripted, tmp_path):
    """A server that redirects to another (a download to a pre-signed URL, or a server that
    sends its clients anywhere): the header file's token and key go to the named server only,
    neither in the redirected HEAD nor in the reads that then go to the other server."""
    server, url = scripted
    headers = tmp_path / "headers"
    headers.write_text(f"Authorization: Bearer {FIRST_TOKEN}\nX-Api-Key: {SECOND_TOKEN}\n")
    with serving_scripted() as (other, other_url):
        server.head, server.location = "redirect", other_url
        async with open_source(url, http_header_file=str(headers)) as source:
            assert source.url == other_url
            assert await source.read(0, 100) == b"y" * 100
        assert [method for method, _ in other.requests] == ["HEAD", "GET"]
        for _, sent in other.requests:
            assert FIRST_TOKEN not in str(sent) and SECOND_TOKEN not in str(sent)
    [(_, sent)] = server.requests  # the named server had them
    assert sent["Authorization"] == f"Bearer {FIRST_TOKEN}" and sent["X-Api-Key"] == SECOND_TOKEN


@pytest.mark.parametrize("header_file", [False, True])
async def test_a_url_password_goes_with_every_request_to_its_server(scripted, tmp_path,
                                                                    header_file):
    """`http://user:pw@host/...`: the password is sent (basic auth) with every request to that
    server, the reads that go where a redirect on the same server led too (an absolute
    Location has no password in it), and with a header file's headers as well."""
    server, url = scripted
    server.head = "redirect-here"
    server.basic = "Basic " + base64.b64encode(b"us@er:p:w").decode()
    headers = tmp_path / "headers"
    headers.write_text(f"X-Api-Key: {SECOND_TOKEN}\n")
    given = url.replace("http://", "http://us%40er:p%3Aw@")
    async with open_source(given, http_header_file=str(headers) if header_file else None) \
            as source:
        assert source.url.endswith("/moved.raw") and "p%3Aw" not in source.url
        assert await source.read(0, 100) == b"y" * 100
        assert "p%3Aw" not in str(source.identity()) and "p%3Aw" not in source.description
    assert [method for method, _ in server.requests] == ["HEAD", "HEAD", "GET"]
    for _, sent in server.requests:
        assert sent["Authorization"] == server.basic
        assert (sent.get("X-Api-Key") == SECOND_TOKEN) == header_file


async def test_a_url_password_and_a_header_file_authorization_are_refused_together(
        scripted, tmp_path):
    server, url = scripted
    headers = tmp_path / "headers"
    headers.write_text(f"Authorization: Bearer {FIRST_TOKEN}\n")
    with pytest.raises(SourceError) as info:
        async with open_source(url.replace("http://", "http://user:secret-pw@"),
                               http_header_file=str(headers)):
            pass
    assert_one_line(info, "user:***@", "Authorization", str(headers))
    assert "secret-pw" not in str(info.value) and FIRST_TOKEN not in str(info.value)
    assert server.requests == []


@pytest.mark.parametrize("version", ["same", "other"])
async def test_an_expired_redirect_target_is_followed_again_for_the_same_file(scripted, version):
    """A download redirected to a pre-signed URL (GitHub releases, S3): reads go there until it
    expires (403), then the named URL is asked again where the same file is now; a target
    that now serves another version of it is a read error, not mixed data."""
    server, url = scripted
    with serving_scripted() as (other, other_url):
        server.head, server.location = "redirect", other_url + "?sig=1"
        other.valid_query = "sig=1"
        async with open_http_source(url) as source:
            assert await source.read(0, 100) == b"y" * 100
            server.location, other.valid_query = other_url + "?sig=2", "sig=2"  # sig=1 expired
            if version == "other":
                other.mode = "other-etag"
            gets = other.gets
            if version == "same":
                assert await source.read(1000, 100) == b"y" * 100
                assert source.url == other_url + "?sig=2"
                assert await source.read(2000, 100) == b"y" * 100
                assert other.gets - gets == 4  # refused, the probe, the read again; the next read
            else:
                with pytest.raises(SourceReadError, match="another file") as info:
                    await source.read(1000, 100)
                assert info.value.errno == errno.EIO


async def test_timeout_is_a_read_error(scripted):
    server, url = scripted
    async with open_http_source(url, timeout=0.3) as source:
        assert await source.read(0, 10) == b"y" * 10
        server.mode = "hang"
        start = trio.current_time()
        with pytest.raises(SourceReadError, match="timed out") as info:
            await source.read(0, 10)
        assert info.value.errno == errno.EIO
        assert trio.current_time() - start < 2
        assert server.gets == 2  # a timeout is not retried: the server had its chance


async def test_a_get_that_hangs_while_the_server_answers_others_is_sent_again(scripted):
    """One request the server never answers while it answers the others (a stuck backend
    behind a balancer, a connection lost without a reset): after the timeout it is sent again
    on another connection, within the retries' budget, instead of failing the read."""
    server, url = scripted
    server.mode = "hang-once"
    async with open_http_source(url, timeout=0.5, retry_delays=(0.01,)) as source:
        async def keep_reading():
            while True:
                assert await source.read(4096, 10) == b"y" * 10
                await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_reading)
            with trio.fail_after(5):
                assert await source.read(0, 10) == b"y" * 10
            nursery.cancel_scope.cancel()
    assert server.hung


async def test_a_trickling_answer_fails_at_its_deadline_a_slow_one_does_not(scripted):
    """A server sending 10 bytes a second keeps each request alive (no 30 s of silence): a
    request's whole answer must arrive within twice the timeout plus its size at `min_rate`,
    or the read fails instead of taking hours; an answer at twice that rate is waited for."""
    server, url = scripted
    async with open_http_source(url, timeout=0.25, min_rate=100) as source:
        server.mode = "trickle"
        start = trio.current_time()
        with trio.fail_after(5):
            with pytest.raises(SourceReadError) as info:
                await source.read(0, 100)
        assert 1.4 < trio.current_time() - start < 3  # 2 x 0.25 s + 100 bytes at 100 B/s
        assert_one_line(info, url, "bytes 0-99", "too slow")
        assert info.value.errno == errno.EIO
        server.rate = 200
        assert await source.read(0, 100) == b"y" * 100  # in about 0.5 s, within 1.5 s


async def test_copies_that_hang_leave_connections_for_reads_users_wait_for(scripted):
    """Hydration's copies on connections the server never answers (a hung backend) hold their
    connections until they time out; a user's read of other data must not queue behind them."""
    server, url = scripted
    server.mode = "hang-large"
    async with open_http_source(url, max_connections=4, timeout=3) as source:
        async with trio.open_nursery() as nursery:
            for i in range(5):  # more than max_connections
                nursery.start_soon(source.read_for_copy, i * 256 * KiB, 256 * KiB)
            with trio.fail_after(5):
                while server.gets < 4:  # the server has every copy
                    await trio.sleep(0.01)
            with trio.fail_after(1):
                assert await source.read(0, 4096) == b"y" * 4096
            nursery.cancel_scope.cancel()


async def test_short_body_and_foreign_etag_are_read_errors(scripted):
    server, url = scripted
    async with open_http_source(url, retry_delays=(0.01, 0.01)) as source:
        server.mode = "short"
        with pytest.raises(SourceReadError, match="broke off"):
            await source.read(0, 100_000)
        assert server.gets == 3  # two retries
        server.mode = "other-etag"  # a server that ignores If-Match still cannot mix versions
        with pytest.raises(SourceReadError, match="changed on the server"):
            await source.read(0, 100)
        server.mode = "ok"
        assert await source.read(0, 100_000) == b"y" * 100_000


async def test_an_answer_sent_twice_does_not_fail_the_next_read(scripted):
    """A server that answers a request twice leaves the second answer on the kept-alive
    connection, where the next request finds it: its other range is refused (never taken as
    the next read's data) and the read is sent again on another connection, not failed."""
    server, url = scripted
    server.mode = "twice"
    async with open_http_source(url, max_connections=1, retry_delays=(0.01,)) as source:
        assert await source.read(0, 100) == b"y" * 100
        assert await source.read(1000, 100) == b"y" * 100  # on another connection
    assert server.gets in (2, 3)  # 3 if it found 0-99 first (the answer came late)


async def test_bytes_past_an_answer_are_never_taken_for_the_next_one(scripted):
    """A server (or a proxy) that sends more than the answer's Content-Length: here a
    well-formed 206 for exactly the range the next read will ask for, right behind the body.
    The connection they came on is closed, so they are never taken for data; the next read
    gets its own answer. (Bytes that come later, once the connection is idle, make httpcore
    drop it when it is next taken; bytes that come after the next request was sent cannot be
    told from its answer, whose Content-Range, ETag and length are checked as always.)"""
    server, url = scripted
    server.mode = "forged"
    async with open_http_source(url, max_connections=1) as source:
        for offset in range(0, 1000, 100):
            assert await source.read(offset, 100) == b"y" * 100
    assert server.gets == 10


async def test_latency_does_not_serialise_reads(scripted):
    server, url = scripted
    server.mode = "slow"
    async with open_http_source(url, piece_size=64 * KiB, max_connections=8) as source:
        start = trio.current_time()
        assert await source.read(0, 512 * KiB) == b"y" * 512 * KiB  # 8 pieces at once
        assert trio.current_time() - start < 0.6  # serially: 1.6 s

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(source.read, i * 4096, 4096)
        assert trio.current_time() - start < 0.6
    assert server.gets == 16


class QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    """Python's file server: no Range support at all. Records what it was asked."""

    def log_message(self, *args):
        pass

    def send_head(self):
        self.server.__dict__.setdefault("requests", []).append(
            (self.command, self.headers.get("Range")))
        return super().send_head()

    def copyfile(self, source, outputfile):
        try:
            super().copyfile(source, outputfile)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up on the whole file, as it should


# ---- TLS -------------------------------------------------------------------------------------


@pytest.fixture
def tls_nginx(tmp_path):
    if NGINX is None or shutil.which("openssl") is None:
        pytest.skip("nginx or openssl is not installed")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=fuseclone test", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
        check=True, capture_output=True)
    server = Nginx(tmp_path, tls=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()


async def test_https_verifies_certificates(tls_nginx, monkeypatch):
    data = write_file(tls_nginx.root / "image.raw", 300 * KiB, seed=4)
    url = tls_nginx.tls_url("image.raw")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with pytest.raises(SourceError) as info:  # self-signed: not trusted by default
        async with open_http_source(url):
            pass
    assert_one_line(info, url, "TLS failure", "certificate")
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_nginx.tmp / "cert.pem"))
    async with open_http_source(url, piece_size=64 * KiB) as source:
        assert source.size == len(data)
        assert await source.read(1, len(data)) == data[1:]


async def test_a_redirect_from_https_to_plain_http_is_refused(tls_nginx, monkeypatch):
    """The user asked for TLS: a redirect to http:// is refused before anything is sent
    there, not followed to reads in plain text."""
    write_file(tls_nginx.root / "image.raw", 300 * KiB, seed=4)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_nginx.tmp / "cert.pem"))
    url = tls_nginx.tls_url("plain/image.raw")
    with pytest.raises(SourceError) as info:
        async with open_http_source(url):
            pass
    assert_one_line(info, url, "redirected to a plain http:// URL",
                    f"http://127.0.0.1:{tls_nginx.port}/image.raw")
    assert [(row[0], row[1], row[5]) for row in tls_nginx.log()] == [
        ("HEAD", "302", "/plain/image.raw")]


# ---- headers from a file (--http-header-file) -----------------------------------------------


def write_header_file(path, token: str) -> str:
    path.write_text(f"# for /bearer/\nAuthorization: Bearer {token}\nX-Client:  fuseclone \n")
    return str(path)


async def test_header_file_is_sent_and_re_read_when_the_token_rotates(nginx, image, tmp_path):
    url = nginx.url("bearer/image.raw")
    with pytest.raises(SourceError) as info:  # without the token: refused
        async with open_source(url):
            pass
    assert_one_line(info, url, "401")
    headers = write_header_file(tmp_path / "headers", FIRST_TOKEN)
    async with open_source(url, http_header_file=headers) as source:
        assert await source.read(0, 1000) == image[:1000]
        (nginx.tmp / "rotated").touch()  # the server now wants the second token only
        with pytest.raises(SourceReadError) as read_error:  # the file still has the first
            await source.read(0, 1000)
        assert "401" in str(read_error.value)
        write_header_file(tmp_path / "headers", SECOND_TOKEN)  # rotated: picked up on the 401
        assert await source.read(MiB, 2 * MiB) == image[MiB : 3 * MiB]
    statuses = [row[1] for row in nginx.log()]
    assert statuses.count("401") == 4  # the open without a token; twice with the old; once


@pytest.mark.parametrize("content, needle", [
    ("Authorization Bearer x\n", "line 1"),
    ("# ok\n\nBad Name: x\n", "line 3"),
    ("X-Empty:\n", "line 1"),
])
async def test_a_malformed_header_file_is_one_line_without_its_content(nginx, image, tmp_path,
                                                                      content, needle):
    path = tmp_path / "headers"
    path.write_text(content)
    with pytest.raises(SourceError) as info:
        async with open_source(nginx.url("image.raw"), http_header_file=str(path)):
            pass
    assert_one_line(info, str(path), needle)
    assert "Bearer" not in str(info.value)


async def test_a_missing_header_file_and_a_header_file_for_a_local_source(nginx, image, tmp_path):
    with pytest.raises(SourceError) as info:
        async with open_source(nginx.url("image.raw"), http_header_file=str(tmp_path / "none")):
            pass
    assert_one_line(info, "cannot read the header file", "No such file")
    with pytest.raises(SourceError) as info:
        async with open_source(str(nginx.root / "image.raw"), http_header_file=str(tmp_path)):
            pass
    assert_one_line(info, "--http-header-file applies to")


# ---- the engine hydrating from nginx --------------------------------------------------------


async def test_engine_hydrates_from_nginx_and_refuses_meta_of_a_changed_file(nginx, image, tmp_path):
    url = nginx.url("image.raw")
    dst, meta = str(tmp_path / "dst.img"), str(tmp_path / "meta")
    async with open_http_source(url) as source:
        engine = open_clone(source, dst, meta, region_size=64 * KiB,
                            settings=Settings(hydration_batch_size=4))
        async with running(engine):
            assert await engine.read(5 * MiB // 2 + 3, 1000) == image[5 * MiB // 2 + 3 :][:1000]
            with trio.fail_after(20):
                await engine.complete.wait()
            status = engine.status()
            assert status.hydrated_regions == status.total_regions == -(-FILE_SIZE // (64 * KiB))
    with open(dst, "rb") as f:
        assert f.read() == image

    # the same file, untouched: the metadata is accepted again
    async with open_http_source(url) as source:
        engine = open_clone(source, dst, meta)
        async with running(engine):
            assert engine.complete.is_set()

    replace_file(nginx.root / "image.raw", random.Random(5).randbytes(FILE_SIZE))
    meta_before = open(meta, "rb").read()
    async with open_http_source(url) as source:
        with pytest.raises(MetadataError) as info:
            open_clone(source, dst, meta)
    assert_one_line(info, "the source changed since the clone began", "etag")
    assert open(meta, "rb").read() == meta_before  # refused without changing anything


async def test_a_re_signed_url_resumes_the_clone_of_the_same_object(nginx, image, tmp_path):
    dst, meta = str(tmp_path / "dst.img"), str(tmp_path / "meta")
    async with open_http_source(nginx.url("image.raw") + "?X-Amz-Signature=aaa&X-Amz-Expires=60") as source:
        engine = open_clone(source, dst, meta, settings=Settings(hydration=False))
        async with running(engine):
            assert await engine.read(0, 4096) == image[:4096]
    # the same object under a newly signed URL: the clone resumes
    async with open_http_source(nginx.url("image.raw") + "?X-Amz-Signature=bbb&X-Amz-Expires=60") as source:
        engine = open_clone(source, dst, meta)
        async with running(engine):
            with trio.fail_after(20):
                await engine.complete.wait()
    with open(dst, "rb") as f:
        assert f.read() == image
    # another path is another object, whatever its query
    (nginx.root / "copy.raw").write_bytes(image)
    async with open_http_source(nginx.url("copy.raw") + "?X-Amz-Signature=bbb") as source:
        with pytest.raises(MetadataError) as info:
            open_clone(source, dst, meta)
    assert_one_line(info, "belongs to another clone")


def test_only_a_shared_strong_etag_lets_the_query_differ():
    from fuseclone.sources.http import same_http_object

    def ident(url, **extra):
        return {"kind": "http", "url": url, "size": 10, **extra}

    strong = {"etag": '"abc"'}
    assert same_http_object(ident("http://h/a?sig=1", **strong), ident("http://h/a?sig=2", **strong))
    assert same_http_object(ident("http://h/a?x=1"), ident("http://h/a?x=1"))
    assert not same_http_object(ident("http://h/a?sig=1"), ident("http://h/a?sig=2"))  # no ETag
    weak = {"etag": 'W/"abc"'}
    assert not same_http_object(ident("http://h/a?sig=1", **weak), ident("http://h/a?sig=2", **weak))
    assert not same_http_object(ident("http://h/a?sig=1", **strong),
                                ident("http://h/a?sig=2", etag='"abd"'))
    assert not same_http_object(ident("http://h/a?sig=1", **strong), ident("http://h/b?sig=1", **strong))
    assert not same_http_object(ident("http://h/a?s=1", **strong),
                                {**ident("http://h/a?s=2", **strong), "size": 11})


async def test_engine_user_reads_get_eio_on_5xx_and_hydration_resumes(nginx, image, tmp_path):
    url = nginx.url("toggle/image.raw")
    dst, meta = str(tmp_path / "dst.img"), str(tmp_path / "meta")
    async with open_http_source(url, retry_delays=()) as source:
        engine = open_clone(source, dst, meta, settings=Settings(
            hydration=False, max_failures=2, backoff_initial=0.01))
        async with running(engine):
            assert await engine.read(0, 4096) == image[:4096]
            (nginx.tmp / "fault").touch()
            with pytest.raises(OSError) as info:
                await engine.read(MiB, 4096)
            assert info.value.errno == errno.EIO
            engine.message("enable_hydration")
            with trio.fail_after(10):
                while engine.hydration_error is None:
                    await trio.sleep(0.01)
            assert "HTTP 500" in engine.status().hydration_error
            assert await engine.read(0, 4096) == image[:4096]  # hydrated data still served
            (nginx.tmp / "fault").unlink()
            engine.message("enable_hydration")
            with trio.fail_after(20):
                await engine.complete.wait()
    with open(dst, "rb") as f:
        assert f.read() == image
