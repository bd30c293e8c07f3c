"""A plain NBD connection's replies, received in a worker thread instead of on the event loop.

Receiving hydration's payload on the loop took steps of 5-22 ms (up to 64 `recv_into` of MiBs
each, and the codec's parsing) that a user's FUSE request answered on the same loop waited for
(docs/benchmark/row9-follow-users.md). Here one thread per connection receives straight into
`Transmission.get_buffer()` (the read's own buffer: the kernel copies the payload once, as
before) and parses; the events that complete requests go to the loop through the run's
`TrioToken.run_sync_soon`, which never waits and runs callbacks in the order they were posted.

Sharing the codec between the loop and the thread (CPython's GIL makes each dict operation
atomic; no free-threaded build runs this):
* the loop registers a request in `Transmission._pending` (`read`, `block_status`) before it
  sends it, so its reply can never be parsed before it is registered; the thread only looks
  requests up and deletes completed ones. A cookie deleted by the thread is free for the loop's
  next request only after its reply was fully parsed.
* `in_flight` (len) and `pending_cookies` (list of the int keys, one C call) are single atomic
  reads of the dict; `_next_cookie` and `disconnected` are the loop's alone.
* everything else the codec holds (its header buffer, the payload being received) is the
  thread's alone while it runs, and `Connection.waiting` / `load` are only touched on the loop,
  where the events are dispatched.

The socket stays non-blocking (the loop's sends must never block), so the thread waits with
poll(2). It is never closed while the thread may use its fd (a reused fd would make the thread
read another file): `Connection.kill` shuts it down, which wakes the thread, and the reader task
closes it once the thread has returned.
"""

from __future__ import annotations

import contextlib
import functools
import select
import socket
from typing import Callable

import outcome
import trio

from .transmission import Event, Transmission

Dispatch = Callable[[list[Event]], None]


async def receive_in_thread(sock: socket.socket, codec: Transmission, dispatch: Dispatch) -> str:
    """Receive the connection's replies in a worker thread until the connection ends, calling
    `dispatch(events)` on the loop for each batch of completed events, in order. Returns why
    the connection ended, or raises OSError or wire.ProtocolError, once the thread has ended
    and every batch it handed over was dispatched. A cancellation shuts the socket down so that
    the thread ends promptly."""
    token = trio.lowlevel.current_trio_token()
    deliver = functools.partial(token.run_sync_soon, dispatch)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_shut_down_when_cancelled, sock)
            # Not abandoned on cancellation: the task (and the pool's nursery) waits for the
            # thread, which the shutdown above ends. Its own limiter: it never waits for, or
            # takes, a slot of the copier's or FUSE's threads.
            result = await trio.to_thread.run_sync(
                outcome.capture, _receive, sock, codec, deliver,
                limiter=trio.CapacityLimiter(1))
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await _after_posted_callbacks(token)
    return result.unwrap()


def shut_down(sock: socket.socket) -> None:
    """End the connection without closing the fd: wakes a thread waiting on it."""
    with contextlib.suppress(OSError):  # ENOTCONN: the peer is already gone
        sock.shutdown(socket.SHUT_RDWR)


def _receive(sock: socket.socket, codec: Transmission, deliver: Dispatch) -> str:
    """The thread: receive and parse until the server (or a shutdown) ends the stream."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while True:
        try:
            n = sock.recv_into(codec.get_buffer())
        except BlockingIOError:
            poller.poll()  # readable, or shut down (POLLHUP)
            continue
        if n == 0:
            return "the server closed the connection"
        events = codec.buffer_updated(n)
        if events:
            deliver(events)


async def _shut_down_when_cancelled(sock: socket.socket) -> None:
    try:
        await trio.sleep_forever()
    finally:
        shut_down(sock)  # the connection ends with its thread either way


async def _after_posted_callbacks(token: trio.lowlevel.TrioToken) -> None:
    """Return once every callback posted to `token` before now has run: run_sync_soon is FIFO,
    so the thread's last events are dispatched before the connection's end is."""
    done = trio.Event()
    token.run_sync_soon(done.set)
    await done.wait()
