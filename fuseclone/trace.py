"""Access traces: the regions users read from the source, in first-read order.

`fuseclone mount ... --record-access TRACE` writes one; `fuseclone mount ... --prefetch TRACE`
on a later clone of the same source fetches those regions before anything else.

The format is text, one record a line (UTF-8, `\\n` line ends)::

    fuseclone-access-trace 1
    {"image_size": 536870912, "source": {"kind": "nbd", ...}}
    0.013 1048576 65536
    0.020 0 4096
    ...
    end 2

1. the magic line, with the format's version;
2. a JSON object: `source` is the identity of the source it was recorded from (what META
   records; a trace of another source is refused) and `image_size` its size in bytes;
3. one line per first read from the source: seconds since the mount started (three decimals),
   then the offset and the length in bytes of the whole regions that read fetched, in the order
   users first read them (a region appears once; a sequential reader's reads of what readahead
   fetched for it count as reads from the source, what it fetched and nobody read does not);
4. `end N` (N: the number of records) once the mount ended cleanly.
Each record is written to the file as it happens, so a trace of a mount that was killed ends
without the `end` line and is still good to prefetch from, as is one whose last line lost its
newline (a power cut); anything else that does not parse is refused as corrupt.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

from bitarray import bitarray

from . import claims
from .blockio import first_data, open_regular_file, read_regular_text, still_named
from .errors import FusecloneError
from .regions import Geometry
from .sources import describe_identity

log = logging.getLogger(__name__)

MAGIC = "fuseclone-access-trace 1"


class TraceError(FusecloneError):
    """An access trace that cannot be used: unreadable, corrupt, or of another source."""


@dataclass(frozen=True)
class AccessTrace:
    """A trace read back: where it came from and its (offset, length) records in order."""

    source: dict
    image_size: int
    records: tuple[tuple[int, int], ...]
    complete: bool  # ended with its `end` line
    seconds: tuple[float, ...] = ()  # when each record was read, since the mount started

    def region_runs(self, geometry: Geometry) -> list[range]:
        """The records as runs of regions of `geometry`: records that touch or overlap merged
        into one run (one copy instead of many small ones), placed where the first of them was
        read."""
        return _merged_runs([geometry.region_span(offset, length) for offset, length in self.records])

    def first_burst_and_rest(self, geometry: Geometry,
                             pause: float) -> tuple[list[range], list[range]]:
        """`region_runs` of the records read before the first clone's reads first paused for
        `pause` seconds or more, and of the records after: merged apart, so that the burst
        ends with its own reads (a stream read on after the pause would otherwise join it)."""
        burst = next((i for i in range(1, len(self.seconds))
                      if self.seconds[i] - self.seconds[i - 1] >= pause), len(self.records))
        spans = [geometry.region_span(offset, length) for offset, length in self.records]
        return _merged_runs(spans[:burst]), _merged_runs(spans[burst:])


def _merged_runs(spans: list[range]) -> list[range]:
    """Spans that touch or overlap merged into one run, in the order of each run's first span."""
    order = sorted(range(len(spans)), key=lambda i: spans[i].start)
    merged: list[tuple[int, range]] = []  # (first span's index, run)
    for i in order:
        span = spans[i]
        if merged and span.start <= merged[-1][1].stop:
            first, run = merged[-1]
            merged[-1] = (min(first, i), range(run.start, max(run.stop, span.stop)))
        else:
            merged.append((i, span))
    return [run for _, run in sorted(merged, key=lambda item: item[0])]


def read_trace(path: str) -> AccessTrace:
    """Parse the trace at PATH; raises TraceError (one line) if it is unreadable or corrupt."""
    try:
        lines = read_regular_text(path).split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else exc
        raise TraceError(f"{path}: cannot read the access trace ({reason})") from None
    if lines[0] != MAGIC:
        raise TraceError(f"{path}: not a fuseclone access trace (no {MAGIC!r} line)")
    try:
        header = json.loads(lines[1]) if len(lines) > 1 else None
        source, image_size = header["source"], header["image_size"]
        if not isinstance(source, dict) or not isinstance(image_size, int) or image_size < 0:
            raise TypeError
    except (ValueError, TypeError, KeyError, RecursionError):  # the last: nested too deep
        raise TraceError(f"{path}: corrupt access trace (line 2 is not its header)") from None
    records, complete = _records(path, lines[2:], image_size)
    return AccessTrace(source, image_size, tuple((offset, length) for _, offset, length in records),
                       complete, tuple(seconds for seconds, _, _ in records))


def _records(path: str, lines: list[str],
             image_size: int) -> tuple[list[tuple[float, int, int]], bool]:
    if lines and lines[-1] == "":
        lines = lines[:-1]  # the final newline
    elif lines:
        # A last line without its newline is a record cut short (zeros, say): each is written
        # whole by one write(2), so only a power cut leaves one (the size on disk past the
        # data that reached it). Dropped, like the end a killed mount's trace lacks: refused,
        # it made every mount that prefetches from the trace fail.
        lines = lines[:-1]
    records: list[tuple[float, int, int]] = []
    for number, line in enumerate(lines, start=3):
        words = line.split(" ")
        if words[0] == "end" and number == len(lines) + 2:
            if len(words) == 2 and words[1] == str(len(records)):
                return records, True
        else:
            record = _record(words, image_size)
            if record is not None:
                records.append(record)
                continue
        raise TraceError(f"{path}: corrupt access trace (line {number}: {line[:60]!r})")
    return records, False


def _record(words: list[str], image_size: int) -> tuple[float, int, int] | None:
    if len(words) != 3:
        return None
    try:
        seconds, offset, length = float(words[0]), int(words[1]), int(words[2])
    except ValueError:
        return None
    if not 0 <= seconds < math.inf or offset < 0 or length <= 0 or offset + length > image_size:
        return None
    return seconds, offset, length


def check_trace_source(trace: AccessTrace, path: str, source) -> None:
    """Refuse a trace recorded from another source than SOURCE (a `sources.base.Source`)."""
    if trace.image_size != source.size or not source.identity_matches(trace.source):
        raise TraceError(f"{path}: access trace of another source "
                         f"({describe_identity(trace.source)}), not of {source.description}")


def _open_held(path: str) -> tuple[int, bool]:
    """The trace file, emptied, and held (claims.py) while it is recorded, and whether this
    call created it: emptied only once held, so that a second mount recording to it, or one
    naming another clone's file, leaves the file as it was; and only when it holds no data, so
    that neither a path mistyped nor an earlier trace is lost."""
    try:
        try:
            fd = open_regular_file(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            created = True
        except FileExistsError:
            fd = open_regular_file(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            created = False
    except OSError as exc:
        raise TraceError(f"cannot write the access trace {path}: {exc.strerror}") from None
    try:
        # A regular file: nothing is held beneath it.
        claims.hold(fd, path, exclusive=True, required=False)
        _refuse_existing_data(fd, path)
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd, created


def _refuse_existing_data(fd: int, path: str) -> None:
    """Refuse to record over a file that holds data: a mistyped path names someone's file, and
    an earlier trace is one the user may still need (a remount of a clone that is partly
    hydrated records fewer reads than its first mount did: recorded over, a good trace became
    a poor one, or an empty one when a mount failed after emptying it)."""
    start = first_data(fd)
    if start is None:
        return
    if os.pread(fd, len(MAGIC), 0) == MAGIC.encode():
        raise TraceError(f"{path}: holds an access trace already: recording would overwrite it; "
                         "name another file, or remove it first")
    raise TraceError(f"{path}: holds data (first at offset {start}) that is not an access trace: "
                     "recording one there would overwrite it; name another file, or remove it")


class TraceRecorder:
    """Appends first reads of the source's data to a trace file as they happen. The engine
    calls `source_read` for user reads that went to the source, `fetched_ahead` for the copies
    made before users read them (readahead's, and hydration's and a prefetch's: with hydration
    on, a fast source's copies often come first, and a trace without them left the next clone
    little to prefetch), and `read` for user reads of data at hand: the part of those copied
    ahead is recorded then, as read (what was copied and nobody read is not)."""

    BITMAPS = 2  # of one bit per region each, held while recording (the mount's memory check)

    def __init__(self, path: str, source_identity: dict, geometry: Geometry,
                 clock: Callable[[], float]) -> None:
        self.path = path
        self.geometry = geometry
        self._clock = clock
        self._started = clock()
        self._seen = bitarray(geometry.nr_regions, endian="little")
        self._seen.setall(0)
        self._ahead = bitarray(geometry.nr_regions, endian="little")  # fetched ahead, not read yet
        self._ahead.setall(0)
        self._ahead_count = 0  # bits set in _ahead: most reads then cost one comparison
        self.records = 0
        self._fd, self._created = _open_held(path)
        self._length = 0  # bytes of whole lines in the file
        self._failure: str | None = None  # why recording stopped (a write failed)
        header = json.dumps({"image_size": geometry.image_size, "source": source_identity},
                            sort_keys=True)
        try:
            self._append(f"{MAGIC}\n{header}\n".encode())
        except OSError as exc:
            os.close(self._fd)
            raise TraceError(f"cannot write the access trace {path}: {exc.strerror}") from None

    def fetched_ahead(self, regions: range) -> None:
        """REGIONS were copied from the source before users read them: each is recorded when
        a user first reads it (`read`); those recorded already are left out."""
        span = slice(regions.start, regions.stop)
        fresh = ~self._seen[span] & ~self._ahead[span]
        self._ahead_count += fresh.count()
        self._ahead[span] |= fresh

    def read(self, regions: range) -> None:
        """A user read `regions` of data at hand: record the runs of it copied ahead."""
        if not self._ahead_count or not self._ahead.count(1, regions.start, regions.stop):
            return
        pos = self._ahead.find(1, regions.start, regions.stop)
        while pos >= 0:
            end = self._ahead.find(0, pos, regions.stop)
            end = regions.stop if end < 0 else end
            self._ahead[pos:end] = 0
            self._ahead_count -= end - pos
            self.source_read(range(pos, end))
            pos = self._ahead.find(1, end, regions.stop)

    def source_read(self, regions: range) -> None:
        """Users read `regions` from the source just now; the ones read before are left out.
        One write(2) per record: the file is whole up to its last line at any time."""
        if not regions or self._seen.count(0, regions.start, regions.stop) == 0:
            return
        first = self._seen.find(0, regions.start, regions.stop)
        last = regions.stop - 1
        while self._seen[last]:
            last -= 1
        self._seen[first : last + 1] = 1
        offset, length = self.geometry.byte_range(range(first, last + 1))
        self._write(f"{self._clock() - self._started:.3f} {offset} {length}\n")
        if self._failure is None:
            self.records += 1

    def close(self) -> None:
        """The mount ended: write the `end` line (unless recording stopped) and close."""
        if self._fd < 0:
            return
        try:
            self._write(f"end {self.records}\n")
        finally:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """The mount failed: leave the file as it was before, removed if this recorder created
        it, else empty (it held no data), then close. Only while PATH still names it: a
        recorder that was refused never got here, so another mount's trace is never touched."""
        if self._fd < 0:
            return
        try:
            if still_named(self._fd, self.path):
                if self._created:
                    os.unlink(self.path)
                else:
                    os.ftruncate(self._fd, 0)
        except OSError as exc:
            log.error("access trace %s: cannot remove what this failed mount recorded: %s",
                      self.path, exc.strerror or exc)
        finally:
            os.close(self._fd)
            self._fd = -1

    def _write(self, text: str) -> None:
        """Append whole lines. The trace only helps a later clone: a write that fails (its
        filesystem full, say) stops the recording, never the user read that called it. The
        file is cut back to its last whole line, so it stays good to prefetch from, like the
        trace of a mount that was killed."""
        if self._failure is not None:
            return
        try:
            self._append(text.encode())
        except OSError as exc:
            self._failure = exc.strerror or str(exc)
            log.error("access trace %s: cannot write (%s): recording stopped; the trace keeps "
                      "%d records, without its end line", self.path, self._failure, self.records)
            self._cut_to_whole_lines()

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self._length += len(data)

    def _cut_to_whole_lines(self) -> None:
        try:
            os.ftruncate(self._fd, self._length)
        except OSError:
            log.exception("access trace %s: cannot cut a partly written line off", self.path)
