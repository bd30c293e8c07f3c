"""Which reads are sequential streams, and how far ahead of each one to fetch (sans-IO).

Like the kernel's on-demand readahead (mm/readahead.c), with streams told apart by offset
rather than by open file: every read through a loop device arrives on the one file the loop
driver opened, so a stream is "the reader whose next read starts where its last one ended".
A read that starts a new stream costs nothing (random readers never pay); the second read in
a row opens a window of INITIAL_READS times the read size (at least MIN_WINDOW), which doubles
with every read that continues the stream, up to the maximum. Like the kernel's PG_readahead
marker, the next window is asked for when the reader has used up half of what is ahead of it
(asynchronous readahead), so the source is never idle while the reader streams. A stream
that stops (its reader seeks away) is forgotten once MAX_STREAMS newer ones replaced it; a
reader that comes back starts again with the small window.

The engine tells the detector about reads (`observe`) and fetches the byte ranges it returns.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

MIN_WINDOW = 128 << 10
INITIAL_READS = 4  # the first window: this many reads of the size that confirmed the stream
MAX_STREAMS = 16


@dataclass(slots=True)
class _Stream:
    next: int  # where the stream's next read starts
    window: int = 0  # bytes to keep fetched ahead of the reader; 0 until the stream is confirmed
    fetched_to: int = 0  # end of what was asked for already


class ReadaheadDetector:
    """Sequential streams among reads; what to fetch ahead of each (byte ranges)."""

    def __init__(self, max_window: int, image_size: int) -> None:
        self.max_window = max(MIN_WINDOW, max_window)
        self.image_size = image_size
        self._streams: OrderedDict[int, _Stream] = OrderedDict()  # by next offset, oldest first

    def __len__(self) -> int:
        return len(self._streams)

    def observe(self, offset: int, length: int, *, may_start: bool = True) -> tuple[int, int] | None:
        """A read of [offset, offset+length). Returns the byte range to fetch ahead of it, or
        None. `may_start`: whether this read may begin a new stream (reads of data already at
        hand only continue streams)."""
        if length <= 0:
            return None
        stream = self._streams.pop(offset, None)
        if stream is None:
            if may_start:
                self._remember(_Stream(next=offset + length, fetched_to=offset + length))
            return None
        stream.next = offset + length
        stream.window = (max(MIN_WINDOW, INITIAL_READS * length) if not stream.window
                         else stream.window * 2)
        stream.window = min(stream.window, self.max_window)
        self._remember(stream)
        return self._ahead(stream)

    def _ahead(self, stream: _Stream) -> tuple[int, int] | None:
        """The next window, once the reader has used up half of what was fetched ahead."""
        start = max(stream.next, stream.fetched_to)
        if start - stream.next > stream.window // 2:
            return None
        stop = min(self.image_size, stream.next + stream.window)
        if stop <= start:
            return None
        stream.fetched_to = stop
        return start, stop

    def _remember(self, stream: _Stream) -> None:
        self._streams[stream.next] = stream
        while len(self._streams) > MAX_STREAMS:
            self._streams.popitem(last=False)
