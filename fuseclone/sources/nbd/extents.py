"""The NBD source's extent cache: block status (base:allocation) fetched a window at a time
(`extent_window`, 64 MiB) and cached, with the next window prefetched, so hydration batches
do not each pay a round trip. Forgotten whenever a connection is lost."""

from __future__ import annotations

import bisect
import errno
import logging
from collections import OrderedDict

import trio

from ..base import Extent, SourceReadError
from . import wire
from .pool import ConnectionPool, Request

log = logging.getLogger(__name__)


class ExtentCache:
    """Zero/data runs of the export, by window."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self.options = pool.options
        self.address = pool.address
        # window index -> (run starts, runs of (start, stop, zero))
        self._windows: OrderedDict[int, tuple[list[int], list[tuple[int, int, bool]]]] = OrderedDict()
        self._fetching: dict[int, trio.Event] = {}
        self._fetch_errors: dict[int, SourceReadError] = {}

    @property
    def size(self) -> int:
        return self._pool.info.size

    @property
    def info(self) -> wire.ExportInfo:
        return self._pool.info

    def clear(self) -> None:
        """Forget every window (a connection was lost: the server may have changed)."""
        self._windows.clear()

    async def extents(self, offset: int, length: int) -> list[Extent]:
        size = self.size
        if offset < 0:
            raise SourceReadError(errno.EINVAL, f"block status at negative offset {offset}")
        length = max(0, min(length, size - offset))
        if length == 0:
            return []
        if self.info.base_allocation is None or not self.options.block_status:
            return [Extent(offset, length, zero=False)]
        window = self.options.extent_window
        end = offset + length
        out: list[Extent] = []
        pos = offset
        while pos < end:
            index = pos // window
            starts, runs = await self._window(index)
            i = max(0, bisect.bisect_right(starts, pos) - 1)
            window_end = min(size, (index + 1) * window)
            while pos < min(end, window_end) and i < len(runs):
                run_start, run_end, zero = runs[i]
                stop = min(run_end, end)
                if stop > pos:
                    if out and out[-1].zero == zero and out[-1].offset + out[-1].length == pos:
                        out[-1] = Extent(out[-1].offset, stop - out[-1].offset, zero)
                    else:
                        out.append(Extent(pos, stop - pos, zero))
                    pos = stop
                i += 1
            if pos < min(end, window_end):  # runs did not cover the window (cannot happen)
                out.append(Extent(pos, min(end, window_end) - pos, False))
                pos = min(end, window_end)
            # Prefetch the next window once a reader is past the middle of this one.
            nxt = index + 1
            if (pos - index * window > window // 2 and nxt * window < size
                    and nxt not in self._windows and nxt not in self._fetching
                    and self._pool.nursery is not None):
                self._pool.nursery.start_soon(self._prefetch, nxt)
        return out


    async def _window(self, index: int) -> tuple[list[int], list[tuple[int, int, bool]]]:
        cached = self._windows.get(index)
        if cached is not None:
            self._windows.move_to_end(index)
            return cached
        while index in self._fetching:
            await self._fetching[index].wait()
            cached = self._windows.get(index)
            if cached is not None:
                return cached
            error = self._fetch_errors.get(index)
            if error is not None:
                raise SourceReadError(error.errno, error.strerror)
        done = self._fetching[index] = trio.Event()
        self._fetch_errors.pop(index, None)
        try:
            runs = await self._fetch_window(index)
        except SourceReadError as exc:
            self._fetch_errors[index] = exc
            raise
        finally:
            del self._fetching[index]
            done.set()
        cached = self._windows[index] = ([r[0] for r in runs], runs)
        while len(self._windows) > self.options.extent_cache_windows:
            self._windows.popitem(last=False)
        return cached

    async def _prefetch(self, index: int) -> None:
        try:
            await self._window(index)
        except SourceReadError as exc:
            log.debug("prefetch of block status window %d failed: %s", index, exc)

    async def _fetch_window(self, index: int) -> list[tuple[int, int, bool]]:
        window = self.options.extent_window
        start = index * window
        end = min(self.size, start + window)
        runs: list[tuple[int, int, bool]] = []
        pos = start
        what = f"block status at {start}"
        while pos < end:
            request = await self._ask(pos, end, what)
            if request is None:  # a reconnect lost block status: all data from here
                runs.append((pos, end, False))
                break
            if request.error is not None:
                if request.error.errno == errno.ECONNRESET:
                    raise request.error
                # The server could not say: treat the rest as data (always correct).
                log.warning("%s: %s; treating [%d, %d) as data", self.address.url,
                            request.error.strerror, pos, end)
                runs.append((pos, end, False))
                break
            before = pos
            for count, flags in request.descriptors:
                stop = min(end, pos + count)
                zero = bool(flags & wire.STATE_ZERO)
                if runs and runs[-1][2] == zero and runs[-1][1] == pos:
                    runs[-1] = (runs[-1][0], stop, zero)
                else:
                    runs.append((pos, stop, zero))
                pos = stop
                if pos >= end:
                    break
            if pos == before:
                raise SourceReadError(errno.EIO, f"{self.address.url}: empty block status reply")
        return runs

    async def _ask(self, pos: int, end: int, what: str) -> Request | None:
        """One block status request for [pos, end), answered; None when the connection has
        no block status. Times out like a read: the server silent for `timeout` seconds (its
        reply may queue behind read replies on a slow link)."""
        asked_at = trio.current_time()
        with trio.move_on_after(self.options.timeout) as scope:
            conn = await self._pool.connection(what)
            if conn.info.base_allocation is None:
                return None
            cookie, message = conn.codec.block_status(pos, end - pos)
            request = Request(conn, 0, what)
            conn.waiting[cookie] = request
            await conn.send(message, self.options.timeout)
        if scope.cancelled_caught or not await self._pool.answered(request, asked_at):
            raise SourceReadError(errno.ETIMEDOUT, f"{self.address.url}: {what} timed out (the "
                                  f"server sent nothing for {self.options.timeout:g} s)")
        return request
