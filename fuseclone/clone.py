"""Opening a clone: source + destination + metadata, validated together before anything changes.

Bad input is refused with one clear FusecloneError and leaves the disk as it was: a metadata
file is only created (and a missing destination only created) once every check has passed, and
both are removed again if a later step fails.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import AsyncIterator

import trio

from .destination import Destination, file_identity
from .engine import CloneEngine, Settings
from .errors import DestinationError
from .identity import same_recorded_identity
from .metadata import Metadata, refuse_bitmaps_beyond_memory
from .regions import DEFAULT_REGION_SIZE, Geometry, validate_image_size, validate_region_size
from .sources.base import Source
from .sources.mirrors import RecordedSource


def recorded_source(meta_path: str) -> RecordedSource | None:
    """The source as an existing META records it (a resumed clone may start without it), or
    None for a new clone."""
    if not Metadata.exists(meta_path):
        return None
    header = Metadata.read_header(meta_path)
    return RecordedSource(header.source_size, header.identity.get("source") or {})


def _identity(source: Source, dst: Destination) -> dict:
    return {"source": source.identity(), "destination": dst.identity()}


def open_clone(source: Source, dst_path: str, meta_path: str, *,
               region_size: int | None = None, settings: Settings | None = None,
               other_bitmaps: int = 0, overwrite_dst: bool = False) -> CloneEngine:
    """Create or reopen the clone of `source` into `dst_path`, tracked by `meta_path`. Refused
    when its bitmaps and `other_bitmaps` more of one bit per region (an access trace's
    recorder) cannot fit in memory, and, for a new clone, when DST holds data (see
    `Destination.holds`) unless `overwrite_dst`."""
    settings = settings or Settings()
    validate_image_size(source.size)
    if Metadata.exists(meta_path):
        return _reopen(source, dst_path, meta_path, region_size, settings, other_bitmaps)
    return _create(source, dst_path, meta_path, region_size, settings, other_bitmaps,
                   overwrite_dst)


def _reopen(source: Source, dst_path: str, meta_path: str, region_size: int | None,
            settings: Settings, other_bitmaps: int) -> CloneEngine:
    meta = Metadata.open(meta_path, writable=True, other_bitmaps=other_bitmaps)
    try:
        if region_size is not None and region_size != meta.header.region_size:
            raise DestinationError(
                f"{meta_path} was created with region size {meta.header.region_size}, "
                f"not {region_size}")
        # The source first: a META of another clone is told as such, not as a DST that is
        # missing or too small for this source.
        meta.check_source(source)
        dst = _open_recorded_destination(dst_path, source.size, meta)
        try:
            identity = _identity(source, dst)
            meta.check_destination(identity["destination"])
            if not settings.hydration_threshold:
                settings.hydration_threshold = meta.header.hydration_threshold
            if not settings.hydration_batch_size:
                settings.hydration_batch_size = meta.header.hydration_batch_size
            # The first change on disk, after every check; this mount's features and core
            # args replace the last mount's (dm-clone takes them from each table load)
            meta.mark_open(identity, features=settings.features,
                           hydration_threshold=settings.hydration_threshold,
                           hydration_batch_size=settings.hydration_batch_size)
        except BaseException:
            dst.close()
            raise
    except BaseException:
        meta.close()
        raise
    return CloneEngine(source, dst, meta, settings)


def _open_recorded_destination(dst_path: str, image_size: int, meta: Metadata) -> Destination:
    """The existing DST of a resumed clone; a missing one is refused naming the DST that META
    belongs to (the META given may be another clone's)."""
    if not os.path.lexists(dst_path):
        recorded = meta.header.identity.get("destination", {}).get("path", "?")
        raise DestinationError(f"{dst_path}: destination does not exist ({meta.path} is the "
                               f"metadata of a clone into {recorded})")
    _refuse_cut_short(dst_path, image_size, meta)
    return Destination.open(dst_path, image_size, create=False)


def _refuse_cut_short(dst_path: str, image_size: int, meta: Metadata) -> None:
    """This clone's own DST file, now shorter than the image, was truncated since it began:
    what it held past its end is gone. Said so, not only "smaller than the source", which
    invites growing the file back, after which those regions would read as zeros."""
    try:
        st = os.stat(dst_path)
    except OSError:
        return  # Destination.open says why
    if (not stat.S_ISREG(st.st_mode) or st.st_size >= image_size
            or not same_recorded_identity(meta.header.identity.get("destination"),
                                          file_identity(dst_path, st))):
        return
    raise DestinationError(
        f"{dst_path}: destination is {st.st_size} bytes, shorter than the image ({image_size} "
        "bytes): it was truncated since the clone began, and what it held past that (hydrated "
        "data, users' writes) is gone, so the clone cannot resume (growing the file back "
        "would read zeros there)")


def _create(source: Source, dst_path: str, meta_path: str, region_size: int | None,
            settings: Settings, other_bitmaps: int, overwrite_dst: bool) -> CloneEngine:
    geometry = Geometry(source.size, validate_region_size(
        DEFAULT_REGION_SIZE if region_size is None else region_size))
    refuse_bitmaps_beyond_memory(geometry, other_bitmaps=other_bitmaps)  # before DST is created
    dst_existed = os.path.exists(dst_path)
    dst = Destination.open(dst_path, source.size, create=True)
    try:
        if not overwrite_dst:
            _refuse_overwriting(dst, source)
        resolved = settings.resolved(geometry, source.hydration_depth, source.hydration_batch)
        meta = Metadata.create(meta_path, geometry, _identity(source, dst),
                               features=settings.features,
                               hydration_threshold=resolved.hydration_threshold,
                               hydration_batch_size=resolved.hydration_batch_size)
    except BaseException:
        if not dst_existed:  # while still claimed: no other clone has taken it meanwhile
            os.unlink(dst_path)
        dst.close()
        raise
    engine = CloneEngine(source, dst, meta, settings)
    engine.created_meta, engine.created_dst = True, not dst_existed
    return engine


def _refuse_overwriting(dst: Destination, source: Source) -> None:
    """A new clone overwrites all of DST: one that already holds data is almost always a
    mistake (SRC and DST swapped, another disk's or a previous copy's file), so it is refused
    unless asked for, as `qemu-img convert` without `-n` and `mkfs` without `-f` refuse.
    Checked through DST's open, claimed descriptor: what is looked at is what would be
    written."""
    found = dst.holds()
    if found is None:
        return
    if source.holds_no_data():
        why = (f" and the source {source.description} holds no data: are SRC and DST swapped? A "
               "new clone would overwrite the destination")
    else:
        why = ": a new clone would overwrite it (are SRC and DST swapped?)"
    raise DestinationError(f"{dst.path}: the destination holds {found}{why}. To overwrite it, "
                           "add --overwrite-dst")


@contextlib.asynccontextmanager
async def running(engine: CloneEngine, hold_hydration: bool = False) -> AsyncIterator[CloneEngine]:
    """Run the engine's background work for the duration of the block; on exit, commit, mark
    the metadata clean and close destination and metadata. With `hold_hydration`, background
    copies start only at `engine.release_hydration()` (the daemon's call once the image is
    mounted, so hydration does not slow the mount down)."""
    if hold_hydration:
        engine.hold_hydration()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            yield engine
            nursery.cancel_scope.cancel()
    finally:
        engine.dst.close()
        engine.meta.close()
