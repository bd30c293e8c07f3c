"""The NBD protocol, client side, without I/O (in the style of h11).

Nothing here touches a socket or trio: bytes go in, events and bytes come out, so every path
is testable with plain byte strings. `fuseclone.sources.nbd` puts it on trio sockets.

Two objects, one per protocol phase (doc/proto.md of NetworkBlockDevice/nbd):

* `Handshake` — the fixed-newstyle handshake: greeting, client flags, then the options
  NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT ("base:allocation") and NBD_OPT_GO (asking
  for NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE), falling back to NBD_OPT_EXPORT_NAME for servers
  without NBD_OPT_GO. The result is an `ExportInfo`.

      hs = Handshake("export")
      while not hs.done:
          send(hs.data_to_send())
          hs.receive_data(recv())          # b"" means the server closed the connection
      info = hs.info

* `Transmission` — requests and replies. It encodes NBD_CMD_READ, NBD_CMD_BLOCK_STATUS and
  NBD_CMD_DISC only (the source is read-only: there is no way to encode a write), remembers
  what is in flight by cookie, and parses replies incrementally into events. Read payloads are
  placed straight into the caller's buffer given with the request: the receiving side asks
  `get_buffer()` where the next bytes should go (a small internal buffer for headers, or the
  read's own buffer for its data) and reports with `buffer_updated(n)`, like asyncio's
  BufferedProtocol, so a payload is copied once, by the kernel. `receive_data(bytes)` wraps the
  two for tests and simple callers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Mapping, Union

# ---- magic numbers ---------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
CLISERV_MAGIC = 0x00420281861253  # oldstyle handshake
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C  # extended headers: never negotiated here

# ---- handshake flags (server) and client flags ------------------------------------------------

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# ---- transmission flags -----------------------------------------------------------------------

FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11
FLAG_BLOCK_STAT_PAYLOAD = 1 << 12

TRANSMISSION_FLAG_NAMES = {
    FLAG_HAS_FLAGS: "HAS_FLAGS", FLAG_READ_ONLY: "READ_ONLY", FLAG_SEND_FLUSH: "SEND_FLUSH",
    FLAG_SEND_FUA: "SEND_FUA", FLAG_ROTATIONAL: "ROTATIONAL", FLAG_SEND_TRIM: "SEND_TRIM",
    FLAG_SEND_WRITE_ZEROES: "SEND_WRITE_ZEROES", FLAG_SEND_DF: "SEND_DF",
    FLAG_CAN_MULTI_CONN: "CAN_MULTI_CONN", FLAG_SEND_RESIZE: "SEND_RESIZE",
    FLAG_SEND_CACHE: "SEND_CACHE", FLAG_SEND_FAST_ZERO: "SEND_FAST_ZERO",
    FLAG_BLOCK_STAT_PAYLOAD: "BLOCK_STAT_PAYLOAD",
}

# ---- options and option replies ---------------------------------------------------------------

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

OPTION_NAMES = {
    OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME", OPT_ABORT: "NBD_OPT_ABORT", OPT_LIST: "NBD_OPT_LIST",
    OPT_STARTTLS: "NBD_OPT_STARTTLS", OPT_INFO: "NBD_OPT_INFO", OPT_GO: "NBD_OPT_GO",
    OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "NBD_OPT_LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
    OPT_EXTENDED_HEADERS: "NBD_OPT_EXTENDED_HEADERS",
}

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERR_BIT | 1
REP_ERR_POLICY = REP_ERR_BIT | 2
REP_ERR_INVALID = REP_ERR_BIT | 3
REP_ERR_PLATFORM = REP_ERR_BIT | 4
REP_ERR_TLS_REQD = REP_ERR_BIT | 5
REP_ERR_UNKNOWN = REP_ERR_BIT | 6
REP_ERR_SHUTDOWN = REP_ERR_BIT | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR_BIT | 8
REP_ERR_TOO_BIG = REP_ERR_BIT | 9
REP_ERR_EXT_HEADER_REQD = REP_ERR_BIT | 10

REPLY_NAMES = {
    REP_ACK: "NBD_REP_ACK", REP_SERVER: "NBD_REP_SERVER", REP_INFO: "NBD_REP_INFO",
    REP_META_CONTEXT: "NBD_REP_META_CONTEXT", REP_ERR_UNSUP: "NBD_REP_ERR_UNSUP",
    REP_ERR_POLICY: "NBD_REP_ERR_POLICY", REP_ERR_INVALID: "NBD_REP_ERR_INVALID",
    REP_ERR_PLATFORM: "NBD_REP_ERR_PLATFORM", REP_ERR_TLS_REQD: "NBD_REP_ERR_TLS_REQD",
    REP_ERR_UNKNOWN: "NBD_REP_ERR_UNKNOWN", REP_ERR_SHUTDOWN: "NBD_REP_ERR_SHUTDOWN",
    REP_ERR_BLOCK_SIZE_REQD: "NBD_REP_ERR_BLOCK_SIZE_REQD", REP_ERR_TOO_BIG: "NBD_REP_ERR_TOO_BIG",
    REP_ERR_EXT_HEADER_REQD: "NBD_REP_ERR_EXT_HEADER_REQD",
}

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

CONTEXT_BASE_ALLOCATION = "base:allocation"

# ---- commands ---------------------------------------------------------------------------------

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8

COMMAND_NAMES = {
    CMD_READ: "NBD_CMD_READ", CMD_WRITE: "NBD_CMD_WRITE", CMD_DISC: "NBD_CMD_DISC",
    CMD_FLUSH: "NBD_CMD_FLUSH", CMD_TRIM: "NBD_CMD_TRIM", CMD_CACHE: "NBD_CMD_CACHE",
    CMD_WRITE_ZEROES: "NBD_CMD_WRITE_ZEROES", CMD_BLOCK_STATUS: "NBD_CMD_BLOCK_STATUS",
    CMD_RESIZE: "NBD_CMD_RESIZE",
}

#: The only commands this client can encode: the source is never written (SPEC invariant 4).
SENDABLE_COMMANDS = frozenset({CMD_READ, CMD_BLOCK_STATUS, CMD_DISC})

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# ---- structured replies -----------------------------------------------------------------------

REPLY_FLAG_DONE = 1 << 0

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR_BIT = 1 << 15
REPLY_TYPE_ERROR = REPLY_TYPE_ERROR_BIT | 1
REPLY_TYPE_ERROR_OFFSET = REPLY_TYPE_ERROR_BIT | 2

#: base:allocation status flags. HOLE says "not allocated"; only ZERO says "reads as zeros" (the
#: two are independent: a hole without ZERO has undefined contents).
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# ---- error values -----------------------------------------------------------------------------

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

ERROR_NAMES = {EPERM: "EPERM", EIO: "EIO", ENOMEM: "ENOMEM", EINVAL: "EINVAL", ENOSPC: "ENOSPC",
               EOVERFLOW: "EOVERFLOW", ENOTSUP: "ENOTSUP", ESHUTDOWN: "ESHUTDOWN"}

# ---- limits -----------------------------------------------------------------------------------

DEFAULT_PORT = 10809
MAX_STRING = 4096  # export names, context names, error messages
MAX_OPTION_REPLY = 1 << 16  # no option reply we ask for comes near this
MAX_CHUNK_PAYLOAD = 1 << 26  # non-data chunk payloads (block status descriptors, errors)
DEFAULT_MAX_BLOCK = 32 << 20  # the protocol's default maximum request when none is advertised
DEFAULT_PREFERRED_BLOCK = 4096

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_GREETING = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")  # magic, error, cookie
_STRUCTURED = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
_BLOCK_SIZES = struct.Struct(">III")
_EXPORT = struct.Struct(">QH")


# ---- errors -----------------------------------------------------------------------------------


class NBDError(Exception):
    """Base of the errors this module raises."""


class ProtocolError(NBDError):
    """The peer sent something that is not valid NBD: the connection cannot go on."""


class HandshakeError(NBDError):
    """The server refused the handshake (unknown export, TLS required, policy...).

    `reply` is the NBD_REP_ERR_* value when the server sent one, else None."""

    def __init__(self, message: str, reply: int | None = None) -> None:
        super().__init__(message)
        self.reply = reply


def error_name(error: int) -> str:
    return ERROR_NAMES.get(error, f"error {error}")


def flag_names(flags: int) -> list[str]:
    return [name for bit, name in TRANSMISSION_FLAG_NAMES.items() if flags & bit]


# ---- the handshake ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake learned about the export."""

    name: str
    size: int
    flags: int
    min_block_size: int = 1
    preferred_block_size: int = DEFAULT_PREFERRED_BLOCK
    max_block_size: int = DEFAULT_MAX_BLOCK
    block_sizes_advertised: bool = False
    structured_replies: bool = False
    meta_contexts: Mapping[str, int] = field(default_factory=dict)  # name -> context id

    @property
    def read_only(self) -> bool:
        return bool(self.flags & FLAG_READ_ONLY)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & FLAG_CAN_MULTI_CONN)

    @property
    def rotational(self) -> bool:
        return bool(self.flags & FLAG_ROTATIONAL)

    @property
    def can_df(self) -> bool:
        return bool(self.flags & FLAG_SEND_DF)

    @property
    def base_allocation(self) -> int | None:
        """The context id of base:allocation, when negotiated (block status is usable)."""
        if not self.structured_replies:
            return None
        return self.meta_contexts.get(CONTEXT_BASE_ALLOCATION)

    @property
    def flag_names(self) -> list[str]:
        return flag_names(self.flags)


def _option(option: int, payload: bytes = b"") -> bytes:
    return _OPTION.pack(IHAVEOPT, option, len(payload)) + payload


def _string(value: bytes) -> bytes:
    return _U32.pack(len(value)) + value


class Handshake:
    """Client side of the fixed-newstyle handshake, as a state machine without I/O.

    Feed it what the server sends with `receive_data` (b"" for end of file); send what
    `data_to_send` returns. `done` turns true once NBD_OPT_GO (or NBD_OPT_EXPORT_NAME) succeeded;
    `info` then describes the export. Refusals raise HandshakeError, garbage ProtocolError.
    """

    GREETING, OPTIONS, EXPORT_NAME, DONE, FAILED = "greeting", "options", "export-name", "done", "failed"

    def __init__(self, export_name: str = "", *, structured_replies: bool = True,
                 meta_contexts: tuple[str, ...] = (CONTEXT_BASE_ALLOCATION,),
                 request_block_size: bool = True) -> None:
        self.export_name = export_name
        self._name = export_name.encode("utf-8")
        if len(self._name) > MAX_STRING:
            raise ValueError("export name longer than 4096 bytes")
        self._want_structured = structured_replies
        self._want_contexts = tuple(meta_contexts)
        self._want_block_size = request_block_size
        self.state = self.GREETING
        self._buf = bytearray()
        self._out = bytearray()
        self._eof = False
        self._plan: list[int] = []
        self.option: int | None = None  # the option whose reply we wait for
        self._no_zeroes = False
        self._structured = False
        self._contexts: dict[str, int] = {}
        self._size: int | None = None
        self._flags = 0
        self._blocks: tuple[int, int, int] | None = None
        self.info: ExportInfo | None = None

    @property
    def done(self) -> bool:
        return self.state == self.DONE

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def trailing_data(self) -> bytes:
        """Bytes received after the handshake ended (the start of the transmission phase)."""
        return bytes(self._buf) if self.done else b""

    def receive_data(self, data: bytes) -> None:
        if self.state == self.FAILED:
            raise ProtocolError("handshake already failed")
        if not data:
            self._eof = True
        else:
            self._buf += data
        try:
            self._advance()
        except NBDError:
            self.state = self.FAILED
            raise

    # -- internals ------------------------------------------------------------------------------

    def _advance(self) -> None:
        while self.state != self.DONE:
            if self.state == self.GREETING:
                if not self._greeting():
                    break
            elif self.state == self.OPTIONS:
                if not self._option_reply():
                    break
            elif self.state == self.EXPORT_NAME:
                if not self._export_name_reply():
                    break
        if self._eof and self.state != self.DONE:
            if self.state == self.GREETING:
                got = bytes(self._buf[:16])
                raise ProtocolError("the server closed the connection before a complete NBD greeting"
                                    + (f" (got {got!r})" if got else "") + ": not an NBD server?")
            if self.state == self.EXPORT_NAME:
                raise HandshakeError(f"the server closed the connection after NBD_OPT_EXPORT_NAME: "
                                     f"export {self.export_name!r} not found or refused")
            raise HandshakeError("the server closed the connection during the handshake (waiting "
                                 f"for the reply to {OPTION_NAMES.get(self.option, self.option)})")

    def _greeting(self) -> bool:
        buf = self._buf
        if len(buf) >= 8 and _U64.unpack_from(buf)[0] != NBDMAGIC:
            raise ProtocolError(f"not an NBD server: the greeting starts with {bytes(buf[:8])!r}")
        if len(buf) >= 16:
            second = _U64.unpack_from(buf, 8)[0]
            if second == CLISERV_MAGIC:
                raise HandshakeError("the server uses the oldstyle NBD handshake, which is not "
                                     "supported (it has no export names); use a newstyle server")
            if second != IHAVEOPT:
                raise ProtocolError(f"not an NBD server: unexpected magic 0x{second:016x} after NBDMAGIC")
        if len(buf) < _GREETING.size:
            return False
        _, _, hflags = _GREETING.unpack_from(buf)
        del buf[:_GREETING.size]
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise HandshakeError("the server does not support the fixed newstyle handshake")
        self._no_zeroes = bool(hflags & FLAG_NO_ZEROES)
        self._out += _U32.pack(FLAG_C_FIXED_NEWSTYLE | (FLAG_C_NO_ZEROES if self._no_zeroes else 0))
        if self._want_structured:
            self._plan.append(OPT_STRUCTURED_REPLY)
        self._plan.append(OPT_GO)  # NBD_OPT_SET_META_CONTEXT goes in once structured replies are on
        self.state = self.OPTIONS
        self._send_next_option()
        return True

    def _send_next_option(self) -> None:
        option = self._plan.pop(0)
        self.option = option
        if option == OPT_STRUCTURED_REPLY:
            self._out += _option(option)
        elif option == OPT_SET_META_CONTEXT:
            queries = [q.encode("utf-8") for q in self._want_contexts]
            payload = _string(self._name) + _U32.pack(len(queries)) + b"".join(map(_string, queries))
            self._out += _option(option, payload)
        elif option == OPT_GO:
            infos = [INFO_EXPORT] + ([INFO_BLOCK_SIZE] if self._want_block_size else [])
            payload = _string(self._name) + _U16.pack(len(infos)) + b"".join(_U16.pack(i) for i in infos)
            self._out += _option(option, payload)
        else:  # pragma: no cover - the plan only holds the options above
            raise AssertionError(option)

    def _option_reply(self) -> bool:
        buf = self._buf
        if len(buf) < _OPTION_REPLY.size:
            return False
        magic, option, reply, length = _OPTION_REPLY.unpack_from(buf)
        if magic != OPTION_REPLY_MAGIC:
            raise ProtocolError(f"bad option reply magic 0x{magic:016x}")
        if option != self.option:
            raise ProtocolError(f"reply to option {option} while waiting for "
                                f"{OPTION_NAMES.get(self.option, self.option)}")
        if length > MAX_OPTION_REPLY:
            raise ProtocolError(f"option reply of {length} bytes is too long")
        if len(buf) < _OPTION_REPLY.size + length:
            return False
        payload = bytes(buf[_OPTION_REPLY.size:_OPTION_REPLY.size + length])
        del buf[:_OPTION_REPLY.size + length]
        if reply & REP_ERR_BIT:
            self._option_error(reply, payload.decode("utf-8", "replace").strip())
        elif self.option == OPT_STRUCTURED_REPLY:
            if reply != REP_ACK:
                raise ProtocolError(f"unexpected {REPLY_NAMES.get(reply, reply)} to NBD_OPT_STRUCTURED_REPLY")
            self._structured = True
            if self._want_contexts:
                self._plan.insert(0, OPT_SET_META_CONTEXT)
            self._send_next_option()
        elif self.option == OPT_SET_META_CONTEXT:
            if reply == REP_META_CONTEXT:
                if len(payload) < 4 or len(payload) > 4 + MAX_STRING:
                    raise ProtocolError("malformed NBD_REP_META_CONTEXT")
                self._contexts[payload[4:].decode("utf-8", "replace")] = _U32.unpack_from(payload)[0]
            elif reply == REP_ACK:
                self._send_next_option()
            else:
                raise ProtocolError(f"unexpected {REPLY_NAMES.get(reply, reply)} to NBD_OPT_SET_META_CONTEXT")
        elif self.option == OPT_GO:
            if reply == REP_INFO:
                self._info(payload)
            elif reply == REP_ACK:
                if self._size is None:
                    raise ProtocolError("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
                self._finish()
            else:
                raise ProtocolError(f"unexpected {REPLY_NAMES.get(reply, reply)} to NBD_OPT_GO")
        return True

    def _info(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise ProtocolError("NBD_REP_INFO without an info type")
        kind = _U16.unpack_from(payload)[0]
        if kind == INFO_EXPORT:
            if len(payload) != 12:
                raise ProtocolError(f"NBD_INFO_EXPORT of {len(payload)} bytes (expected 12)")
            self._size, self._flags = _EXPORT.unpack_from(payload, 2)
        elif kind == INFO_BLOCK_SIZE:
            if len(payload) != 14:
                raise ProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes (expected 14)")
            minimum, preferred, maximum = _BLOCK_SIZES.unpack_from(payload, 2)
            if (minimum < 1 or minimum > 65536 or minimum & (minimum - 1)
                    or preferred < minimum or preferred & (preferred - 1) or maximum < minimum):
                raise ProtocolError(f"invalid block size constraints: minimum {minimum}, "
                                    f"preferred {preferred}, maximum {maximum}")
            self._blocks = (minimum, preferred, maximum)
        # NBD_INFO_NAME, NBD_INFO_DESCRIPTION and unknown types are ignored, as the spec allows

    def _option_error(self, reply: int, message: str) -> None:
        said = f" (server: {message})" if message else ""
        option = self.option
        if reply == REP_ERR_TLS_REQD:
            raise HandshakeError("the server requires TLS, which fuseclone does not support" + said, reply)
        if reply == REP_ERR_SHUTDOWN:
            raise HandshakeError("the server is shutting down" + said, reply)
        if option == OPT_STRUCTURED_REPLY:  # an old server: simple replies, no block status
            self._plan = [o for o in self._plan if o != OPT_SET_META_CONTEXT]
            self._send_next_option()
        elif option == OPT_SET_META_CONTEXT:  # no block status; reads still work
            self._contexts.clear()
            self._send_next_option()
        elif option == OPT_GO and reply == REP_ERR_UNSUP:
            self.option = OPT_EXPORT_NAME  # a server from before NBD_OPT_GO
            self._out += _option(OPT_EXPORT_NAME, self._name)
            self.state = self.EXPORT_NAME
        else:
            name = repr(self.export_name)
            if reply == REP_ERR_UNKNOWN:
                text = f"export {name} not found on the server"
            elif reply == REP_ERR_POLICY:
                text = f"the server refused export {name} (policy)"
            elif reply == REP_ERR_BLOCK_SIZE_REQD:
                text = f"the server requires block size negotiation for export {name}"
            else:
                text = (f"the server refused export {name}: "
                        f"{REPLY_NAMES.get(reply, f'error 0x{reply:08x}')} to {OPTION_NAMES.get(option, option)}")
            raise HandshakeError(text + said, reply)

    def _export_name_reply(self) -> bool:
        need = _EXPORT.size + (0 if self._no_zeroes else 124)
        if len(self._buf) < need:
            return False
        self._size, self._flags = _EXPORT.unpack_from(self._buf)
        del self._buf[:need]
        self._finish()
        return True

    def _finish(self) -> None:
        minimum, preferred, maximum = self._blocks or (1, DEFAULT_PREFERRED_BLOCK, DEFAULT_MAX_BLOCK)
        assert self._size is not None
        self.info = ExportInfo(
            name=self.export_name, size=self._size, flags=self._flags,
            min_block_size=minimum, preferred_block_size=preferred, max_block_size=maximum,
            block_sizes_advertised=self._blocks is not None,
            structured_replies=self._structured,
            meta_contexts=dict(self._contexts) if self._structured else {},
        )
        self.state = self.DONE
        self.option = None


# ---- transmission: events ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimpleReply:
    """A simple reply. For a successful read, its data is already in the request's buffer."""

    cookie: int
    error: int
    done: bool = True


@dataclass(frozen=True, slots=True)
class OffsetData:
    """NBD_REPLY_TYPE_OFFSET_DATA: `length` bytes at export `offset` are in the read's buffer."""

    cookie: int
    offset: int
    length: int
    done: bool


@dataclass(frozen=True, slots=True)
class OffsetHole:
    """NBD_REPLY_TYPE_OFFSET_HOLE: `length` bytes at `offset` read as zeros (zeroed in the buffer)."""

    cookie: int
    offset: int
    length: int
    done: bool


@dataclass(frozen=True, slots=True)
class BlockStatus:
    """NBD_REPLY_TYPE_BLOCK_STATUS: consecutive (length, flags) descriptors from the request's
    offset, for one metadata context; clipped to the requested range."""

    cookie: int
    context_id: int
    descriptors: tuple[tuple[int, int], ...]
    done: bool


@dataclass(frozen=True, slots=True)
class ErrorChunk:
    """NBD_REPLY_TYPE_ERROR / _ERROR_OFFSET (offset set) or an unknown error chunk type."""

    cookie: int
    error: int
    message: str
    offset: int | None
    done: bool


@dataclass(frozen=True, slots=True)
class NoneChunk:
    """NBD_REPLY_TYPE_NONE: the final chunk, no payload."""

    cookie: int
    done: bool = True


@dataclass(frozen=True, slots=True)
class ReplyDone:
    """The request is complete: no more replies for this cookie. `error` 0 means success."""

    cookie: int
    command: int
    error: int
    message: str


Event = Union[SimpleReply, OffsetData, OffsetHole, BlockStatus, ErrorChunk, NoneChunk, ReplyDone]


class _Pending:
    __slots__ = ("cookie", "command", "offset", "length", "view", "error", "message", "covered")

    def __init__(self, cookie: int, command: int, offset: int, length: int, view) -> None:
        self.cookie = cookie
        self.command = command
        self.offset = offset
        self.length = length
        self.view = view
        self.error = 0
        self.message = ""
        self.covered = 0


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
        return _REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0)

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
        return cookie, _REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)

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
            magic = _U32.unpack_from(buf, start)[0]
            if magic == STRUCTURED_REPLY_MAGIC:
                if avail < _STRUCTURED.size:
                    break
                _, flags, kind, cookie, length = _STRUCTURED.unpack_from(buf, start)
                pending = self._pending.get(cookie)
                if pending is None:
                    raise ProtocolError(f"structured reply for unknown cookie {cookie}")
                if not self.structured:
                    raise ProtocolError("structured reply without NBD_OPT_STRUCTURED_REPLY")
                if kind == REPLY_TYPE_OFFSET_DATA and pending.command == CMD_READ:
                    if length < 9:
                        raise ProtocolError(f"NBD_REPLY_TYPE_OFFSET_DATA of {length} bytes")
                    if avail < _STRUCTURED.size + 8:
                        break
                    offset = _U64.unpack_from(buf, start + _STRUCTURED.size)[0]
                    count = length - 8
                    rel = offset - pending.offset
                    if rel < 0 or rel + count > pending.length:
                        raise ProtocolError(f"data chunk [{offset}, +{count}) outside its read "
                                            f"[{pending.offset}, +{pending.length})")
                    self._start = start + _STRUCTURED.size + 8
                    self._payload(events, pending.view[rel:rel + count],
                                  (pending, flags, offset, count))
                    continue
                if length > MAX_CHUNK_PAYLOAD:
                    raise ProtocolError(f"reply chunk of {length} bytes is too long")
                total = _STRUCTURED.size + length
                if avail < total:
                    self._reserve(total)
                    buf = self._buf
                    break
                payload = bytes(self._view[start + _STRUCTURED.size:start + total])
                self._start = start + total
                self._chunk(events, pending, flags, kind, payload)
            elif magic == SIMPLE_REPLY_MAGIC:
                if avail < _SIMPLE.size:
                    break
                _, error, cookie = _SIMPLE.unpack_from(buf, start)
                pending = self._pending.get(cookie)
                if pending is None:
                    raise ProtocolError(f"simple reply for unknown cookie {cookie}")
                self._start = start + _SIMPLE.size
                if pending.command == CMD_READ and self.structured:
                    raise ProtocolError("simple reply to NBD_CMD_READ after structured replies were negotiated")
                if pending.command == CMD_READ and error == 0:
                    self._payload(events, pending.view, (pending, None, pending.offset, pending.length))
                    continue
                events.append(SimpleReply(cookie, error))
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
                      offset: int, count: int) -> None:
        pending.covered += count
        if flags is None:  # simple reply
            events.append(SimpleReply(pending.cookie, 0))
            self._complete(events, pending, 0, "")
            return
        done = bool(flags & REPLY_FLAG_DONE)
        events.append(OffsetData(pending.cookie, offset, count, done))
        if done:
            self._complete(events, pending)

    def _chunk(self, events: list[Event], pending: _Pending, flags: int, kind: int, payload: bytes) -> None:
        done = bool(flags & REPLY_FLAG_DONE)
        cookie = pending.cookie
        if kind == REPLY_TYPE_NONE:
            if payload or not done:
                raise ProtocolError("NBD_REPLY_TYPE_NONE with a payload or without the DONE flag")
            events.append(NoneChunk(cookie))
        elif kind == REPLY_TYPE_OFFSET_HOLE:
            if pending.command != CMD_READ or len(payload) != 12:
                raise ProtocolError("malformed or unexpected NBD_REPLY_TYPE_OFFSET_HOLE")
            offset, count = struct.unpack(">QI", payload)
            rel = offset - pending.offset
            if count == 0 or rel < 0 or rel + count > pending.length:
                raise ProtocolError(f"hole chunk [{offset}, +{count}) outside its read "
                                    f"[{pending.offset}, +{pending.length})")
            pending.view[rel:rel + count] = bytes(count)
            pending.covered += count
            events.append(OffsetHole(cookie, offset, count, done))
        elif kind == REPLY_TYPE_OFFSET_DATA:
            raise ProtocolError(f"data chunk in reply to {COMMAND_NAMES.get(pending.command)}")
        elif kind == REPLY_TYPE_BLOCK_STATUS:
            if pending.command != CMD_BLOCK_STATUS or len(payload) < 12 or (len(payload) - 4) % 8:
                raise ProtocolError("malformed or unexpected NBD_REPLY_TYPE_BLOCK_STATUS")
            context = _U32.unpack_from(payload)[0]
            if context not in self._contexts:
                raise ProtocolError(f"block status for metadata context {context}, never negotiated")
            values = struct.unpack(f">{(len(payload) - 4) // 4}I", payload[4:])
            descriptors = []
            left = pending.length
            for i in range(0, len(values), 2):
                count = values[i]
                if count == 0:
                    raise ProtocolError("block status descriptor of length 0")
                if left <= 0:
                    break
                count = min(count, left)  # a final extent may run past the request: clip it
                descriptors.append((count, values[i + 1]))
                left -= count
            events.append(BlockStatus(cookie, context, tuple(descriptors), done))
        elif kind & REPLY_TYPE_ERROR_BIT:
            if len(payload) < 6:
                raise ProtocolError(f"error chunk of {len(payload)} bytes")
            error, mlen = struct.unpack_from(">IH", payload)
            if 6 + mlen > len(payload):
                raise ProtocolError("error chunk message longer than the chunk")
            message = payload[6:6 + mlen].decode("utf-8", "replace")
            offset = None
            if kind == REPLY_TYPE_ERROR_OFFSET:
                if len(payload) != 6 + mlen + 8:
                    raise ProtocolError("malformed NBD_REPLY_TYPE_ERROR_OFFSET")
                offset = _U64.unpack_from(payload, 6 + mlen)[0]
            elif kind != REPLY_TYPE_ERROR and not message:
                message = f"unknown error chunk type 0x{kind:04x}"
            error = error or EIO  # "MUST be nonzero": a zero error is still an error
            if not pending.error:
                pending.error, pending.message = error, message
            events.append(ErrorChunk(cookie, error, message, offset, done))
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
