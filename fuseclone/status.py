"""A status snapshot of a clone, and its three renderings: human, JSON and dmsetup's line."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

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
    prefetch_regions: int = 0  # regions the prefetch trace lists (--prefetch), 0 without one
    prefetch_hydrated: int = 0  # of those, hydrated so far
    prefetching: bool = False  # regions of the trace are still to be asked for
    # bytes this mount claimed for copies of each kind: prefetch, readahead, hot_spots
    fetched: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.hydrated_regions == self.total_regions

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
        return (f"{4096 // SECTOR} {self.metadata_used_blocks}/{self.metadata_total_blocks} "
                f"{self.region_size // SECTOR} {self.hydrated_regions}/{self.total_regions} "
                f"{self.hydrating_regions} {features} {core} {self.metadata_mode}")
