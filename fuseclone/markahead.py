"""How much to mark written along with a write whose written bits are not durable yet (sans-IO).

Changed-block tracking is written ahead: a write reaches DST only once the written bits of its
chunks are durable in META, so the first write to a chunk waits for a META commit (a pwrite and
an fdatasync). `diff` may list more than users wrote (an incremental backup copies a little
more) but never less, so that commit marks more than the write's own chunks, for the writes
that follow to find their bits durable:

- a write starting no stream marks the aligned NEIGHBOURHOOD it touches (random writers: a
  database's pages, a filesystem's metadata, cluster there);
- a write continuing a stream (starting in what an earlier one marked, or at most STREAM_SLACK
  past its end) marks a window twice the previous one from that end, up to
  MAX_WINDOW, like readahead.

So a sequential writer pays log2(MAX_WINDOW / NEIGHBOURHOOD) + 1 commits for its first
MAX_WINDOW, then one per MAX_WINDOW, and `diff` lists at most MAX_WINDOW past where it stopped.
Streams are told apart by offset (a loop device's writes all arrive on one open file); one
that stops is forgotten once MAX_STREAMS newer ones replaced it.

The engine asks `span` for each write that found its bits not durable and marks what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

NEIGHBOURHOOD = 1 << 20
MAX_WINDOW = 64 << 20
MAX_STREAMS = 16
# A stream's next write may start this far past its window's end (writes that arrive out of
# order); further, it starts a stream of its own. Half the window instead let random writes
# grow windows: pgbench's 8 s run marked 577-640 MiB (this: 533-602; 64 KiB chunks alone: 369).
STREAM_SLACK = 256 << 10


@dataclass(slots=True)
class _Window:
    start: int
    stop: int  # where the next window of its stream starts
    size: int  # this window's size: the next one doubles it


class MarkAhead:
    """Byte ranges to mark written with writes that miss, growing along sequential streams."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self._windows: list[_Window] = []  # oldest first

    def span(self, offset: int, length: int) -> tuple[int, int]:
        """[start, stop) to mark written for a write of [offset, offset+length) whose bits are
        not durable: it always contains the write."""
        end = offset + length
        window = self._find(offset)
        if window is not None and end <= window.stop:
            return offset, end  # inside a window whose commit is on its way
        if window is None:
            window = _Window(_align_down(offset), _align_down(offset), NEIGHBOURHOOD // 2)
        else:
            self._windows.remove(window)
        size = min(2 * window.size, MAX_WINDOW)
        start = window.stop
        stop = min(self.image_size, max(_align_up(end), start + size))
        self._remember(_Window(start, stop, size))
        return min(start, offset), max(stop, end)

    def _find(self, offset: int) -> _Window | None:
        """The window the write falls in, or whose stream it continues."""
        for window in reversed(self._windows):
            if window.start <= offset <= window.stop + STREAM_SLACK:
                return window
        return None

    def _remember(self, window: _Window) -> None:
        self._windows.append(window)
        del self._windows[:-MAX_STREAMS]


def _align_down(offset: int) -> int:
    return offset - offset % NEIGHBOURHOOD


def _align_up(offset: int) -> int:
    return _align_down(offset + NEIGHBOURHOOD - 1)
