"""The NBD protocol's wire format (doc/proto.md of NetworkBlockDevice/nbd): magic numbers,
flags, option, reply and command numbers, error values, limits, the structures they travel in,
and the errors the sans-IO handshake and transmission raise. No I/O, no state."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Mapping


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

U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
GREETING = struct.Struct(">QQH")
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
BLOCK_SIZES = struct.Struct(">III")
EXPORT = struct.Struct(">QH")


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


def option_message(option: int, payload: bytes = b"") -> bytes:
    return OPTION.pack(IHAVEOPT, option, len(payload)) + payload


def string_field(value: bytes) -> bytes:
    return U32.pack(len(value)) + value
