"""Worker threads the system may refuse to start: `ulimit -u` (the user's processes and
threads), `ulimit -v` (each thread's stack and malloc arena are address space), a cgroup's
`pids.max` (systemd's `TasksMax=`). trio's `to_thread.run_sync` raises RuntimeError then, which
would end the daemon after it had handed out the image. `in_thread` waits for a worker to come
free instead (trio reuses idle ones), and after THREAD_START_PATIENCE fails with EAGAIN, an
errno the daemon's paths report (a failed copy, EIO to a user) instead of dying. Likewise a
worker's job that runs out of memory (a copy's buffer under `ulimit -v`) fails with ENOMEM."""

from __future__ import annotations

import errno
import logging
import os
from typing import Any, Callable, TypeVar

import trio

log = logging.getLogger(__name__)

THREAD_START_PATIENCE = 10.0  # seconds a call waits for the system to grant a thread
THREAD_START_RETRY = 0.05  # seconds between attempts meanwhile

T = TypeVar("T")

_calls_in_flight = 0  # in_thread calls not yet returned; all are made on the event loop's thread


def threads_working() -> bool:
    """Whether a worker thread may be running an `in_thread` call (it needs the GIL)."""
    return _calls_in_flight > 0


async def in_thread(fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = False,
                    limiter: trio.CapacityLimiter | None = None, resident: bool = False) -> T:
    """`trio.to_thread.run_sync(fn, *args)`, waiting out a refused thread start; FN's
    MemoryError as ENOMEM. A RESIDENT thread (one that waits for work of its own, which its
    owner counts) does not count for `threads_working`."""
    global _calls_in_flight
    counted = 0 if resident else 1
    _calls_in_flight += counted
    try:
        return await _run_in_thread(fn, *args, abandon_on_cancel=abandon_on_cancel,
                                    limiter=limiter)
    finally:
        _calls_in_flight -= counted


async def _run_in_thread(fn: Callable[..., T], *args: Any, abandon_on_cancel: bool,
                         limiter: trio.CapacityLimiter | None) -> T:
    deadline = trio.current_time() + THREAD_START_PATIENCE
    while True:
        try:
            return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon_on_cancel,
                                                 limiter=limiter)
        except MemoryError as exc:  # its job's, not the loop's: what it was to do failed
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM)) from exc
        except RuntimeError as exc:
            if not _thread_refused(exc):
                raise
            if trio.current_time() >= deadline:
                raise OSError(errno.EAGAIN, "cannot start a thread (ulimit -u or -v, or the "
                                            "cgroup's pids.max)") from exc
            log.debug("no thread for %s: %s; trying again", getattr(fn, "__name__", fn), exc)
            await trio.sleep(THREAD_START_RETRY)


def _thread_refused(exc: RuntimeError) -> bool:
    """threading.Thread.start's error when pthread_create fails (EAGAIN, ENOMEM)."""
    return "can't start new thread" in str(exc)
