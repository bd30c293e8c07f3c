"""`fuseclone check`: validate a metadata file, and optionally DST against SRC."""

from __future__ import annotations

from typing import Callable, Iterator

import trio

from .destination import Destination
from .errors import FusecloneError, SourceError, describe
from .identity import check_distinct, same_recorded_identity
from .metadata import Metadata
from .sources import Source, SourceReadError


def run_check(meta_path: str, src: str | None, dst: str | None, verify: bool,
              echo: Callable[[str], None]) -> bool:
    """Returns True when everything checked is consistent. Opens META read-only."""
    check_distinct(source=src, destination=dst, metadata=meta_path)
    with Metadata.open(meta_path, writable=False) as meta:
        h = meta.header
        echo(f"{meta_path}: valid fuseclone metadata, format {h.version}, region size {h.region_size}, "
             f"{meta.hydrated_count}/{h.nr_regions} regions hydrated, "
             f"{'clean' if h.clean else 'not cleanly closed (the mount was killed or is live)'}")
        if not (src or dst):
            return True
        return trio.run(_check_against, meta, src, dst, verify, echo)


async def _check_against(meta: Metadata, src: str | None, dst: str | None, verify: bool,
                         echo: Callable[[str], None]) -> bool:
    from .sources import open_source

    ok = True
    identity = dict(meta.header.identity)
    source_cm = open_source(src) if src else None
    if source_cm is None:
        return _check_destination(meta, dst, echo)
    async with source_cm as source:
        recorded = identity.get("source")
        if (not isinstance(recorded, dict) or not source.identity_matches(recorded)
                or source.size != meta.header.source_size):
            echo(f"MISMATCH: {source.description} is not the source this metadata was made for")
            return False
        echo(f"source {source.description}: matches")
        if dst:
            ok = _check_destination(meta, dst, echo)
            if ok and verify:
                ok = await _verify(meta, source, dst, echo)
    return ok


def _check_destination(meta: Metadata, dst_path: str | None, echo) -> bool:
    if dst_path is None:
        return True
    try:
        dst = Destination.open(dst_path, meta.header.source_size, create=False, readonly=True)
    except FusecloneError as exc:
        echo(f"MISMATCH: {exc}")
        return False
    try:
        if not same_recorded_identity(meta.header.identity.get("destination"), dst.identity()):
            echo(f"MISMATCH: {dst_path} is not the destination this metadata was made for")
            return False
    finally:
        dst.close()
    echo(f"destination {dst_path}: matches")
    return True


async def _verify(meta: Metadata, source, dst_path: str, echo) -> bool:
    """Compare with the source every region that is hydrated and was never written by users
    (written ones hold the users' data, not the source's)."""
    g = meta.geometry
    dst = Destination.open(dst_path, g.image_size, create=False, readonly=True)
    bad = checked = 0
    step = max(1, (4 << 20) // g.region_size)
    try:
        for run in _hydrated_never_written(meta):
            for start in range(run.start, run.stop, step):
                piece = range(start, min(start + step, run.stop))
                offset, length = g.byte_range(piece)
                want = await _read_source(source, offset, length)
                got = await trio.to_thread.run_sync(dst.read, offset, length)
                checked += len(piece)
                if got != want:
                    bad += _count_bad_regions(g, piece, want, got, echo)
    finally:
        dst.close()
    echo(f"verify: {checked} hydrated, never written regions compared, {bad} differ from the source")
    echo(f"verify: {meta.written_regions()} regions written by users, not compared")
    if meta.header.written_unknown:
        echo("verify: this metadata predates changed-block tracking (format 1, or upgraded from "
             "it): writes made before then are unknown"
             + (", and the regions that differ may be such writes" if bad else ""))
    return bad == 0


async def _read_source(source: Source, offset: int, length: int) -> bytes | bytearray:
    """The source's bytes; a read it cannot deliver ends the check with one line (the
    source's message names it and the range), since nothing can be said of that range."""
    try:
        return await source.read(offset, length)
    except SourceReadError as exc:
        raise SourceError(f"verify: cannot read the source: {describe(exc)}") from None


def _hydrated_never_written(meta: Metadata) -> Iterator[range]:
    """Runs of regions that are hydrated and lie in chunks users never wrote."""
    g, chunks = meta.geometry, meta.written_geometry
    for written, run in meta.written_runs(range(chunks.nr_regions)):
        if written:
            continue
        for hydrated, regions in meta.runs(g.region_span(*chunks.byte_range(run))):
            if hydrated:
                yield regions


def _count_bad_regions(g, run: range, want: bytes, got: bytes, echo) -> int:
    bad = 0
    base = g.region_start(run.start)
    for region in run:
        lo, hi = g.region_start(region) - base, g.region_end(region) - base
        if want[lo:hi] != got[lo:hi]:
            if bad < 10:
                echo(f"  region {region} (offset {g.region_start(region)}) differs")
            bad += 1
    return bad
