"""The client side of the NBD fixed-newstyle handshake, as a state machine without I/O (in the
style of h11): bytes go in, bytes and at the end an `ExportInfo` come out.

    hs = Handshake("export")
    while not hs.done:
        send(hs.data_to_send())
        hs.receive_data(recv())          # b"" means the server closed the connection
    info = hs.info

Greeting, client flags, then the options of OPTION_ORDER: NBD_OPT_STARTTLS (for nbds://),
NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT ("base:allocation") and NBD_OPT_GO (asking for
NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE), falling back to NBD_OPT_EXPORT_NAME for servers
without NBD_OPT_GO. After the server's NBD_REP_ACK to NBD_OPT_STARTTLS, `wants_tls` turns true:
the caller runs the TLS handshake on the connection, calls `tls_started()`, and the rest of the
negotiation travels inside TLS.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from .wire import (
    EXPORT, GREETING, OPTION_REPLY, U16, U32, U64, BLOCK_SIZES, CLISERV_MAGIC,
    CONTEXT_BASE_ALLOCATION, DEFAULT_MAX_BLOCK, DEFAULT_PREFERRED_BLOCK, FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT,
    MAX_OPTION_REPLY, MAX_STRING, NBDMAGIC, OPT_EXPORT_NAME, OPT_GO, OPT_SET_META_CONTEXT, OPT_STARTTLS,
    OPT_STRUCTURED_REPLY, OPTION_NAMES, OPTION_REPLY_MAGIC, REP_ACK, REP_ERR_BIT,
    REP_ERR_BLOCK_SIZE_REQD, REP_ERR_POLICY, REP_ERR_SHUTDOWN, REP_ERR_TLS_REQD, REP_ERR_UNKNOWN,
    REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, REPLY_NAMES, ExportInfo, HandshakeError, NBDError,
    ProtocolError, option_message, string_field,
)



class _Step(NamedTuple):
    option: int
    sent_when: Callable[[Handshake], bool]  # asked when the previous option's reply is in


#: The options this client sends, in this order, each only when `sent_when` holds. STARTTLS
#: comes first: nothing but the greeting may travel in the clear. NBD_OPT_SET_META_CONTEXT
#: needs structured replies, so it waits for NBD_OPT_STRUCTURED_REPLY's answer. NBD_OPT_GO
#: ends the negotiation.
OPTION_ORDER: tuple[_Step, ...] = (
    _Step(OPT_STARTTLS, lambda hs: hs.tls),
    _Step(OPT_STRUCTURED_REPLY, lambda hs: hs._want_structured),
    _Step(OPT_SET_META_CONTEXT, lambda hs: hs._structured and bool(hs._want_contexts)),
    _Step(OPT_GO, lambda hs: True),
)


class Handshake:
    """Client side of the fixed-newstyle handshake, as a state machine without I/O.

    Feed it what the server sends with `receive_data` (b"" for end of file); send what
    `data_to_send` returns. `done` turns true once NBD_OPT_GO (or NBD_OPT_EXPORT_NAME) succeeded;
    `info` then describes the export. Refusals raise HandshakeError, garbage ProtocolError.
    """

    GREETING, OPTIONS, STARTTLS, EXPORT_NAME, DONE, FAILED = (
        "greeting", "options", "starttls", "export-name", "done", "failed")

    def __init__(self, export_name: str = "", *, structured_replies: bool = True,
                 meta_contexts: tuple[str, ...] = (CONTEXT_BASE_ALLOCATION,),
                 request_block_size: bool = True, tls: bool = False) -> None:
        self.export_name = export_name
        self._name = export_name.encode("utf-8")
        if len(self._name) > MAX_STRING:
            raise ValueError("export name longer than 4096 bytes")
        self._want_structured = structured_replies
        self._want_contexts = tuple(meta_contexts)
        self._want_block_size = request_block_size
        self.tls = tls  # NBD_OPT_STARTTLS before anything else; refused means failed
        self.state = self.GREETING
        self._buf = bytearray()
        self._out = bytearray()
        self._eof = False
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

    @property
    def wants_tls(self) -> bool:
        """The server accepted NBD_OPT_STARTTLS: run the TLS handshake, then `tls_started()`."""
        return self.state == self.STARTTLS

    def tls_started(self) -> None:
        """TLS is up: the negotiation goes on inside it."""
        if self.state != self.STARTTLS:
            raise ProtocolError("tls_started() without an accepted NBD_OPT_STARTTLS")
        self.state = self.OPTIONS
        self._send_next_option()

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
        while self.state not in (self.DONE, self.STARTTLS):
            if self.state == self.GREETING:
                if not self._greeting():
                    break
            elif self.state == self.OPTIONS:
                if not self._option_reply():
                    break
            elif self.state == self.EXPORT_NAME:
                if not self._export_name_reply():
                    break
        if self._eof and self.state not in (self.DONE, self.STARTTLS):
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
        if len(buf) >= 8 and U64.unpack_from(buf)[0] != NBDMAGIC:
            raise ProtocolError(f"not an NBD server: the greeting starts with {bytes(buf[:8])!r}")
        if len(buf) >= 16:
            second = U64.unpack_from(buf, 8)[0]
            if second == CLISERV_MAGIC:
                raise HandshakeError("the server uses the oldstyle NBD handshake, which is not "
                                     "supported (it has no export names); use a newstyle server")
            if second != IHAVEOPT:
                raise ProtocolError(f"not an NBD server: unexpected magic 0x{second:016x} after NBDMAGIC")
        if len(buf) < GREETING.size:
            return False
        _, _, hflags = GREETING.unpack_from(buf)
        del buf[:GREETING.size]
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise HandshakeError("the server does not support the fixed newstyle handshake")
        self._no_zeroes = bool(hflags & FLAG_NO_ZEROES)
        self._out += U32.pack(FLAG_C_FIXED_NEWSTYLE | (FLAG_C_NO_ZEROES if self._no_zeroes else 0))
        self.state = self.OPTIONS
        self._send_next_option()
        return True

    def _send_next_option(self) -> None:
        """The first option of OPTION_ORDER after the current one that is to be sent."""
        options = [step.option for step in OPTION_ORDER]
        after = options.index(self.option) + 1 if self.option in options else 0
        option = next(step.option for step in OPTION_ORDER[after:] if step.sent_when(self))
        self.option = option
        if option in (OPT_STARTTLS, OPT_STRUCTURED_REPLY):
            self._out += option_message(option)
        elif option == OPT_SET_META_CONTEXT:
            queries = [q.encode("utf-8") for q in self._want_contexts]
            payload = string_field(self._name) + U32.pack(len(queries)) + b"".join(map(string_field, queries))
            self._out += option_message(option, payload)
        elif option == OPT_GO:
            infos = [INFO_EXPORT] + ([INFO_BLOCK_SIZE] if self._want_block_size else [])
            payload = string_field(self._name) + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)
            self._out += option_message(option, payload)
        else:  # pragma: no cover - OPTION_ORDER only holds the options above
            raise AssertionError(option)

    def _option_reply(self) -> bool:
        buf = self._buf
        if len(buf) < OPTION_REPLY.size:
            return False
        magic, option, reply, length = OPTION_REPLY.unpack_from(buf)
        if magic != OPTION_REPLY_MAGIC:
            raise ProtocolError(f"bad option reply magic 0x{magic:016x}")
        if option != self.option:
            raise ProtocolError(f"reply to option {option} while waiting for "
                                f"{OPTION_NAMES.get(self.option, self.option)}")
        if length > MAX_OPTION_REPLY:
            raise ProtocolError(f"option reply of {length} bytes is too long")
        if len(buf) < OPTION_REPLY.size + length:
            return False
        payload = bytes(buf[OPTION_REPLY.size:OPTION_REPLY.size + length])
        del buf[:OPTION_REPLY.size + length]
        if reply & REP_ERR_BIT:
            self._option_error(reply, payload.decode("utf-8", "replace").strip())
        elif self.option == OPT_STARTTLS:
            if reply != REP_ACK or payload:
                raise ProtocolError(f"unexpected {REPLY_NAMES.get(reply, reply)} to NBD_OPT_STARTTLS")
            if buf:
                raise ProtocolError("the server sent data after accepting NBD_OPT_STARTTLS, before TLS")
            self.state = self.STARTTLS
            return False
        elif self.option == OPT_STRUCTURED_REPLY:
            if reply != REP_ACK:
                raise ProtocolError(f"unexpected {REPLY_NAMES.get(reply, reply)} to NBD_OPT_STRUCTURED_REPLY")
            self._structured = True
            self._send_next_option()
        elif self.option == OPT_SET_META_CONTEXT:
            if reply == REP_META_CONTEXT:
                if len(payload) < 4 or len(payload) > 4 + MAX_STRING:
                    raise ProtocolError("malformed NBD_REP_META_CONTEXT")
                self._contexts[payload[4:].decode("utf-8", "replace")] = U32.unpack_from(payload)[0]
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
        kind = U16.unpack_from(payload)[0]
        if kind == INFO_EXPORT:
            if len(payload) != 12:
                raise ProtocolError(f"NBD_INFO_EXPORT of {len(payload)} bytes (expected 12)")
            self._size, self._flags = EXPORT.unpack_from(payload, 2)
        elif kind == INFO_BLOCK_SIZE:
            if len(payload) != 14:
                raise ProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes (expected 14)")
            minimum, preferred, maximum = BLOCK_SIZES.unpack_from(payload, 2)
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
            raise HandshakeError("the server requires TLS (connect with nbds:// or nbds+unix://)"
                                 + said, reply)
        if reply == REP_ERR_SHUTDOWN:
            raise HandshakeError("the server is shutting down" + said, reply)
        if option == OPT_STARTTLS:  # asked for TLS, so never go on without it
            raise HandshakeError("the server does not offer TLS (it answered NBD_OPT_STARTTLS with "
                                 f"{REPLY_NAMES.get(reply, f'error 0x{reply:08x}')})" + said, reply)
        if option == OPT_STRUCTURED_REPLY:  # an old server: simple replies, no block status
            self._send_next_option()
        elif option == OPT_SET_META_CONTEXT:  # no block status; reads still work
            self._contexts.clear()
            self._send_next_option()
        elif option == OPT_GO and reply == REP_ERR_UNSUP:
            self.option = OPT_EXPORT_NAME  # a server from before NBD_OPT_GO
            self._out += option_message(OPT_EXPORT_NAME, self._name)
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
        need = EXPORT.size + (0 if self._no_zeroes else 124)
        if len(self._buf) < need:
            return False
        self._size, self._flags = EXPORT.unpack_from(self._buf)
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
