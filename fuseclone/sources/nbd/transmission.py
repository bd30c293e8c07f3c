"""NBD transmission, client side, without I/O (in the style of h11): requests out, replies in,
for one connection after the handshake. `fuseclone.sources.nbd.pool` puts it on trio sockets.

It encodes NBD_CMD_READ, NBD_CMD_BLOCK_STATUS and NBD_CMD_DISC only (the source is read-only:
there is no way to encode a write), remembers what is in flight by cookie, and parses replies
incrementally into events. Read payloads are placed straight into the caller's buffer given
with the request: the receiving side asks `get_buffer()` where the next bytes should go (a small
internal buffer for headers, or the read's own buffer for its data) and reports with
`buffer_updated(n)`, like asyncio's BufferedProtocol, so a payload is copied once, by the
kernel. `receive_data(bytes)` wraps the two for tests and simple callers.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass
from typing import Union

from .wire import (
    REQUEST, SIMPLE, STRUCTURED, U32, U64, CMD_BLOCK_STATUS, CMD_DISC, CMD_FLAG_REQ_ONE,
    CMD_READ, COMMAND_NAMES, EIO, MAX_CHUNK_PAYLOAD, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_BIT, REPLY_TYPE_ERROR_OFFSET, REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REQUEST_MAGIC, SENDABLE_COMMANDS,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, ExportInfo, ProtocolError,
)



# ---- transmission: events ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockStatus:
    """NBD_REPLY_TYPE_BLOCK_STATUS: consecutive (length, flags) descriptors from the request's
    offset, for one metadata context; clipped to the requested range."""

    cookie: int
    context_id: int
    descriptors: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class ReplyDone:
    """The request is complete: no more replies for this cookie. `error` 0 means success; else
    it is the first error the server sent for it (or EIO for a read it did not cover), and
    `message` says what the server said."""

    cookie: int
    command: int
    error: int
    message: str


#: The events the transport acts on. Read data and holes go straight into the read's buffer,
#: and error chunks are recorded on the request, so neither needs an event of its own.
Event = Union[BlockStatus, ReplyDone]


class _Pending:
    __slots__ = ("cookie", "command", "offset", "length", "view", "error", "message", "covered",
                 "contexts_answered", "_starts", "_ends")

    def __init__(self, cookie: int, command: int, offset: int, length: int, view) -> None:
        self.cookie = cookie
        self.command = command
        self.offset = offset
        self.length = length
        self.view = view
        self.error = 0
        self.message = ""
        self.covered = 0
        self.contexts_answered: set[int] = set()  # block status: the contexts a chunk described
        # The byte ranges chunks have filled so far, relative to `offset`, sorted and merged.
        self._starts: list[int] = []
        self._ends: list[int] = []

    def claim(self, rel: int, count: int) -> None:
        """Record that a chunk fills [rel, rel + count) of the read. A chunk over bytes another
        chunk filled is refused (the protocol forbids it): `covered` counts bytes, so overlaps
        could add up to the read's length while part of its buffer, perhaps a recycled one
        holding another read's bytes, was never written."""
        starts, ends = self._starts, self._ends
        stop = rel + count
        i = bisect.bisect_right(starts, rel)
        if (i > 0 and ends[i - 1] > rel) or (i < len(starts) and starts[i] < stop):
            raise ProtocolError(f"chunk [{self.offset + rel}, +{count}) overlaps another chunk "
                                f"of its read [{self.offset}, +{self.length})")
        joins_previous = i > 0 and ends[i - 1] == rel
        joins_next = i < len(starts) and starts[i] == stop
        if joins_previous and joins_next:
            ends[i - 1] = ends[i]
            del starts[i], ends[i]
        elif joins_previous:
            ends[i - 1] = stop
        elif joins_next:
            starts[i] = rel
        else:
            starts.insert(i, rel)
            ends.insert(i, stop)


# ---- transmission: the codec ------------------------------------------------------------------


class Transmission:
    """Requests out, replies in, for one connection after the handshake.

    Sending: `read(offset, length, into)`, `block_status(offset, length)` and `disconnect()`
    return `(cookie, bytes to send)` (`disconnect` just the bytes). Cookies are unique among
    requests in flight.

    Receiving: `get_buffer()` returns a writable memoryview where the next received bytes must
    go (e.g. `sock.recv_into(conn.get_buffer())`), `buffer_updated(n)` says how many arrived and
    returns the events they completed. `receive_data(data)` does both for a bytes object.
    A ProtocolError means the stream cannot be trusted any more: drop the connection.
    """

    def __init__(self, info: ExportInfo, *, header_buffer: int = 16384) -> None:
        self.info = info
        self.structured = info.structured_replies
        self._contexts = set(info.meta_contexts.values()) if self.structured else set()
        self._pending: dict[int, _Pending] = {}
        self._next_cookie = 1
        self._buf = bytearray(max(header_buffer, 64))
        self._view = memoryview(self._buf)
        self._start = 0  # unparsed bytes are _buf[_start:_end]
        self._end = 0
        # A payload being received straight into a read's buffer:
        self._direct = None  # memoryview of the destination, or None
        self._direct_pos = 0
        self._direct_then: tuple = ()  # what to report when it is full
        self.disconnected = False

    # -- sending --------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def pending_cookies(self) -> list[int]:
        return list(self._pending)

    def read(self, offset: int, length: int, into) -> tuple[int, bytes]:
        """NBD_CMD_READ of [offset, offset+length) whose data lands in `into` (a writable buffer of
        exactly `length` bytes, e.g. a memoryview slice of a bytearray)."""
        view = memoryview(into)
        if view.readonly or view.nbytes != length:
            raise ValueError("`into` must be a writable buffer of exactly `length` bytes")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        self._check_range(offset, length)
        if length > 0xFFFFFFFF:
            raise ValueError("read longer than 4 GiB - 1")
        return self._request(CMD_READ, 0, offset, length, view)

    def block_status(self, offset: int, length: int, *, req_one: bool = False) -> tuple[int, bytes]:
        """NBD_CMD_BLOCK_STATUS of [offset, offset+length); needs a negotiated metadata context."""
        if not self._contexts:
            raise ValueError("no metadata context was negotiated: block status is not available")
        self._check_range(offset, length)
        length = min(length, 0xFFFFFFFF)
        return self._request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE if req_one else 0, offset, length, None)

    def disconnect(self) -> bytes:
        """NBD_CMD_DISC: after this nothing more may be sent."""
        if self.disconnected:
            return b""
        self.disconnected = True
        return REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0)

    def _check_range(self, offset: int, length: int) -> None:
        if self.disconnected:
            raise ValueError("disconnect already sent")
        if offset < 0 or length <= 0 or offset + length > self.info.size:
            raise ValueError(f"request [{offset}, +{length}) outside the export (size {self.info.size})")

    def _request(self, command: int, flags: int, offset: int, length: int, view) -> tuple[int, bytes]:
        if command not in SENDABLE_COMMANDS:  # there is no way to encode a write (invariant 4)
            raise ValueError(f"{COMMAND_NAMES.get(command, command)} is never sent by this client")
        cookie = self._next_cookie
        while cookie in self._pending:
            cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF or 1
        self._next_cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF or 1
        self._pending[cookie] = _Pending(cookie, command, offset, length, view)
        return cookie, REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)

    # -- receiving ------------------------------------------------------------------------------

    def get_buffer(self) -> memoryview:
        """Where the next received bytes must be written (never empty)."""
        if self._direct is not None:
            return self._direct[self._direct_pos:]
        if self._end == len(self._buf):
            self._compact()
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> list[Event]:
        """`nbytes` bytes were written at the start of the last `get_buffer()`."""
        events: list[Event] = []
        if nbytes <= 0:
            return events
        if self._direct is not None:
            self._direct_pos += nbytes
            if self._direct_pos < len(self._direct):
                return events
            self._direct = None
            self._payload_done(events, *self._direct_then)
        else:
            self._end += nbytes
        self._parse(events)
        return events

    def receive_data(self, data) -> list[Event]:
        """Convenience for tests and simple transports: feed a bytes-like object."""
        events: list[Event] = []
        data = memoryview(data)
        while data:
            buf = self.get_buffer()
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            data = data[n:]
            events += self.buffer_updated(n)
        return events

    def _compact(self) -> None:
        """Move unparsed bytes to the front; grow the buffer if a message needs more room."""
        live = self._end - self._start
        if self._start:
            self._buf[:live] = self._buf[self._start:self._end]
            self._start, self._end = 0, live

    def _reserve(self, total: int) -> None:
        """Make room for a message of `total` bytes starting at _start."""
        if total > len(self._buf) - self._start:
            if total > len(self._buf):
                live = bytes(self._view[self._start:self._end])
                self._view.release()
                self._buf = bytearray(total)
                self._view = memoryview(self._buf)
                self._buf[:len(live)] = live
                self._start, self._end = 0, len(live)
            else:
                self._compact()

    def _parse(self, events: list[Event]) -> None:
        buf = self._buf
        while self._direct is None:
            start = self._start
            avail = self._end - start
            if avail < 4:
                break
            magic = U32.unpack_from(buf, start)[0]
            if magic == STRUCTURED_REPLY_MAGIC:
                if avail < STRUCTURED.size:
                    break
                _, flags, kind, cookie, length = STRUCTURED.unpack_from(buf, start)
                pending = self._pending.get(cookie)
                if pending is None:
                    raise ProtocolError(f"structured reply for unknown cookie {cookie}")
                if not self.structured:
                    raise ProtocolError("structured reply without NBD_OPT_STRUCTURED_REPLY")
                if kind == REPLY_TYPE_OFFSET_DATA and pending.command == CMD_READ:
                    if length < 9:
                        raise ProtocolError(f"NBD_REPLY_TYPE_OFFSET_DATA of {length} bytes")
                    if avail < STRUCTURED.size + 8:
                        break
                    offset = U64.unpack_from(buf, start + STRUCTURED.size)[0]
                    count = length - 8
                    rel = offset - pending.offset
                    if rel < 0 or rel + count > pending.length:
                        raise ProtocolError(f"data chunk [{offset}, +{count}) outside its read "
                                            f"[{pending.offset}, +{pending.length})")
                    pending.claim(rel, count)
                    self._start = start + STRUCTURED.size + 8
                    self._payload(events, pending.view[rel:rel + count],
                                  (pending, flags, count))
                    continue
                if length > MAX_CHUNK_PAYLOAD:
                    raise ProtocolError(f"reply chunk of {length} bytes is too long")
                total = STRUCTURED.size + length
                if avail < total:
                    self._reserve(total)
                    buf = self._buf
                    break
                payload = bytes(self._view[start + STRUCTURED.size:start + total])
                self._start = start + total
                self._chunk(events, pending, flags, kind, payload)
            elif magic == SIMPLE_REPLY_MAGIC:
                if avail < SIMPLE.size:
                    break
                _, error, cookie = SIMPLE.unpack_from(buf, start)
                pending = self._pending.get(cookie)
                if pending is None:
                    raise ProtocolError(f"simple reply for unknown cookie {cookie}")
                self._start = start + SIMPLE.size
                if pending.command == CMD_READ and self.structured:
                    raise ProtocolError("simple reply to NBD_CMD_READ after structured replies were negotiated")
                if pending.command == CMD_READ and error == 0:
                    self._payload(events, pending.view, (pending, None, pending.length))
                    continue
                self._complete(events, pending, error, "")
            else:
                raise ProtocolError(f"bad reply magic 0x{magic:08x}")
        if self._start == self._end:
            self._start = self._end = 0

    def _payload(self, events: list[Event], dest: memoryview, then: tuple) -> None:
        """Fill `dest` from what is buffered; receive the rest straight into it."""
        start = self._start
        take = min(len(dest), self._end - start)
        if take:
            dest[:take] = self._view[start:start + take]
            self._start = start + take
        if take == len(dest):
            self._payload_done(events, *then)
        else:
            self._start = self._end = 0  # everything buffered went into dest
            self._direct = dest
            self._direct_pos = take
            self._direct_then = then

    def _payload_done(self, events: list[Event], pending: _Pending, flags: int | None,
                      count: int) -> None:
        pending.covered += count
        if flags is None:  # simple reply
            self._complete(events, pending, 0, "")
        elif flags & REPLY_FLAG_DONE:
            self._complete(events, pending)

    def _chunk(self, events: list[Event], pending: _Pending, flags: int, kind: int, payload: bytes) -> None:
        done = bool(flags & REPLY_FLAG_DONE)
        cookie = pending.cookie
        if kind == REPLY_TYPE_NONE:
            if payload or not done:
                raise ProtocolError("NBD_REPLY_TYPE_NONE with a payload or without the DONE flag")
        elif kind == REPLY_TYPE_OFFSET_HOLE:
            if pending.command != CMD_READ or len(payload) != 12:
                raise ProtocolError("malformed or unexpected NBD_REPLY_TYPE_OFFSET_HOLE")
            offset, count = struct.unpack(">QI", payload)
            rel = offset - pending.offset
            if count == 0 or rel < 0 or rel + count > pending.length:
                raise ProtocolError(f"hole chunk [{offset}, +{count}) outside its read "
                                    f"[{pending.offset}, +{pending.length})")
            pending.claim(rel, count)
            pending.view[rel:rel + count] = bytes(count)
            pending.covered += count
        elif kind == REPLY_TYPE_OFFSET_DATA:
            raise ProtocolError(f"data chunk in reply to {COMMAND_NAMES.get(pending.command)}")
        elif kind == REPLY_TYPE_BLOCK_STATUS:
            if pending.command != CMD_BLOCK_STATUS or len(payload) < 12 or (len(payload) - 4) % 8:
                raise ProtocolError("malformed or unexpected NBD_REPLY_TYPE_BLOCK_STATUS")
            context = U32.unpack_from(payload)[0]
            if context not in self._contexts:
                raise ProtocolError(f"block status for metadata context {context}, never negotiated")
            # Every chunk describes the range from the request's offset, so a second one for a
            # context says nothing the first did not; appended to the first it would put its
            # zero flags over other bytes.
            if context not in pending.contexts_answered:
                pending.contexts_answered.add(context)
                events.append(BlockStatus(cookie, context, _descriptors(payload, pending.length)))
        elif kind & REPLY_TYPE_ERROR_BIT:
            if len(payload) < 6:
                raise ProtocolError(f"error chunk of {len(payload)} bytes")
            error, mlen = struct.unpack_from(">IH", payload)
            if 6 + mlen > len(payload):
                raise ProtocolError("error chunk message longer than the chunk")
            message = payload[6:6 + mlen].decode("utf-8", "replace")
            if kind == REPLY_TYPE_ERROR_OFFSET:
                if len(payload) != 6 + mlen + 8:
                    raise ProtocolError("malformed NBD_REPLY_TYPE_ERROR_OFFSET")
                offset = U64.unpack_from(payload, 6 + mlen)[0]
                message = f"{message} (at offset {offset})" if message else f"at offset {offset}"
            elif kind != REPLY_TYPE_ERROR and not message:
                message = f"unknown error chunk type 0x{kind:04x}"
            error = error or EIO  # "MUST be nonzero": a zero error is still an error
            if not pending.error:  # the first failure is the one the request reports
                pending.error, pending.message = error, message
        else:
            raise ProtocolError(f"unknown structured reply type {kind}")
        if done:
            self._complete(events, pending)

    def _complete(self, events: list[Event], pending: _Pending, error: int | None = None,
                  message: str | None = None) -> None:
        del self._pending[pending.cookie]
        if error is None:
            error, message = pending.error, pending.message
            if not error and pending.command == CMD_READ and pending.covered != pending.length:
                error, message = EIO, (f"the server's reply covered {pending.covered} of "
                                       f"{pending.length} bytes")
        pending.view = None
        events.append(ReplyDone(pending.cookie, pending.command, error, message or ""))


def _descriptors(payload: bytes, length: int) -> tuple[tuple[int, int], ...]:
    """The (length, flags) descriptors of a block status chunk's payload (after its context
    id), clipped to a request of `length` bytes."""
    values = struct.unpack(f">{(len(payload) - 4) // 4}I", payload[4:])
    descriptors = []
    left = length
    for i in range(0, len(values), 2):
        count = values[i]
        if count == 0:
            raise ProtocolError("block status descriptor of length 0")
        if left <= 0:
            break
        count = min(count, left)  # a final extent may run past the request: clip it
        descriptors.append((count, values[i + 1]))
        left -= count
    return tuple(descriptors)
