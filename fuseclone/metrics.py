"""Prometheus metrics of clones: the text exposition format (version 0.0.4), and a small HTTP
server for `mount --metrics-listen` that answers GET /metrics with it.

The format is written here rather than with prometheus_client, whose registry and HTTP server
are built for threads, not trio: what we need of it is a dozen lines (a HELP and TYPE line per
metric, one sample line per clone, label values escaped). Its parser checks ours in the tests.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import trio

from .errors import FusecloneError
from .status import Status

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REQUEST_TIMEOUT = 10.0  # seconds a scraper has to send its request
MAX_SCRAPERS = 16  # connections served at once; more wait in the listen backlog


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # gauge / counter
    help: str
    value: Callable[[Status], float]


METRICS = (
    Metric("fuseclone_hydrated_regions", "gauge", "Regions of the image hydrated in DST.",
           lambda st: st.hydrated_regions),
    Metric("fuseclone_regions", "gauge", "Regions in the image.", lambda st: st.total_regions),
    Metric("fuseclone_region_size_bytes", "gauge", "Size of a region.", lambda st: st.region_size),
    Metric("fuseclone_hydrating_regions", "gauge", "Regions being copied now.",
           lambda st: st.hydrating_regions),
    Metric("fuseclone_hydration_enabled", "gauge", "1 while background hydration is enabled.",
           lambda st: int(st.hydration_enabled)),
    Metric("fuseclone_source_read_bytes_total", "counter",
           "Bytes read from the source by this mount (hydration and user reads).",
           lambda st: st.source_bytes_read),
    Metric("fuseclone_hydrated_bytes_total", "counter",
           "Bytes of regions that became hydrated during this mount.", lambda st: st.hydrated_bytes),
    Metric("fuseclone_user_read_bytes_total", "counter", "Bytes read through the image.",
           lambda st: st.user_read_bytes),
    Metric("fuseclone_user_write_bytes_total", "counter", "Bytes written through the image.",
           lambda st: st.user_write_bytes),
    Metric("fuseclone_lost_write_bytes_total", "counter",
           "Bytes of writes the kernel acknowledged from its cache whose write-back failed "
           "(lost), each counted once.", lambda st: st.lost_write_bytes),
    # A gauge: a later lost write between two lost ranges joins them into one.
    Metric("fuseclone_lost_write_ranges", "gauge",
           "Ranges of the image those lost writes cover, touching ones merged.",
           lambda st: st.lost_write_ranges),
    Metric("fuseclone_hydration_errors_total", "counter",
           "Hydration copies and copy-on-read stores that failed.", lambda st: st.hydration_errors),
    Metric("fuseclone_written_commits_total", "counter",
           "META commits of changed-block tracking that user writes waited for.",
           lambda st: st.written_commits),
    Metric("fuseclone_written_wait_seconds_total", "counter",
           "Time user writes spent waiting for those commits, summed over writers.",
           lambda st: st.written_wait_seconds),
)
UP = Metric("fuseclone_up", "gauge", "1 if the mount's daemon answered, 0 if it is stopped or gone.",
            lambda st: 1)


@dataclass(frozen=True)
class Sample:
    """One clone's labels, and its status (None: its daemon did not answer)."""

    mountpoint: str
    metadata: str
    status: Status | None


def exposition(samples: Iterable[Sample]) -> str:
    """The text exposition of SAMPLES: every metric with its HELP and TYPE lines, then one line
    per clone (a clone without status has fuseclone_up 0 only)."""
    samples = list(samples)
    lines = []
    for metric in (UP, *METRICS):
        lines.append(f"# HELP {metric.name} {_escape_help(metric.help)}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for sample in samples:
            if sample.status is None and metric is not UP:
                continue
            value = 0 if sample.status is None else metric.value(sample.status)
            labels = (f'mountpoint="{_escape_label(sample.mountpoint)}",'
                      f'metadata="{_escape_label(sample.metadata)}"')
            lines.append(f"{metric.name}{{{labels}}} {value}")
    return "\n".join(lines) + "\n"


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


# ---- the HTTP endpoint (in the mount's nursery) -----------------------------------------------


def parse_listen_address(text: str) -> tuple[str | None, int]:
    """HOST:PORT, [IPv6]:PORT or :PORT (every address) -> (host or None, port); ValueError
    says what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT (examples: 127.0.0.1:9100, [::1]:9100, :9100)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or None, int(port)


async def serve_metrics(host: str | None, port: int, render: Callable[[], str],
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answer GET /metrics on HOST:PORT with render() until cancelled. Reports the bound
    (host, port) once listening. Whatever a client sends only ever costs its own connection."""
    # Imported before serving, not at the first scrape: by then pip may be replacing h11 under
    # the running mount, and a failed import there ended the whole mount.
    import h11  # noqa: F401

    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        where = f"[{host}]:{port}" if host and ":" in host else f"{host or ''}:{port}"
        raise FusecloneError(f"--metrics-listen {where}: {exc.strerror or exc}") from None
    task_status.started(listeners[0].socket.getsockname()[:2])
    scrapers = trio.Semaphore(MAX_SCRAPERS)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_scrapers, listener, render, scrapers, nursery)


async def _accept_scrapers(listener: trio.SocketListener, render: Callable[[], str],
                           scrapers: trio.Semaphore, nursery: trio.Nursery) -> None:
    """Accept a connection only when one of the MAX_SCRAPERS slots is free: the endpoint may
    face a network, and each accepted connection is a descriptor the mount may need (its
    source's connections, the image's write-back). The rest wait in the listen backlog."""
    from .control import ACCEPT_RESOURCE_ERRNOS

    async with listener:
        while True:
            await scrapers.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                scrapers.release()
                if exc.errno not in ACCEPT_RESOURCE_ERRNOS:
                    raise
                log.warning("metrics endpoint: %s; accepting again in 0.1 s", os.strerror(exc.errno))
                await trio.sleep(0.1)
                continue
            nursery.start_soon(_answer_then_release, stream, render, scrapers)


async def _answer_then_release(stream: trio.SocketStream, render: Callable[[], str],
                               scrapers: trio.Semaphore) -> None:
    try:
        await _answer_scrape(stream, render)
    finally:
        scrapers.release()


async def _answer_scrape(stream: trio.SocketStream, render: Callable[[], str]) -> None:
    """One request, one answer, then the connection closes (Connection: close)."""
    import h11

    conn = h11.Connection(h11.SERVER)
    try:
        async with stream:
            request = await _receive_request(stream, conn)
            if request is None:
                return
            status, body = _answer(request, render)
            headers = [("Content-Type", CONTENT_TYPE if status == 200 else "text/plain"),
                       ("Content-Length", str(len(body))), ("Connection", "close")]
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
            if request.method != b"HEAD":
                await stream.send_all(conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
        log.debug("metrics client: %s", exc)
    except Exception:  # a bug: logged, never raised into the mount
        log.exception("answering a metrics request failed")


async def _receive_request(stream: trio.SocketStream, conn) -> object | None:
    """The client's h11.Request, or None when it sent none in time (or hung up)."""
    import h11

    with trio.move_on_after(REQUEST_TIMEOUT):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                return event
            else:  # ConnectionClosed
                return None
    log.debug("metrics client sent no request in %.0f s", REQUEST_TIMEOUT)
    return None


def _answer(request, render: Callable[[], str]) -> tuple[int, bytes]:
    if request.method not in (b"GET", b"HEAD"):
        return 405, b"only GET /metrics\n"
    if request.target.split(b"?", 1)[0] != b"/metrics":
        return 404, b"see /metrics\n"
    return 200, render().encode()
