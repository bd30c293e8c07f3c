"""A status snapshot of a clone, and its renderings: JSON, dmsetup's line, and the one-line
state and progress that `list` and systemd's STATUS= show (the human table is progress.py's)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from urllib.parse import urlsplit

from .metadata import BLOCK as METADATA_BLOCK

SECTOR = 512


@dataclass
class Status:
    hydrated_regions: int
    total_regions: int
    hydrating_regions: int
    region_size: int
    image_size: int
    features: list[str]
    hydration_threshold: int
    hydration_batch_size: int
    hydration_enabled: bool
    hydration_error: str | None
    metadata_mode: str  # rw / ro / fail
    bytes_per_second: float
    eta_seconds: float | None
    source: str
    destination: str
    metadata: str
    live: bool  # from a running mount (True) or read offline from META (False)
    max_rate: int = 0  # hydration's bytes/s cap (--max-rate, or a max_rate message); 0: none
    metadata_used_blocks: int = 0
    metadata_total_blocks: int = 0
    clean: bool | None = None
    source_bytes_read: int = 0  # by this mount, for hydration and user reads
    hydration_retry: str | None = None  # while failed copies are retried: how many, when, why
    log_file: str | None = None  # where the mount logs (live status of a mount that logs to a file)
    metadata_error: str | None = None  # why metadata_mode is fail: no commit until mounted again
    written_regions: int = 0  # regions in chunks users wrote, discarded or zeroed
    written_bytes: int = 0
    written_unknown: bool = False  # META upgraded from format 1: earlier writes were not tracked
    # Bytes of the image in hydrated regions (a partial last region counts its own); None from
    # a daemon of an earlier release, which did not send them
    hydrated_image_bytes: int | None = None
    # Counters of this mount (from 0 at each mount, like a Prometheus counter):
    hydrated_bytes: int = 0  # of regions that became hydrated (copied, or written or discarded whole)
    user_read_bytes: int = 0  # read through the image
    user_write_bytes: int = 0  # written through the image
    # Writes the kernel had acknowledged from its cache whose write-back failed: lost
    lost_write_bytes: int = 0
    lost_write_ranges: int = 0  # merged: a write between two lost ranges joins them
    lost_writes: str | None = None  # "N bytes (offset O +L, ...)"
    reads_on_ring: int = 0  # READs answered from an io_uring read of DST (not a thread's)
    # Opens of the image read and write DST without the daemon (--passthrough): the user I/O
    # counters above miss what they move.
    passthrough: bool = False
    hydration_errors: int = 0  # hydration copies and copy-on-read stores that failed
    # META commits of written bits that user writes waited for (write-ahead), and their wait
    written_commits: int = 0
    written_wait_seconds: float = 0.0
    # The source's servers (the primary, then each --mirror): sources.base.ServerStatus fields
    # (source, role, state: serving / standby / failing / unreachable / refused, error).
    servers: list[dict] = field(default_factory=list)
    prefetch_regions: int = 0  # regions the prefetch trace lists (--prefetch), 0 without one
    prefetch_hydrated: int = 0  # of those, hydrated so far
    prefetching: bool = False  # regions of the trace are still to be asked for
    # bytes this mount claimed for copies of each kind: prefetch, readahead, hot_spots
    fetched: dict = field(default_factory=dict)
    # The mount's daemon, mountpoint and image as it reaches them now (live status only)
    pid: int | None = None
    mountpoint: str | None = None
    image: str | None = None
    # The FUSE mount's device number ("major:minor", shared by its bind mounts): what tells a
    # mountpoint's own daemon from another clone's that META's path names now
    device: str | None = None

    @classmethod
    def from_reply(cls, reply: dict) -> Status:
        """The status in a mount's reply (to `status` or `wait`), with the reply's pid,
        mountpoint and image. Fields this release does not know are left out: a daemon of a
        later release (the package downgraded while it stays mounted) sends more."""
        doc = dict(reply["status"])
        for name in ("mountpoint", "image"):  # a daemon's status before 2026-11-28 lacks them
            if doc.get(name) is None:
                doc[name] = reply.get(name)
        # The pid as control.request sees it (SO_PEERCRED): a PID namespace's 1 is not ours
        doc["pid"] = reply.get("pid", doc.get("pid"))
        known = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in doc.items() if name in known})

    @property
    def complete(self) -> bool:
        return self.hydrated_regions == self.total_regions

    @property
    def hydrated_size(self) -> int:
        """Bytes of the image in hydrated regions (whole regions, at most the image, where the
        daemon did not say)."""
        if self.hydrated_image_bytes is not None:
            return self.hydrated_image_bytes
        return min(self.hydrated_regions * self.region_size, self.image_size)

    @property
    def fraction(self) -> float:
        return self.hydrated_regions / self.total_regions if self.total_regions else 1.0

    def to_json(self) -> str:
        doc = asdict(self)
        doc["complete"] = self.complete
        return json.dumps(doc, indent=2, sort_keys=True)

    def dmsetup_line(self) -> str:
        """dm-clone's status line: metadata block size and usage, region size (sectors),
        hydrated/total, hydrating, features, core args, metadata mode."""
        features = " ".join([str(len(self.features)), *self.features])
        core = (f"4 hydration_threshold {self.hydration_threshold} "
                f"hydration_batch_size {self.hydration_batch_size}")
        return (f"{METADATA_BLOCK // SECTOR} {self.metadata_used_blocks}/{self.metadata_total_blocks} "
                f"{self.region_size // SECTOR} {self.hydrated_regions}/{self.total_regions} "
                f"{self.hydrating_regions} {features} {core} {self.metadata_mode}")

    @property
    def state(self) -> str:
        """One word or phrase for `list` and systemd: complete, hydrating, idle (hydration
        disabled), or stopped with the reason."""
        if self.complete:
            return "complete"
        if self.metadata_error:
            return f"stopped: metadata in fail mode ({self.metadata_error})"
        if self.hydration_error:
            return f"stopped: {self.hydration_error}"
        return "hydrating" if self.hydration_enabled else "idle"

    def progress_line(self) -> str:
        """"42.0% (1234/2938 regions), 12.5 MiB/s, complete": systemd's STATUS=."""
        return (f"{self.fraction:.1%} ({self.hydrated_regions}/{self.total_regions} regions), "
                f"{human_bytes(self.bytes_per_second)}/s, {self.state}")


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")  # 2^63-1 bytes, the largest image: 8.0 EiB


def human_bytes(n: float) -> str:
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def public_source(source: str) -> str:
    """SOURCE as `list` and the metrics show it: a URL without user, password, query or
    fragment (where pre-signed URLs and tokens live); a path as it is."""
    if "://" not in source:
        return source
    try:
        parts = urlsplit(source)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host += f":{parts.port}"
    except ValueError:  # not a URL after all: show its scheme only
        return source.split("://", 1)[0] + "://..."
    return f"{parts.scheme}://{host}{parts.path}"
