"""The NBD codec with plain bytes: no sockets, no server. Server messages are built here with
struct from the protocol document, not with the codec, so the two cannot agree on a mistake."""

import struct

import pytest

from fuseclone.sources.nbd import wire as p
from fuseclone.sources.nbd.handshake import Handshake
from fuseclone.sources.nbd.transmission import BlockStatus, ReplyDone, Transmission

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9


# ---- server side, by hand ----------------------------------------------------------------------


def greeting(flags=p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES):
    return NBDMAGIC + IHAVEOPT + struct.pack(">H", flags)


def opt_reply(option, reply, payload=b""):
    return struct.pack(">QIII", REPLY_MAGIC, option, reply, len(payload)) + payload


def info_export(size, flags):
    return opt_reply(p.OPT_GO, p.REP_INFO, struct.pack(">HQH", 0, size, flags))


def info_block(minimum, preferred, maximum):
    return opt_reply(p.OPT_GO, p.REP_INFO, struct.pack(">HIII", 3, minimum, preferred, maximum))


def meta_context(cid, name):
    return opt_reply(p.OPT_SET_META_CONTEXT, p.REP_META_CONTEXT, struct.pack(">I", cid) + name.encode())


def client_option(data, offset=0):
    """Decode one client option at `offset`: (option, payload, next offset)."""
    magic, option, length = struct.unpack_from(">8sII", data, offset)
    assert magic == IHAVEOPT
    start = offset + 16
    return option, data[start:start + length], start + length


def simple(cookie, error=0, data=b""):
    return struct.pack(">IIQ", 0x67446698, error, cookie) + data


def chunk(cookie, kind, payload=b"", done=False):
    return struct.pack(">IHHQI", 0x668E33EF, 1 if done else 0, kind, cookie, len(payload)) + payload


def data_chunk(cookie, offset, data, done=False):
    return chunk(cookie, 1, struct.pack(">Q", offset) + data, done)


def hole_chunk(cookie, offset, length, done=False):
    return chunk(cookie, 2, struct.pack(">QI", offset, length), done)


def error_chunk(cookie, error, message=b"", offset=None, done=True, kind=None):
    payload = struct.pack(">IH", error, len(message)) + message
    if offset is not None:
        payload += struct.pack(">Q", offset)
    kind = kind if kind is not None else (0x8002 if offset is not None else 0x8001)
    return chunk(cookie, kind, payload, done)


def status_chunk(cookie, context, descriptors, done=True):
    payload = struct.pack(">I", context) + b"".join(struct.pack(">II", n, f) for n, f in descriptors)
    return chunk(cookie, 5, payload, done)


def full_handshake(name="disk", size=1 << 20, flags=p.FLAG_HAS_FLAGS | p.FLAG_READ_ONLY | p.FLAG_CAN_MULTI_CONN,
                   blocks=(512, 4096, 1 << 20)):
    """Run the happy path; returns (Handshake, every byte the client sent)."""
    hs = Handshake(name)
    sent = bytearray()
    hs.receive_data(greeting())
    sent += hs.data_to_send()
    hs.receive_data(opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK))
    sent += hs.data_to_send()
    hs.receive_data(meta_context(7, "base:allocation") + opt_reply(p.OPT_SET_META_CONTEXT, p.REP_ACK))
    sent += hs.data_to_send()
    hs.receive_data(info_export(size, flags) + info_block(*blocks) + opt_reply(p.OPT_GO, p.REP_ACK))
    sent += hs.data_to_send()
    return hs, bytes(sent)


# ---- the handshake -----------------------------------------------------------------------------


def test_handshake_sequence_and_result():
    hs = Handshake("disk")
    assert hs.data_to_send() == b""  # the server speaks first
    hs.receive_data(greeting())
    out = hs.data_to_send()
    assert out[:4] == struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES)
    option, payload, end = client_option(out, 4)
    assert (option, payload, end) == (p.OPT_STRUCTURED_REPLY, b"", len(out))

    hs.receive_data(opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK))
    option, payload, end = client_option(hs.data_to_send())
    assert option == p.OPT_SET_META_CONTEXT
    assert payload == (struct.pack(">I", 4) + b"disk" + struct.pack(">I", 1)
                       + struct.pack(">I", 15) + b"base:allocation")

    hs.receive_data(meta_context(7, "base:allocation"))
    assert hs.data_to_send() == b""  # still waiting for the ACK
    hs.receive_data(opt_reply(p.OPT_SET_META_CONTEXT, p.REP_ACK))
    option, payload, _ = client_option(hs.data_to_send())
    assert option == p.OPT_GO
    assert payload == struct.pack(">I", 4) + b"disk" + struct.pack(">HHH", 2, p.INFO_EXPORT, p.INFO_BLOCK_SIZE)

    flags = p.FLAG_HAS_FLAGS | p.FLAG_READ_ONLY | p.FLAG_CAN_MULTI_CONN | p.FLAG_SEND_DF
    hs.receive_data(info_export(123456789, flags))
    hs.receive_data(opt_reply(p.OPT_GO, p.REP_INFO, struct.pack(">H", 2) + b"a description"))  # ignored
    hs.receive_data(info_block(512, 4096, 8 << 20))
    assert not hs.done
    hs.receive_data(opt_reply(p.OPT_GO, p.REP_ACK))
    assert hs.done and hs.data_to_send() == b""
    info = hs.info
    assert (info.name, info.size, info.flags) == ("disk", 123456789, flags)
    assert (info.min_block_size, info.preferred_block_size, info.max_block_size) == (512, 4096, 8 << 20)
    assert info.block_sizes_advertised and info.structured_replies
    assert info.read_only and info.can_multi_conn and info.can_df and not info.rotational
    assert info.base_allocation == 7
    assert info.flag_names == ["HAS_FLAGS", "READ_ONLY", "SEND_DF", "CAN_MULTI_CONN"]


def test_handshake_byte_at_a_time_gives_the_same_result():
    reference, sent = full_handshake()
    hs = Handshake("disk")
    server = (greeting() + opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK)
              + meta_context(7, "base:allocation") + opt_reply(p.OPT_SET_META_CONTEXT, p.REP_ACK)
              + info_export(1 << 20, p.FLAG_HAS_FLAGS | p.FLAG_READ_ONLY | p.FLAG_CAN_MULTI_CONN)
              + info_block(512, 4096, 1 << 20) + opt_reply(p.OPT_GO, p.REP_ACK))
    out = bytearray()
    for i in range(len(server)):
        hs.receive_data(server[i:i + 1])
        out += hs.data_to_send()
    assert hs.done and hs.info == reference.info and bytes(out) == sent


def test_no_zeroes_only_when_the_server_offers_it():
    hs = Handshake("")
    hs.receive_data(greeting(p.FLAG_FIXED_NEWSTYLE))
    assert hs.data_to_send()[:4] == struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE)


def test_no_block_size_info_gives_protocol_defaults():
    hs = Handshake("")
    for data in (greeting(), opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK),
                 opt_reply(p.OPT_SET_META_CONTEXT, p.REP_ACK),  # no context selected
                 info_export(4096, p.FLAG_HAS_FLAGS), opt_reply(p.OPT_GO, p.REP_ACK)):
        hs.receive_data(data)
    info = hs.info
    assert (info.min_block_size, info.max_block_size, info.block_sizes_advertised) == (1, 32 << 20, False)
    assert info.base_allocation is None and not info.can_multi_conn


@pytest.mark.parametrize("first, message", [
    (b"SSH-2.0-OpenSSH_9.2\r\n", "not an NBD server"),
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not an NBD server"),
    (NBDMAGIC + b"XXXXXXXX", "unexpected magic"),
])
def test_not_an_nbd_server(first, message):
    hs = Handshake("")
    with pytest.raises(p.ProtocolError, match=message):
        hs.receive_data(first)
    with pytest.raises(p.ProtocolError):
        hs.receive_data(b"more")  # a failed handshake stays failed


def test_oldstyle_and_non_fixed_newstyle_servers_are_refused_clearly():
    hs = Handshake("")
    with pytest.raises(p.HandshakeError, match="oldstyle"):
        hs.receive_data(NBDMAGIC + struct.pack(">Q", 0x00420281861253))
    hs = Handshake("")
    with pytest.raises(p.HandshakeError, match="fixed newstyle"):
        hs.receive_data(greeting(0))


@pytest.mark.parametrize("reply, words", [
    (p.REP_ERR_UNKNOWN, ["export 'disk' not found", "no such export here"]),
    (p.REP_ERR_POLICY, ["refused export 'disk'", "policy"]),
    (p.REP_ERR_INVALID, ["NBD_REP_ERR_INVALID", "NBD_OPT_GO"]),
    (p.REP_ERR_BLOCK_SIZE_REQD, ["block size"]),
])
def test_go_errors_are_one_clear_line(reply, words):
    hs = Handshake("disk")
    hs.receive_data(greeting() + opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK)
                    + opt_reply(p.OPT_SET_META_CONTEXT, p.REP_ACK))
    with pytest.raises(p.HandshakeError) as info:
        hs.receive_data(opt_reply(p.OPT_GO, reply, b"no such export here"))
    text = str(info.value)
    assert "\n" not in text and info.value.reply == reply
    for word in words:
        assert word in text


def test_tls_required_and_shutdown_stop_at_once():
    hs = Handshake("")
    hs.receive_data(greeting())
    with pytest.raises(p.HandshakeError, match="requires TLS .*nbds://"):
        hs.receive_data(opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ERR_TLS_REQD))
    hs = Handshake("")
    hs.receive_data(greeting())
    with pytest.raises(p.HandshakeError, match="shutting down"):
        hs.receive_data(opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ERR_SHUTDOWN))


def test_starttls_comes_first_and_the_rest_waits_for_tls():
    hs = Handshake("disk", tls=True)
    hs.receive_data(greeting())
    out = hs.data_to_send()
    option, payload, end = client_option(out, 4)
    assert (option, payload, end) == (p.OPT_STARTTLS, b"", len(out))  # nothing else in the clear
    hs.receive_data(opt_reply(p.OPT_STARTTLS, p.REP_ACK))
    assert hs.wants_tls and hs.data_to_send() == b""
    hs.tls_started()
    option, _, _ = client_option(hs.data_to_send())
    assert option == p.OPT_STRUCTURED_REPLY and not hs.wants_tls
    hs.receive_data(opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK))
    assert client_option(hs.data_to_send())[0] == p.OPT_SET_META_CONTEXT


@pytest.mark.parametrize("reply", [p.REP_ERR_UNSUP, p.REP_ERR_POLICY, p.REP_ERR_INVALID])
def test_starttls_refused_is_fatal(reply):
    hs = Handshake("disk", tls=True)
    hs.receive_data(greeting())
    with pytest.raises(p.HandshakeError, match="does not offer TLS") as info:
        hs.receive_data(opt_reply(p.OPT_STARTTLS, reply, b"no certificates"))
    assert "no certificates" in str(info.value)


def test_data_in_the_clear_after_starttls_is_refused():
    hs = Handshake("disk", tls=True)
    hs.receive_data(greeting())
    with pytest.raises(p.ProtocolError, match="before TLS"):
        hs.receive_data(opt_reply(p.OPT_STARTTLS, p.REP_ACK) + b"\x16\x03")


def test_server_without_structured_replies_skips_meta_context():
    hs = Handshake("x")
    hs.receive_data(greeting())
    hs.data_to_send()
    hs.receive_data(opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ERR_UNSUP))
    option, _, _ = client_option(hs.data_to_send())
    assert option == p.OPT_GO  # no NBD_OPT_SET_META_CONTEXT without structured replies
    hs.receive_data(info_export(100, 1) + opt_reply(p.OPT_GO, p.REP_ACK))
    assert not hs.info.structured_replies and hs.info.base_allocation is None


def test_meta_context_refused_still_connects():
    hs = Handshake("x")
    hs.receive_data(greeting() + opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK))
    hs.data_to_send()
    hs.receive_data(opt_reply(p.OPT_SET_META_CONTEXT, p.REP_ERR_INVALID))
    option, _, _ = client_option(hs.data_to_send())
    assert option == p.OPT_GO
    hs.receive_data(info_export(100, 1) + opt_reply(p.OPT_GO, p.REP_ACK))
    assert hs.info.structured_replies and hs.info.base_allocation is None


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_go_unsupported_falls_back_to_export_name(no_zeroes):
    hs = Handshake("old")
    hs.receive_data(greeting(p.FLAG_FIXED_NEWSTYLE | (p.FLAG_NO_ZEROES if no_zeroes else 0)))
    hs.receive_data(opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ERR_UNSUP))
    hs.data_to_send()
    hs.receive_data(opt_reply(p.OPT_GO, p.REP_ERR_UNSUP))
    option, payload, _ = client_option(hs.data_to_send())
    assert (option, payload) == (p.OPT_EXPORT_NAME, b"old")
    reply = struct.pack(">QH", 5000, 3) + (b"" if no_zeroes else bytes(124))
    hs.receive_data(reply[:-1])
    assert not hs.done
    hs.receive_data(reply[-1:])
    assert hs.done and (hs.info.size, hs.info.flags) == (5000, 3)


def test_end_of_file_during_the_handshake():
    hs = Handshake("")
    with pytest.raises(p.ProtocolError, match="before a complete NBD greeting"):
        hs.receive_data(b"")
    hs = Handshake("")
    hs.receive_data(greeting())
    with pytest.raises(p.HandshakeError, match="closed the connection during the handshake"):
        hs.receive_data(b"")
    hs = Handshake("gone")
    hs.receive_data(greeting(p.FLAG_FIXED_NEWSTYLE) + opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ERR_UNSUP)
                    + opt_reply(p.OPT_GO, p.REP_ERR_UNSUP))
    with pytest.raises(p.HandshakeError, match="'gone' not found or refused"):
        hs.receive_data(b"")


@pytest.mark.parametrize("bad, message", [
    (struct.pack(">QIII", 0x1234, p.OPT_STRUCTURED_REPLY, p.REP_ACK, 0), "magic"),
    (opt_reply(p.OPT_GO, p.REP_ACK), "while waiting for NBD_OPT_STRUCTURED_REPLY"),
    (opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_INFO), "unexpected"),
    (struct.pack(">QIII", REPLY_MAGIC, p.OPT_STRUCTURED_REPLY, p.REP_ACK, 1 << 30), "too long"),
])
def test_malformed_option_replies(bad, message):
    hs = Handshake("")
    hs.receive_data(greeting())
    with pytest.raises(p.ProtocolError, match=message):
        hs.receive_data(bad)


@pytest.mark.parametrize("bad, message", [
    (opt_reply(p.OPT_GO, p.REP_ACK), "without NBD_INFO_EXPORT"),
    (opt_reply(p.OPT_GO, p.REP_INFO, struct.pack(">HQ", 0, 5)), "NBD_INFO_EXPORT of 10 bytes"),
    (opt_reply(p.OPT_GO, p.REP_INFO, b"\x00"), "without an info type"),
    (info_block(3, 4096, 1 << 20), "invalid block size"),
    (info_block(4096, 512, 1 << 20), "invalid block size"),
    (info_block(512, 4096, 256), "invalid block size"),
])
def test_malformed_go_replies(bad, message):
    hs = Handshake("")
    hs.receive_data(greeting() + opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK)
                    + opt_reply(p.OPT_SET_META_CONTEXT, p.REP_ACK))
    with pytest.raises(p.ProtocolError, match=message):
        hs.receive_data(bad)


def test_export_name_too_long():
    with pytest.raises(ValueError):
        Handshake("x" * 5000)


# ---- transmission: requests ----------------------------------------------------------------


def info(size=1 << 20, structured=True, contexts=None):
    contexts = {"base:allocation": 7} if contexts is None else contexts
    return p.ExportInfo(name="", size=size, flags=1, structured_replies=structured,
                        meta_contexts=contexts if structured else {})


def test_request_encoding():
    t = Transmission(info())
    buf = bytearray(4096)
    cookie, msg = t.read(8192, 4096, buf)
    assert msg == struct.pack(">IHHQQI", 0x25609513, 0, 0, cookie, 8192, 4096)
    cookie2, msg = t.block_status(0, 65536)
    assert cookie2 != cookie
    assert msg == struct.pack(">IHHQQI", 0x25609513, 0, 7, cookie2, 0, 65536)
    _, msg = t.block_status(0, 512, req_one=True)
    assert struct.unpack(">IHH", msg[:8])[1] == p.CMD_FLAG_REQ_ONE
    assert t.in_flight == 3
    assert t.disconnect() == struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0)
    assert t.disconnect() == b""  # once
    with pytest.raises(ValueError):
        t.read(0, 10, bytearray(10))  # nothing after NBD_CMD_DISC


def test_the_codec_cannot_encode_a_write():
    t = Transmission(info())
    assert not any(hasattr(t, name) for name in ("write", "trim", "flush", "write_zeroes"))
    for command in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES, p.CMD_FLUSH, p.CMD_RESIZE):
        with pytest.raises(ValueError, match="never sent"):
            t._request(command, 0, 0, 512, None)
    assert p.SENDABLE_COMMANDS == {p.CMD_READ, p.CMD_BLOCK_STATUS, p.CMD_DISC}


def test_request_validation():
    t = Transmission(info(size=1000))
    with pytest.raises(ValueError):
        t.read(900, 200, bytearray(200))  # past the end
    with pytest.raises(ValueError):
        t.read(0, 10, bytearray(9))  # buffer of the wrong size
    with pytest.raises(ValueError):
        t.read(0, 10, b"0123456789")  # read-only buffer
    with pytest.raises(ValueError):
        t.read(0, 0, bytearray(0))
    with pytest.raises(ValueError, match="no metadata context"):
        Transmission(info(contexts={})).block_status(0, 100)
    assert t.in_flight == 0


def test_cookies_are_unique_among_requests_in_flight():
    t = Transmission(info())
    t._next_cookie = 0xFFFFFFFFFFFFFFFF
    cookies = [t.read(0, 1, bytearray(1))[0] for _ in range(5)]
    assert len(set(cookies)) == 5 and 0 not in cookies


# ---- transmission: replies -----------------------------------------------------------------


def test_simple_read_reply_in_any_split():
    payload = bytes(range(256)) * 64
    for step in (1, 7, 16, 1000, len(payload) + 16):
        t = Transmission(info(structured=False))
        buf = bytearray(len(payload))
        cookie, _ = t.read(4096, len(payload), buf)
        stream = simple(cookie, 0, payload)
        events = []
        for i in range(0, len(stream), step):
            events += t.receive_data(stream[i:i + step])
        assert bytes(buf) == payload
        assert events == [ReplyDone(cookie, p.CMD_READ, 0, "")]
        assert t.in_flight == 0


def test_simple_error_reply_has_no_payload():
    t = Transmission(info(structured=False))
    a, _ = t.read(0, 512, bytearray(512))
    buf = bytearray(4)
    b, _ = t.read(512, 4, buf)
    events = t.receive_data(simple(a, p.EIO) + simple(b, 0, b"abcd"))
    assert ReplyDone(a, p.CMD_READ, p.EIO, "") in events
    assert ReplyDone(b, p.CMD_READ, 0, "") in events and buf == b"abcd"


def test_structured_read_out_of_order_with_a_hole_and_none():
    t = Transmission(info())
    buf = bytearray(b"\xff" * 3000)
    cookie, _ = t.read(10000, 3000, buf)
    events = t.receive_data(data_chunk(cookie, 12000, b"C" * 1000)
                            + hole_chunk(cookie, 11000, 1000)
                            + data_chunk(cookie, 10000, b"A" * 1000)
                            + chunk(cookie, 0, done=True))
    assert bytes(buf) == b"A" * 1000 + bytes(1000) + b"C" * 1000
    assert events == [ReplyDone(cookie, p.CMD_READ, 0, "")]  # only the end is an event


def test_interleaved_replies_and_done_on_a_data_chunk():
    t = Transmission(info())
    a_buf, b_buf = bytearray(8), bytearray(8)
    a, _ = t.read(0, 8, a_buf)
    b, _ = t.read(8, 8, b_buf)
    stream = (data_chunk(b, 12, b"bbbb") + data_chunk(a, 0, b"aaaa") + data_chunk(b, 8, b"BBBB", done=True)
              + data_chunk(a, 4, b"AAAA", done=True))
    events = []
    for i in range(len(stream)):  # byte by byte: every header and payload split
        events += t.receive_data(stream[i:i + 1])
    assert a_buf == b"aaaaAAAA" and b_buf == b"BBBBbbbb"
    assert [e for e in events if isinstance(e, ReplyDone)] == [
        ReplyDone(b, p.CMD_READ, 0, ""), ReplyDone(a, p.CMD_READ, 0, "")]


def test_large_data_chunk_is_received_straight_into_the_read_buffer():
    t = Transmission(info(), header_buffer=4096)
    buf = bytearray(1 << 20)
    cookie, _ = t.read(0, 1 << 20, buf)
    payload = bytes(range(256)) * 4096
    stream = data_chunk(cookie, 0, payload, done=True)
    t.receive_data(stream[:28 + 100])  # header, offset, the first 100 bytes
    target = t.get_buffer()
    assert target.obj is buf and len(target) == (1 << 20) - 100  # no copy through the codec
    target[:len(target)] = stream[128:]
    events = t.buffer_updated(len(target))
    assert events[-1] == ReplyDone(cookie, p.CMD_READ, 0, "") and buf == payload


def test_incomplete_read_is_an_error():
    t = Transmission(info())
    cookie, _ = t.read(0, 100, bytearray(100))
    events = t.receive_data(data_chunk(cookie, 0, b"x" * 50) + chunk(cookie, 0, done=True))
    assert events[-1].error == p.EIO and "covered 50 of 100" in events[-1].message


def test_error_chunks():
    t = Transmission(info())
    a, _ = t.read(0, 100, bytearray(100))
    b, _ = t.read(0, 100, bytearray(100))
    c, _ = t.read(0, 100, bytearray(100))
    events = t.receive_data(error_chunk(a, p.EIO, b"disk on fire")
                            + error_chunk(b, p.ENOSPC, b"bad", offset=40, done=False) + chunk(b, 0, done=True)
                            + error_chunk(c, 0, kind=0x8063))
    assert ReplyDone(a, p.CMD_READ, p.EIO, "disk on fire") in events
    assert ReplyDone(b, p.CMD_READ, p.ENOSPC, "bad (at offset 40)") in events
    done_c = [e for e in events if isinstance(e, ReplyDone) and e.cookie == c][0]
    assert done_c.error == p.EIO and "unknown error chunk type" in done_c.message  # zero error is still an error
    assert t.in_flight == 0


def test_block_status_reply_is_clipped_to_the_request():
    t = Transmission(info())
    cookie, _ = t.block_status(0, 10000)
    events = t.receive_data(status_chunk(cookie, 7, [(4096, 0), (4096, 3), (65536, 0)]))
    assert events == [BlockStatus(cookie, 7, ((4096, 0), (4096, 3), (1808, 0))),
                      ReplyDone(cookie, p.CMD_BLOCK_STATUS, 0, "")]


def test_a_second_block_status_chunk_of_one_context_is_not_taken_as_what_follows():
    """Each block status chunk describes the range from the request's offset: a second one
    for the same context (a server that answers twice) must not be read as the descriptors
    after the first, which would put its zero flags over other bytes."""
    t = Transmission(info())
    cookie, _ = t.block_status(0, 8192)
    events = t.receive_data(status_chunk(cookie, 7, [(4096, 0)], done=False)
                            + status_chunk(cookie, 7, [(8192, 3)]))
    assert events == [BlockStatus(cookie, 7, ((4096, 0),)),
                      ReplyDone(cookie, p.CMD_BLOCK_STATUS, 0, "")]


def test_block_status_payload_larger_than_the_header_buffer():
    t = Transmission(info(size=1 << 40), header_buffer=64)
    cookie, _ = t.block_status(0, 1 << 31)
    descriptors = [(512, i % 4) for i in range(5000)]
    stream = status_chunk(cookie, 7, descriptors)
    events = []
    for i in range(0, len(stream), 333):
        events += t.receive_data(stream[i:i + 333])
    assert events[0].descriptors == tuple(descriptors)


def test_block_status_answered_by_simple_error():
    t = Transmission(info())
    cookie, _ = t.block_status(0, 100)
    assert t.receive_data(simple(cookie, p.EINVAL)) == [
        ReplyDone(cookie, p.CMD_BLOCK_STATUS, p.EINVAL, "")]


def _bad(cookie_read, cookie_status):
    """name -> (server bytes, what the error says)"""
    return {
        "unknown cookie": (simple(999, 0), "unknown cookie 999"),
        "bad magic": (struct.pack(">IIQ", 0xDEADBEEF, 0, cookie_read), "bad reply magic"),
        "data after the read": (data_chunk(cookie_read, 1095, b"x" * 10), "outside its read"),
        "data before the read": (data_chunk(cookie_read, 995, b"x" * 10), "outside its read"),
        "NONE without DONE": (chunk(cookie_read, 0, done=False), "without the DONE flag"),
        "simple reply to a read": (simple(cookie_read, 0, b"x" * 100), "simple reply to NBD_CMD_READ"),
        "unknown chunk type": (chunk(cookie_read, 42, b"", done=True), "unknown structured reply type 42"),
        "zero-length descriptor": (status_chunk(cookie_status, 7, [(0, 0)]), "descriptor of length 0"),
        "unknown context": (status_chunk(cookie_status, 9, [(100, 0)]), "context 9"),
        "data for block status": (data_chunk(cookie_status, 0, b"x"), "data chunk in reply to NBD_CMD_BLOCK_STATUS"),
        "block status for a read": (status_chunk(cookie_read, 7, [(10, 0)]), "NBD_REPLY_TYPE_BLOCK_STATUS"),
        "short data chunk": (chunk(cookie_read, 1, b"abcd"), "OFFSET_DATA of 4 bytes"),
        "long error message": (chunk(cookie_read, 0x8001, struct.pack(">IH", 5, 50) + b"short", True),
                               "message longer than the chunk"),
        "empty hole": (hole_chunk(cookie_read, 1000, 0), "hole chunk"),
        "hole outside": (hole_chunk(cookie_read, 1050, 100), "hole chunk"),
        # Chunks that overlap would add up to the read's length while leaving part of its
        # buffer (a recycled one: another read's bytes) unwritten.
        "data twice": (data_chunk(cookie_read, 1000, b"x" * 50) + data_chunk(cookie_read, 1000, b"y" * 50)
                       + chunk(cookie_read, 0, done=True), "overlaps"),
        "hole over data": (data_chunk(cookie_read, 1000, b"x" * 60) + hole_chunk(cookie_read, 1040, 40)
                           + chunk(cookie_read, 0, done=True), "overlaps"),
        "data over a hole": (hole_chunk(cookie_read, 1050, 50) + data_chunk(cookie_read, 1000, b"x" * 51)
                             + chunk(cookie_read, 0, done=True), "overlaps"),
    }


@pytest.mark.parametrize("case", list(_bad(1, 2)))
def test_malformed_replies_are_protocol_errors(case):
    t = Transmission(info())
    read_cookie, _ = t.read(1000, 100, bytearray(100))
    status_cookie, _ = t.block_status(0, 100)
    stream, message = _bad(read_cookie, status_cookie)[case]
    with pytest.raises(p.ProtocolError, match=message):
        t.receive_data(stream)


def test_structured_reply_without_negotiation_is_refused():
    t = Transmission(info(structured=False))
    cookie, _ = t.read(0, 4, bytearray(4))
    with pytest.raises(p.ProtocolError, match="without NBD_OPT_STRUCTURED_REPLY"):
        t.receive_data(data_chunk(cookie, 0, b"abcd", done=True))
