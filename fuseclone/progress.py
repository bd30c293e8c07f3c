"""Human renderings of a Status with rich: a summary with a progress bar, and a live watch."""

from __future__ import annotations

import time
from typing import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .errors import MetadataFailedError
from .status import Status, human_bytes


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def hydration_state(st: Status) -> str:
    if st.metadata_error:
        return "stopped: metadata is in fail mode"
    if not st.hydration_enabled:
        return "disabled"
    if st.hydration_error:
        return "stopped by errors (tried again now and then; enable_hydration: at once)"
    if (not st.complete and st.servers
            and not any(server["state"] == "serving" for server in st.servers)):
        return "enabled, waiting for the source to answer"
    return "enabled"


def server_rows(st: Status) -> list[tuple[str, str | Text]]:
    """The source's row, or one per server (primary, mirrors) when there is more to say than
    that the source serves."""
    if not st.servers or [server["state"] for server in st.servers] == ["serving"]:
        return [("source", st.source)]
    rows: list[tuple[str, str | Text]] = []
    for server in st.servers:
        line = f"{server['source']}  {server['state']}"
        if server.get("error"):
            line += f": {server['error']}"
        style = "" if server["state"] in ("serving", "standby") else "yellow"
        rows.append(("source" if server["role"] == "primary" else "mirror", Text(line, style=style)))
    return rows


def status_renderable(st: Status) -> Group:
    bar = ProgressBar(total=st.total_regions or 1, completed=st.hydrated_regions, width=40)
    headline = Text.assemble(
        (f"{st.fraction:6.1%} ", "bold"),
        f"{human_bytes(st.hydrated_size)} of "
        f"{human_bytes(st.image_size)}",
        ("  complete" if st.complete else ""), style="green" if st.complete else "")
    table = Table.grid(padding=(0, 2))
    table.add_column(style="dim")
    table.add_column()
    rows = [
        ("regions", f"{st.hydrated_regions}/{st.total_regions} hydrated, {st.hydrating_regions} hydrating, "
                    f"{human_bytes(st.region_size)} each"),
        ("rate", f"{human_bytes(st.bytes_per_second)}/s, ETA {human_duration(st.eta_seconds)}"
                 if st.live else "(not mounted)"),
        ("hydration", hydration_state(st)),
        ("metadata", f"{st.metadata_mode}  {st.metadata}"),
        *server_rows(st),
        ("destination", st.destination),
        ("features", " ".join(st.features) or "-"),
        ("core args", f"hydration_threshold {st.hydration_threshold} hydration_batch_size {st.hydration_batch_size}"),
    ]
    if st.max_rate:
        rows.append(("max rate", f"{human_bytes(st.max_rate)}/s"))
    written = f"{st.written_regions} regions ({human_bytes(st.written_bytes)}) by users"
    rows.insert(2, ("written", written + (", and unknown before the metadata's format upgrade"
                                          if st.written_unknown else "")))
    if st.prefetch_regions:
        rows.insert(3, ("prefetch", f"{st.prefetch_hydrated}/{st.prefetch_regions} regions of the trace "
                                    f"hydrated" + (", fetching" if st.prefetching else ", done")))
    if any(st.fetched.values()):
        rows.insert(3, ("followed users", ", ".join(f"{kind.replace('_', ' ')} {human_bytes(n)}"
                                                    for kind, n in sorted(st.fetched.items()))))
    if st.log_file:
        rows.append(("log", st.log_file))
    if st.metadata_error:
        rows.insert(2, ("error", Text(str(MetadataFailedError(st.metadata_error)), style="bold red")))
    else:
        if st.hydration_retry:  # backing off, or stopped and trying now and then
            rows.insert(2, ("retrying", Text(st.hydration_retry, style="yellow")))
        if st.hydration_error:
            rows.insert(2, ("error", Text(st.hydration_error, style="bold red")))
    if not st.live and st.clean is False:
        rows.insert(2, ("last mount", Text("ended without its last commit (killed, or its metadata "
                                           "in fail mode): writes it had not flushed may be lost; "
                                           "mounting again resumes from its last good commit",
                                           style="bold red")))
    if st.lost_writes:
        rows.insert(2, ("lost writes", Text(f"{st.lost_writes}, acknowledged from the kernel's "
                                            "cache, failed to write back", style="bold red")))
    for key, value in rows:
        table.add_row(key, value)
    return Group(bar, headline, table)


def render_status(st: Status, console: Console | None = None) -> None:
    (console or Console()).print(status_renderable(st))


def watch_status(read: Callable[[], Status], interval: float = 1.0) -> Status:
    """Redraw the status until hydration is complete (or stopped with an error)."""
    console = Console()
    st = read()
    with Live(status_renderable(st), console=console, refresh_per_second=4) as live:
        while not st.complete and not st.hydration_error and not st.metadata_error and st.live:
            time.sleep(interval)
            st = read()
            live.update(status_renderable(st))
    return st
