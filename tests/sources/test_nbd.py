"""The NBD source against a real nbdkit: reads, extents, faults, reconnection, shutdown, and
the engine hydrating from it."""

import contextlib
import errno
import hashlib
import os
import random
import sys
import time

import pytest
import trio
import trio.testing

from fuseclone.clone import open_clone, running
from fuseclone.engine import Settings
from fuseclone.errors import MetadataError, SourceError
from fuseclone.sources import open_source
from fuseclone.sources.base import SourceReadError
from fuseclone.sources.local import LocalSource
from fuseclone.sources.nbd import NbdSource, open_nbd_source, parse_nbd_url, same_nbd_export
from fuseclone.sources.nbd.buffers import BufferPool
from fuseclone.sources.nbd.pool import DRAIN_TIMEOUT
from tests.engine.conftest import make_source_file
from tests.sources.conftest import read_once_it_answers

KiB = 1024
MiB = 1024 * KiB
SIZE = 4 * MiB + 5 * KiB + 123  # not a multiple of anything: the last block is partial


@pytest.fixture
def image(tmp_path):
    """A sparse source: random data, all-zero chunks and real holes (64 KiB chunks)."""
    return str(make_source_file(tmp_path / "src.img", SIZE, seed=3))


def contents(path):
    with open(path, "rb") as f:
        return f.read()


def allocated_ranges(path):
    """The data ranges of a file, as the filesystem reports them (SEEK_DATA / SEEK_HOLE)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, out, pos = os.fstat(fd).st_size, [], 0
        while pos < size:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, pos, os.SEEK_HOLE)
            out.append((pos, end))
            pos = end
        return out
    finally:
        os.close(fd)


def zero_ranges_of(path):
    """The holes of a file: what allocated_ranges leaves out."""
    out, pos = [], 0
    for lo, hi in allocated_ranges(path) + [(os.path.getsize(path),) * 2]:
        if lo > pos:
            out.append((pos, lo))
        pos = hi
    return out


# ---- URLs ------------------------------------------------------------------------------------


def test_url_forms():
    a = parse_nbd_url("nbd://example.org")
    assert (a.host, a.port, a.export, a.socket_path) == ("example.org", 10809, "", None)
    a = parse_nbd_url("nbd://127.0.0.1:10900/my%20disk")
    assert (a.host, a.port, a.export) == ("127.0.0.1", 10900, "my disk")
    assert a.canonical == "nbd://127.0.0.1:10900/my%20disk"
    a = parse_nbd_url("nbd://[::1]:5000/x")
    assert (a.host, a.port, a.canonical) == ("::1", 5000, "nbd://[::1]:5000/x")
    a = parse_nbd_url("nbd+unix:///exp?socket=/run/nbd.sock")
    assert (a.socket_path, a.export, a.host) == ("/run/nbd.sock", "exp", None)
    assert parse_nbd_url("nbd+unix:///?socket=rel.sock").socket_path == os.path.abspath("rel.sock")


def test_tls_urls_parse_like_libnbd():
    a = parse_nbd_url("nbds://localhost/disk?tls-certificates=certs")
    assert (a.tls, a.host, a.port, a.export) == (True, "localhost", 10809, "disk")
    assert a.tls_certificates == os.path.abspath("certs")
    assert a.canonical == "nbds://localhost:10809/disk"  # no certificate paths in the identity
    a = parse_nbd_url("nbds+unix:///disk?socket=/run/nbd.sock")
    assert (a.tls, a.socket_path, a.tls_certificates) == (True, "/run/nbd.sock", None)
    assert not parse_nbd_url("nbd://localhost/").tls


def test_tls_is_how_an_export_is_reached_not_which_it_is():
    plain = {"kind": "nbd", "url": "nbd://h:10809/x", "export": "x", "size": 1, "host": "h", "port": 10809}
    tls = dict(plain, url="nbds://h:10809/x")
    assert same_nbd_export(plain, tls)
    assert not same_nbd_export(plain, dict(tls, port=10810))


@pytest.mark.parametrize("url, words", [
    ("nbd+unix:///exp", "?socket=PATH"),
    ("nbd+unix://host/exp?socket=/s", "takes no host"),
    ("nbd:///exp", "needs a host"),
    ("nbd://host:notaport/", "not a valid NBD URL"),
    ("nbd://host:0/exp", "port 0 is not a port"),
    ("nbdx://host/", "not an NBD URL"),
    ("nbd://host/?tls-certificates=/etc/pki", "needs TLS"),
    ("nbds+unix:///exp", "?socket=PATH"),
])
def test_bad_urls_are_source_errors(url, words):
    with pytest.raises(SourceError) as info:
        parse_nbd_url(url)
    assert words in str(info.value) and url in str(info.value)


# ---- opening ---------------------------------------------------------------------------------


async def test_size_identity_and_connections(nbdkit, image):
    server = nbdkit("file", image)
    async with open_source(server.url()) as source:
        assert isinstance(source, NbdSource)
        assert source.size == SIZE
        assert source.description == server.url()
        data = contents(image)
        sample = hashlib.sha256(data[:64 * KiB] + data[-64 * KiB:]).hexdigest()
        assert source.identity() == {"kind": "nbd", "url": server.url(), "export": "", "size": SIZE,
                                     "socket": server.sock, "sample_sha256": sample}
        assert source.info.read_only and source.info.can_multi_conn
        assert source.info.base_allocation is not None
        assert source.connections == 4  # CAN_MULTI_CONN: a pool
    async with open_nbd_source(server.url(), connections=1) as source:
        assert source.connections == 1


async def test_the_data_sample_of_a_small_image_is_the_whole_image(nbdkit, tmp_path):
    small = tmp_path / "small.img"
    small.write_bytes(os.urandom(100 * KiB))  # less than both ends: read once, whole
    async with open_source(nbdkit("file", small).url()) as source:
        assert source.sample == hashlib.sha256(small.read_bytes()).hexdigest()


async def test_identity_differs_per_export(nbdkit, image, tmp_path):
    server = nbdkit("file", f"dir={tmp_path}")  # one export per file in the directory
    other = tmp_path / "other.img"
    other.write_bytes(b"x" * SIZE)
    async with open_nbd_source(server.url("src.img")) as a, open_nbd_source(server.url("other.img")) as b:
        assert a.size == b.size == SIZE
        assert a.identity()["export"] == "src.img" and a.identity() != b.identity()
        assert await a.read(0, SIZE) == contents(image)
        assert await b.read(0, SIZE) == b"x" * SIZE


async def test_a_clone_resumes_when_the_unix_socket_moves(nbdkit, image, tmp_path):
    """`nbdkit -U -` makes up a socket path each run: the same export (name and size) served on
    another socket resumes the clone; another export name, or TCP, is another source."""
    dst, meta = str(tmp_path / "dst.img"), str(tmp_path / "meta")
    first = nbdkit("file", f"dir={tmp_path}", name="first")
    async with open_source(first.url("src.img")) as source:
        engine = open_clone(source, dst, meta, settings=Settings(hydration=False))
        async with running(engine):
            await engine.write(0, b"y" * (64 * KiB))  # something to resume
        hydrated = engine.status().hydrated_regions
    assert hydrated > 0
    first.stop()
    moved = nbdkit("file", f"dir={tmp_path}", name="moved")
    assert moved.sock != first.sock
    async with open_source(moved.url("src.img")) as source:
        engine = open_clone(source, dst, meta, settings=Settings(hydration=False))
        async with running(engine):
            assert engine.status().hydrated_regions == hydrated
    (tmp_path / "other.img").write_bytes(b"x" * SIZE)
    tcp = nbdkit("file", image, tcp=True)
    for url in (moved.url("other.img"), tcp.url()):
        async with open_source(url) as source:
            with pytest.raises(MetadataError, match="belongs to another clone"):
                open_clone(source, dst, meta, settings=Settings(hydration=False))



def partitioned_disk(path, table: str, version: int) -> None:
    """A 8 MiB disk image with one partition at 1 MiB (MBR or GPT, the same table in every
    version), whose filesystem superblock (at 1 KiB into it) tells `version` apart, as a
    disk's filesystems written between two versions of it do. Nothing else differs: not the
    first or last 64 KiB."""
    disk = bytearray(8 * MiB)
    start, sectors = 2048, (8 * MiB - 2 * MiB) // 512
    if table == "mbr":
        disk[446:462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + start.to_bytes(4, "little") \
            + sectors.to_bytes(4, "little")
    else:
        disk[446:462] = bytes([0, 0, 0, 0, 0xEE, 0, 0, 0]) + (1).to_bytes(4, "little") \
            + (len(disk) // 512 - 1).to_bytes(4, "little")
        header = bytearray(92)
        header[0:8] = b"EFI PART"
        header[72:80] = (2).to_bytes(8, "little")  # the entries' first LBA
        header[80:84] = (128).to_bytes(4, "little")  # entries
        header[84:88] = (128).to_bytes(4, "little")  # bytes each
        disk[512:604] = header
        entry = bytes(range(1, 17)) + bytes(16) + start.to_bytes(8, "little") \
            + (start + sectors - 1).to_bytes(8, "little")
        disk[1024:1024 + len(entry)] = entry
    disk[510:512] = b"\x55\xaa"
    disk[start * 512 + 1024:start * 512 + 1024 + 64] = random.Random(version).randbytes(64)
    with open(path, "wb") as f:
        f.write(disk)


@pytest.mark.parametrize("table", ["mbr", "gpt"])
async def test_another_version_of_a_partitioned_disk_is_refused(nbdkit, tmp_path, table):
    """A partitioned disk (a VM's image) has nothing but its partition table in its first and
    last 64 KiB. Its data sample also covers the start of each partition, where filesystems
    keep their superblocks: a server restarted on another version of the disk, its
    filesystem written, is refused on resume instead of mixing the two versions."""
    disk = tmp_path / "disk.img"
    partitioned_disk(disk, table, version=1)
    server = nbdkit("file", disk)
    dst, meta = str(tmp_path / "dst.img"), str(tmp_path / "meta")
    async with open_source(server.url()) as source:
        engine = open_clone(source, dst, meta, settings=Settings(hydration=False))
        async with running(engine):
            pass
    server.stop()
    partitioned_disk(disk, table, version=2)
    server.start()
    async with open_source(server.url()) as source:
        with pytest.raises(MetadataError, match="its data differs from what the clone was made"):
            open_clone(source, dst, meta, settings=Settings(hydration=False))
    server.stop()
    partitioned_disk(disk, table, version=1)
    server.start()
    async with open_source(server.url()) as source:  # the version it was made from resumes
        engine = open_clone(source, dst, meta, settings=Settings(hydration=False))
        async with running(engine):
            pass
    from fuseclone.metadata import Metadata
    from fuseclone.sources.base import PARTITIONS_KEY

    with Metadata.open(meta, writable=True) as recorded:  # as a release before it wrote it
        identity = recorded.header.identity
        partitions = identity["source"].pop(PARTITIONS_KEY)
        recorded.mark_open(identity)
        recorded.mark_clean()
    async with open_source(server.url()) as source:  # resumes, and records it again
        engine = open_clone(source, dst, meta, settings=Settings(hydration=False))
        async with running(engine):
            pass
    assert Metadata.read_header(meta).identity["source"][PARTITIONS_KEY] == partitions

def test_same_nbd_export_rules():
    unix = {"kind": "nbd", "url": "nbd+unix:///e?socket=/a", "export": "e", "size": 5, "socket": "/a"}
    assert same_nbd_export(unix, {**unix, "url": "nbd+unix:///e?socket=/b", "socket": "/b"})
    assert not same_nbd_export(unix, {**unix, "socket": "/b", "size": 6})
    assert not same_nbd_export(unix, {**unix, "socket": "/b", "export": "f"})
    tcp = {"kind": "nbd", "url": "nbd://h:1/e", "export": "e", "size": 5, "host": "h", "port": 1}
    assert same_nbd_export(tcp, dict(tcp))
    assert not same_nbd_export(tcp, {**tcp, "url": "nbd://h:2/e", "port": 2})
    assert not same_nbd_export(unix, {k: v for k, v in tcp.items()})


async def test_without_multi_conn_one_connection(nbdkit, image):
    server = nbdkit("--filter=multi-conn", "file", image, "multi-conn-mode=disable")
    async with open_nbd_source(server.url()) as source:
        assert not source.info.can_multi_conn
        assert source.connections == 1
        reads = [(random.Random(i).randrange(SIZE), 70000) for i in range(20)]
        results = {}
        async with trio.open_nursery() as nursery:
            for offset, n in reads:
                async def one(offset=offset, n=n):
                    results[offset] = await source.read(offset, n)
                nursery.start_soon(one)
        data = contents(image)
        assert all(results[o] == data[o:o + n] for o, n in reads)


async def test_export_not_found(nbdkit, image):
    server = nbdkit("--filter=exportname", "file", image, "exportname=good", "exportname-strict=true")
    url = server.url("bad")
    with pytest.raises(SourceError) as info:
        async with open_nbd_source(url):
            pass
    text = str(info.value)
    assert url in text and "export 'bad' not found" in text and "\n" not in text
    async with open_nbd_source(server.url("good")) as source:
        assert source.size == SIZE


async def test_connection_refused_and_missing_socket(tmp_path):
    from tests.sources.conftest import free_port

    port = free_port()
    url = f"nbd://127.0.0.1:{port}/"
    with pytest.raises(SourceError) as info:
        async with open_nbd_source(url):
            pass
    assert str(info.value).endswith(f"{url}: cannot connect to 127.0.0.1:{port}: Connection refused")
    url = f"nbd+unix:///?socket={tmp_path}/nothing.sock"
    with pytest.raises(SourceError) as info:
        async with open_source(url):
            pass
    assert url in str(info.value) and "No such file" in str(info.value)


async def test_not_an_nbd_server(tmp_path):
    """A server that answers with something else, and one that says nothing at all."""
    path = str(tmp_path / "web.sock")
    quiet = str(tmp_path / "quiet.sock")

    async def chatty(stream):
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await stream.aclose()

    async def silent(stream):
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        for where, handler in ((path, chatty), (quiet, silent)):
            sock = trio.socket.socket(trio.socket.AF_UNIX)
            await sock.bind(where)
            sock.listen()
            nursery.start_soon(trio.serve_listeners, handler, [trio.SocketListener(sock)])
        with pytest.raises(SourceError) as info:
            async with open_nbd_source(f"nbd+unix:///?socket={path}"):
                pass
        assert "not an NBD server" in str(info.value) and path in str(info.value)
        with trio.fail_after(5):
            with pytest.raises(SourceError) as info:
                async with open_nbd_source(f"nbd+unix:///?socket={quiet}", connect_timeout=0.3):
                    pass
        assert "no answer to the NBD handshake within 0.3 s" in str(info.value)
        nursery.cancel_scope.cancel()


# ---- reads -----------------------------------------------------------------------------------


async def test_reads_equal_the_file(nbdkit, image):
    data = contents(image)
    server = nbdkit("file", image)
    async with open_nbd_source(server.url(), request_size=256 * KiB) as source:
        whole = await source.read(0, SIZE)
        assert whole == data and isinstance(whole, (bytes, bytearray))
        for offset, n in [(0, 1), (1, 4095), (12345, 777), (65535, 2), (SIZE - 123, 123),
                          (SIZE - 1000, 5000), (SIZE - 1, 1), (1 * MiB - 7, 3 * MiB)]:
            assert await source.read(offset, n) == data[offset:offset + n], (offset, n)
        assert await source.read(SIZE, 10) == b""
        assert await source.read(SIZE + 5, 10) == b""
        with pytest.raises(SourceReadError):
            await source.read(-1, 10)
        with pytest.raises(SourceReadError):
            await source.extents(-1, 10)


async def test_min_block_size_unaligned_reads(nbdkit, image, tmp_path):
    """Requests to a server with a 4 KiB minimum block size are aligned (nbdkit refuses others
    with EINVAL); unaligned reads still return exactly the bytes asked for."""
    aligned = tmp_path / "aligned.img"
    data = contents(image)[:SIZE - SIZE % 4096]
    aligned.write_bytes(data)
    size = len(data)
    server = nbdkit("--filter=blocksize-policy", "file", aligned, "blocksize-minimum=4096",
                    "blocksize-preferred=65536", "blocksize-maximum=65536", "blocksize-error-policy=error")
    async with open_nbd_source(server.url()) as source:
        assert (source.info.min_block_size, source.info.max_block_size) == (4096, 65536)
        for offset, n in [(1, 10), (4095, 2), (5000, 300000), (size - 100, 100), (size - 5, 50), (0, size)]:
            assert await source.read(offset, n) == data[offset:offset + n], (offset, n)


async def test_many_concurrent_reads(nbdkit, image):
    data = contents(image)
    server = nbdkit("--filter=delay", "file", image, "rdelay=5ms")
    rng = random.Random(7)
    ranges = [(rng.randrange(SIZE), rng.choice([1, 512, 4096, 100000, 1 * MiB])) for _ in range(300)]
    results = [None] * len(ranges)
    async with open_nbd_source(server.url(), request_size=128 * KiB) as source:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i, (offset, n) in enumerate(ranges):
                    async def one(i=i, offset=offset, n=n):
                        results[i] = await source.read(offset, n)
                    nursery.start_soon(one)
        assert source.connections == 4
    for (offset, n), got in zip(ranges, results):
        assert got == data[offset:offset + n]


async def test_latency_does_not_serialise(nbdkit, image):
    """64 reads against 50 ms per request take far less than 64 × 50 ms."""
    server = nbdkit("--filter=delay", "file", image, "rdelay=50ms")
    async with open_nbd_source(server.url()) as source:
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(source.read, i * 65536, 65536)
        assert trio.current_time() - start < 1.0  # serial: 3.2 s


# ---- extents ---------------------------------------------------------------------------------


async def test_extents_report_holes_as_zero(nbdkit, image):
    data = contents(image)
    holes = zero_ranges_of(image)
    assert holes, "the test file should have holes"
    server = nbdkit("file", image)
    for window in (64 * MiB, 192 * KiB):  # one window, and many windows with prefetch
        async with open_nbd_source(server.url(), extent_window=window) as source:
            extents = await source.extents(0, SIZE)
            # they tile the range
            assert extents[0].offset == 0 and sum(e.length for e in extents) == SIZE
            assert all(a.offset + a.length == b.offset for a, b in zip(extents, extents[1:]))
            assert all(a.zero != b.zero for a, b in zip(extents, extents[1:]))  # merged
            zero = [(e.offset, e.offset + e.length) for e in extents if e.zero]
            assert zero == holes  # exactly the file's holes (written zeros are data)
            for lo, hi in zero:
                assert data[lo:hi] == bytes(hi - lo)
            # a sub-range is clipped
            sub = await source.extents(holes[0][0] - 100, 300)
            assert sub[0].offset == holes[0][0] - 100 and sum(e.length for e in sub) == 300
            assert [e.zero for e in sub] == [False, True]
            assert await source.extents(SIZE, 100) == []


async def test_only_state_zero_means_zeros(nbdkit, image, tmp_path):
    """base:allocation's HOLE and ZERO bits are independent: a hole without ZERO has undefined
    contents and must be copied; ZERO (with or without HOLE) reads as zeros."""
    listing = tmp_path / "extents"
    listing.write_text("0 64K\n64K 64K hole\n128K 64K zero\n192K 64K hole,zero\n256K 3M\n")
    server = nbdkit("--filter=extentlist", "file", image, f"extentlist={listing}")
    async with open_nbd_source(server.url()) as source:
        extents = await source.extents(0, 320 * KiB)
    assert [(e.offset // KiB, e.length // KiB, e.zero) for e in extents] == [
        (0, 128, False), (128, 128, True), (256, 64, False)]


async def test_returned_buffers_belong_to_the_caller(nbdkit, image):
    """What a read returned stays intact while later reads run."""
    data = contents(image)
    server = nbdkit("file", image)
    async with open_nbd_source(server.url()) as source:
        held = [await source.read(i * 256 * KiB, 256 * KiB) for i in range(12)]
        view = memoryview(await source.read(3 * MiB, 256 * KiB))  # held only through a view
        more = [await source.read(i * 256 * KiB, 256 * KiB) for i in range(12, 16)]
        for i, got in enumerate(held + more):
            assert got == data[i * 256 * KiB:(i + 1) * 256 * KiB], i
        assert view == data[3 * MiB:3 * MiB + 256 * KiB]


async def test_recycled_buffers_are_reused_only_when_handed_back(nbdkit, image):
    data = contents(image)
    server = nbdkit("file", image)
    async with open_nbd_source(server.url(), recycled_bytes=256 * KiB) as source:
        first = await source.read(0, 128 * KiB)
        source.recycle(first)
        again = await source.read(128 * KiB, 128 * KiB)
        assert again is first and again == data[128 * KiB:256 * KiB]  # refilled, not stale
        held = await source.read(0, 128 * KiB)
        assert held is not again  # `again` was not handed back
        for buf in (again, held, bytearray(128 * KiB)):
            source.recycle(buf)  # the third is over recycled_bytes: dropped
        reads = [await source.read(i * 128 * KiB, 128 * KiB) for i in range(3)]
        assert sum(any(r is b for b in (again, held)) for r in reads) == 2
        assert [bytes(r) for r in reads] == [data[i * 128 * KiB:(i + 1) * 128 * KiB] for i in range(3)]


async def test_extents_match_the_local_source(nbdkit, image):
    server = nbdkit("file", image)
    local = await LocalSource.open(image)
    try:
        async with open_nbd_source(server.url()) as source:
            for offset, n in [(0, SIZE), (100000, 1 * MiB), (SIZE - 70000, 70000)]:
                assert await source.extents(offset, n) == await local.extents(offset, n)
    finally:
        await local.aclose()


async def test_extents_without_block_status(nbdkit, image):
    server = nbdkit("--filter=noextents", "file", image)
    async with open_nbd_source(server.url()) as source:
        extents = await source.extents(0, SIZE)
        assert [(e.offset, e.length) for e in extents if not e.zero] != []
        assert sum(e.length for e in extents) == SIZE
    async with open_nbd_source(server.url(), block_status=False) as source:
        assert source.info.base_allocation is None
        assert [(e.offset, e.length, e.zero) for e in await source.extents(0, SIZE)] == [(0, SIZE, False)]


async def test_extents_when_the_server_fails_block_status(nbdkit, image):
    server = nbdkit("--filter=error", "file", image, "error-extents-rate=1")
    async with open_nbd_source(server.url()) as source:
        extents = await source.extents(0, SIZE)  # the server cannot say: all data, which is safe
        assert [(e.offset, e.length, e.zero) for e in extents] == [(0, SIZE, False)]
        assert await source.read(0, 100) == contents(image)[:100]


# ---- faults ----------------------------------------------------------------------------------


async def test_server_errors_are_source_read_errors(nbdkit, image):
    server = nbdkit("--filter=error", "file", image, "error-pread-rate=1")
    async with open_nbd_source(server.url()) as source:
        for _ in range(3):  # the connection survives errors
            with pytest.raises(SourceReadError) as info:
                await source.read(4096, 8192)
            assert info.value.errno == errno.EIO
            assert server.url() in str(info.value) and "EIO" in str(info.value)
        assert source.connections == 4


async def test_error_file_trigger_then_recovery(nbdkit, image, tmp_path):
    trigger = tmp_path / "inject"
    trigger.touch()
    server = nbdkit("--filter=error", "file", image, "error-pread-rate=1", f"error-pread-file={trigger}",
                    "error-pread=ENOSPC")
    async with open_nbd_source(server.url()) as source:
        with pytest.raises(SourceReadError) as info:
            await source.read(0, 1000)
        assert info.value.errno == errno.ENOSPC
        trigger.unlink()
        assert await source.read(0, 1000) == contents(image)[:1000]


async def test_eshutdown_disconnects_and_reconnects(nbdkit, image, tmp_path):
    """A server that answers ESHUTDOWN is shutting down: the client finishes what is in flight
    on that connection, disconnects it, and later reads use fresh connections."""
    trigger = tmp_path / "inject"
    trigger.touch()
    server = nbdkit("--filter=error", "file", image, "error-pread-rate=1", f"error-pread-file={trigger}",
                    "error-pread=ESHUTDOWN")
    async with open_nbd_source(server.url(), connections=1) as source:
        with pytest.raises(SourceReadError) as info:
            await source.read(0, 1000)
        assert info.value.errno == errno.ESHUTDOWN
        assert source.connections == 0  # disconnected at once: nothing else was in flight
        trigger.unlink()
        assert await source.read(0, 1000) == contents(image)[:1000]
        assert source.reconnects == 1 and source.connections == 1


async def test_timeout_is_a_source_read_error(nbdkit, image):
    server = nbdkit("--filter=delay", "file", image, "rdelay=3")
    async with open_nbd_source(server.url(), timeout=0.3) as source:
        start = trio.current_time()
        with pytest.raises(SourceReadError) as info:
            await source.read(0, 4096)
        assert info.value.errno == errno.ETIMEDOUT
        assert "timed out (the server sent nothing for 0.3 s)" in str(info.value)
        assert trio.current_time() - start < 2


async def test_a_slow_server_is_waited_for(nbdkit, image):
    """The timeout is for a server that stops answering, not for a slow one: a read that takes
    several timeouts on a slow link, its pieces answered one after another, completes (it
    timed out, and a slow source never hydrated: every 8 MiB copy of a 1 Mbit/s link failed)."""
    server = nbdkit("--filter=rate", "file", image, "rate=8M", "burstiness=0.5")  # 1 MB/s
    async with open_nbd_source(server.url(), timeout=1.0, request_size=64 * KiB) as source:
        start = trio.current_time()
        assert await source.read(0, SIZE) == contents(image)  # about 3.5 s
        assert trio.current_time() - start > 1.5  # the link was slow indeed


async def test_server_killed_and_restarted(nbdkit, image):
    data = contents(image)
    server = nbdkit("file", image)
    async with open_nbd_source(server.url(), reconnect_initial=0.02, reconnect_max=0.2) as source:
        assert await source.read(0, 4096) == data[:4096]
        server.stop()
        await trio.sleep(0.05)  # the readers see the connections close
        assert source.connections == 0
        with trio.fail_after(5):  # fails, never hangs
            for _ in range(3):
                with pytest.raises(SourceReadError) as info:
                    await source.read(0, 4096)
                assert "reconnect" in str(info.value) or "unreachable" in str(info.value)
        server.start()
        got = await read_once_it_answers(source, 1000, 70000, timeout=5)
        assert got == data[1000:71000]
        assert source.reconnects >= 1
        with trio.fail_after(5):
            while source.connections < 4:  # the rest of the pool comes back in the background
                await source.read(0, 1)
                await trio.sleep(0.01)
        assert await source.extents(0, SIZE) == await source.extents(0, SIZE)


async def test_server_killed_during_reads(nbdkit, image):
    server = nbdkit("--filter=delay", "file", image, "rdelay=200ms")
    async with open_nbd_source(server.url()) as source:
        failures = []

        async def reader(i):
            try:
                await source.read(i * 4096, 4096)
            except SourceReadError as exc:
                failures.append(exc)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(reader, i)
                await trio.sleep(0.05)
                server.stop()
        assert len(failures) == 20
        assert all("connection lost" in str(f) and server.url() in str(f) for f in failures)


# ---- cancellation and shutdown ---------------------------------------------------------------


async def test_cancelled_reads_leave_the_connection_usable(nbdkit, image):
    data = contents(image)
    server = nbdkit("--filter=delay", "file", image, "rdelay=300ms")
    async with open_nbd_source(server.url(), connections=1) as source:
        with trio.move_on_after(0.05) as scope:
            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(source.read, i * 1000, 50000)
        assert scope.cancelled_caught
        # the late replies arrive for requests nobody waits for; the stream stays in step
        assert await source.read(5, 100000) == data[5:100005]
        assert source.connections == 1


async def test_close_with_reads_in_flight(nbdkit, image):
    server = nbdkit("--filter=delay", "file", image, "rdelay=5")
    outcome = []
    with trio.fail_after(3):
        async with trio.open_nursery() as nursery:
            async with open_nbd_source(server.url()) as source:
                async def reader():
                    try:
                        await source.read(0, 4096)
                    except SourceReadError as exc:
                        outcome.append(exc)
                nursery.start_soon(reader)
                await trio.sleep(0.1)
    assert len(outcome) == 1 and "source closed" in str(outcome[0])
    with pytest.raises(SourceReadError):
        await source.read(0, 10)  # closed stays closed


async def test_body_exceptions_propagate_unwrapped(nbdkit, image):
    server = nbdkit("file", image)
    with pytest.raises(KeyError):
        async with open_nbd_source(server.url()):
            raise KeyError("boom")
    with trio.move_on_after(0.1) as scope:
        async with open_nbd_source(server.url()):
            await trio.sleep_forever()
    assert scope.cancelled_caught


async def test_a_source_cancelled_with_its_mount_warns_of_no_lost_connection(nbdkit, image, caplog):
    """A stopping mount cancels the scope around its source: its connections end, but none was
    lost, and the log (read by users looking for trouble) must not say so."""
    server = nbdkit("file", image)
    with trio.move_on_after(0.2) as scope:
        async with open_nbd_source(server.url()) as source:
            await source.read(0, 4096)
            assert source.connections > 1
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert not [r for r in caplog.records if "lost" in r.getMessage()], caplog.text


async def test_only_reads_block_status_and_disconnect_reach_the_server(nbdkit, image, tmp_path):
    log = tmp_path / "requests.log"
    server = nbdkit("--filter=log", "file", image, f"logfile={log}")
    async with open_nbd_source(server.url()) as source:
        await source.read(0, SIZE)
        await source.extents(0, SIZE)
    with trio.fail_after(5):
        while log.read_text().count("Disconnect") < 4:
            await trio.sleep(0.02)
    text = log.read_text()
    assert " Read " in text and " Extents " in text
    for verb in ("Write", "Trim", "Zero", "Flush", "Cache"):
        assert f" {verb} " not in text


# ---- TCP -------------------------------------------------------------------------------------


async def test_tcp_url(nbdkit, image):
    server = nbdkit("file", image, tcp=True)
    url = server.url()
    assert url.startswith("nbd://127.0.0.1:")
    async with open_source(url) as source:
        assert source.own_identity() == {"kind": "nbd", "url": url, "export": "", "size": SIZE,
                                         "host": "127.0.0.1", "port": server.port}
        assert await source.read(3, 300000) == contents(image)[3:300003]
        assert any(e.zero for e in await source.extents(0, SIZE))


# ---- the engine on an NBD source -------------------------------------------------------------


@contextlib.asynccontextmanager
async def hydrated(url, dst, meta):
    """A clone of `url` into `dst` and `meta`, running until the block ends, once complete."""
    async with open_source(url) as source:
        engine = open_clone(source, dst, meta, settings=Settings())
        async with running(engine):
            with trio.fail_after(30):
                await engine.complete.wait()
            yield engine


async def test_engine_hydrates_from_nbd(nbdkit, image, tmp_path):
    server = nbdkit("--filter=delay", "file", image, "rdelay=1ms")
    dst, meta = str(tmp_path / "dst.img"), str(tmp_path / "meta")
    async with hydrated(server.url(), dst, meta) as engine:
        assert engine.status().complete
        reads = engine.source_reads
        # Copies arrive in page-aligned buffers and go to DST with direct I/O.
        assert engine.dst.direct_bytes > 0
        # NBD keeps 128 MiB of copies in flight by default (16 MiB for a file).
        assert engine.status().hydration_threshold == (128 << 20) // engine.geometry.region_size
    assert contents(dst) == contents(image)
    holes = zero_ranges_of(image)
    for lo, hi in allocated_ranges(dst):  # nothing was written where the source has holes
        assert all(hi <= h_lo or lo >= h_hi for h_lo, h_hi in holes), (lo, hi)
    assert reads <= SIZE - sum(hi - lo for lo, hi in holes)  # holes were not even read


async def test_engine_stops_after_max_failures_then_resumes_once_the_server_is_well(
        nbdkit, image, tmp_path):
    trigger = tmp_path / "fail"
    server = nbdkit("--filter=error", "file", image, "error-pread-rate=1",
                    f"error-pread-file={trigger}")
    dst, meta = str(tmp_path / "dst.img"), str(tmp_path / "meta")
    async with open_source(server.url()) as source:  # which reads the data sample
        trigger.touch()  # the error filter fails every read while this file exists
        engine = open_clone(source, dst, meta, settings=Settings(max_failures=3, backoff_initial=0.01,
                                                                  copy_on_read=False, retry_stopped=0.3))
        async with running(engine):
            with pytest.raises(OSError) as info:
                await engine.read(0, 4096)  # a user read of an unhydrated region: EIO
            assert info.value.errno == errno.EIO
            with trio.fail_after(10):
                while engine.hydration_error is None:
                    await trio.sleep(0.01)
            status = engine.status()
            assert "stopped after 3 failures" in status.hydration_error
            assert "EIO" in status.hydration_error
            assert not status.complete and status.hydrated_regions == 0
            trigger.unlink()  # the server is well again; nobody sends enable_hydration
            with trio.fail_after(20):
                await engine.complete.wait()
            assert engine.status().hydration_error is None
        assert open(dst, "rb").read() == contents(image)


async def test_check_verify_names_a_source_that_fails_reads_in_one_line(nbdkit, image, tmp_path):
    """`fuseclone check --verify` against a server that fails reads: one line naming the
    source and the range, exit 1, no traceback."""
    server = nbdkit("file", image)
    dst, meta = str(tmp_path / "dst.img"), str(tmp_path / "meta")
    async with hydrated(server.url(), dst, meta):
        pass
    server.stop()
    failing = nbdkit("--filter=error", "file", image, "error-pread-rate=1", name="failing")
    result = await trio.run_process(
        [sys.executable, "-m", "fuseclone", "check", meta, "--src", failing.url(), "--dst", dst,
         "--verify"], capture_stdout=True, capture_stderr=True, check=False)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert stderr.count("\n") == 1 and "fuseclone: error:" in stderr, stderr
    assert failing.url() in stderr and "EIO" in stderr and "bytes at 0" in stderr


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ADDRESS (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage"),
                    reason="kernel without transparent huge pages")
def test_large_receive_buffers_ask_for_huge_pages():
    """Direct writes from huge pages reach the disk in requests of max_sectors_kb, not of
    the segment limit times 4 KiB ("hg": madvise(MADV_HUGEPAGE) was applied)."""
    import ctypes

    buffers = BufferPool(32 << 20)
    for length, huge in ((8 << 20, True), (1 << 20, False)):
        buf = buffers.take(length, aligned=True)
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        assert ("hg" in _vm_flags(address)) == huge, length


async def test_hydration_over_a_slow_link_keeps_little_in_flight(nbdkit, tmp_path):
    """Behind nbdkit's rate filter (25 MB/s), hydration keeps about pacing.QUEUE_TIME of copies
    in flight, not its 128 MiB cap, so a user read waits behind little; it still finishes at
    about the link's rate."""
    image = tmp_path / "random.img"
    image.write_bytes(random.Random(5).randbytes(48 << 20))
    server = nbdkit("--filter=rate", "file", str(image), "rate=200M", "burstiness=0.2")
    dst, meta = str(tmp_path / "dst.img"), str(tmp_path / "meta")
    async with open_source(server.url()) as source:
        engine = open_clone(source, dst, meta, settings=Settings(copy_on_read=False))
        region = engine.geometry.region_size
        in_flight, user_waits = [], []
        async with running(engine):
            started = trio.current_time()
            with trio.fail_after(20):
                while not engine.complete.is_set():
                    await trio.sleep(0.2)
                    if trio.current_time() - started > 1.0:  # past the ramp and the filter's burst
                        in_flight.append(engine.status().hydrating_regions * region)
                        asked = trio.current_time()
                        await engine.read((47 << 20) + len(user_waits) * 4096, 4096)
                        user_waits.append(trio.current_time() - asked)
            took = trio.current_time() - started
    assert in_flight and max(in_flight) <= 16 << 20, in_flight
    assert max(user_waits) < 0.5, user_waits
    assert took < 6, took  # 48 MiB at 25 MB/s is 2 s
    assert contents(dst) == contents(str(image))


def test_recycled_buffers_make_room_for_the_latest_size():
    """A pool full of odd sizes (a sparse source's extents, a ramping batch) gives way to the
    size copies use now; before, every later copy got a new, unfaulted buffer."""
    pool = 32 << 20
    buffers = BufferPool(pool)
    for i in range(pool // (3 << 20)):
        buffers.recycle(buffers.take((3 << 20) + 4096 * i, aligned=True))
    usual = buffers.take(8 << 20, aligned=True)
    buffers.recycle(usual)
    assert buffers.take(8 << 20, aligned=True) is usual
    assert buffers.kept_bytes <= pool


def test_smaller_buffers_go_when_a_larger_one_comes_back():
    """After a ramp of copy sizes, the old size's buffers leave the pool as soon as the new
    size comes back: they would otherwise sit in the daemon's memory."""
    buffers = BufferPool(32 << 20)
    for buf in [buffers.take(2 << 20, aligned=True) for _ in range(16)]:
        buffers.recycle(buf)
    assert buffers.kept_bytes == 32 << 20
    buffers.recycle(buffers.take(4 << 20, aligned=True))
    assert buffers.kept_bytes == 4 << 20
    buffers.recycle(buffers.take(1 << 20, aligned=True))  # a smaller one stays beside it
    assert buffers.kept_bytes == 5 << 20


def test_buffers_of_new_lengths_replace_kept_ones():
    """A sparse source's copies are of odd lengths (its extents): a buffer of a new length
    replaces kept ones instead of coming on top of them, so the pool and the copies out hold no
    more than the copies once had out at once. Hydrating nbdkit's sparse-random 1T, the pool's
    kept 8 MiB buffers plus the 24 MiB in flight took the daemon past 100 MiB."""
    buffers = BufferPool(32 << 20)
    for buf in [buffers.take(8 << 20, aligned=True) for _ in range(3)]:  # 24 MiB in flight
        buffers.recycle(buf)
    odd = [buffers.take((7 << 20) + 4096 * i, aligned=True) for i in range(3)]
    assert buffers.kept_bytes + sum(map(len, odd)) <= 24 << 20
    assert buffers.out_bytes == sum(map(len, odd))
    del odd  # reads that failed: their buffers never come back
    assert buffers.out_bytes == 0


async def test_close_lets_the_replies_asked_for_arrive_first(nbdkit, image):
    """Closing under replies still being sent made nbdkit fail its writes ("Broken pipe"; once
    it aborted). The close waits for them, briefly, then disconnects."""
    server = nbdkit("--filter=delay", "file", image, "rdelay=300ms")
    async with open_source(server.url()) as source:
        with trio.move_on_after(0.05):  # a copy cancelled with its requests on the wire
            await source.read_for_copy(0, 8 << 20)
        started = trio.current_time()
    assert trio.current_time() - started < 1.5
    await trio.sleep(0.1)
    assert server.proc.poll() is None, server.stderr()
    # (The fixture's readiness probe leaves a "sending newstyle handshake" error of its own.)
    assert "NBD_CMD_READ" not in server.stderr() and "reply" not in server.stderr(), server.stderr()


async def test_close_ends_its_wait_when_the_last_reply_arrives(nbdkit, image, mock_clock):
    """The close's wait for replies in flight ends when the last one arrives, not at a tick of
    a clock: with trio's clock standing still, a poll (a sleep between looks) would never see
    it. Only a watchdog moves the clock, past the wait's bound, if the close is stuck."""
    server = nbdkit("--filter=delay", "file", image, "rdelay=200ms")
    read = []

    async def watchdog():
        await trio.to_thread.run_sync(time.sleep, 5, abandon_on_cancel=True)
        mock_clock.jump(DRAIN_TIMEOUT + 1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog)
        async with open_source(server.url()) as source:
            started = trio.current_time()

            async def reader():
                read.append(await source.read(0, 4096))

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()  # the request is on the wire
        assert trio.current_time() == started, "the close waited for the clock, not the reply"
        assert read == [contents(image)[:4096]]
        nursery.cancel_scope.cancel()


async def test_server_restarted_with_another_size_fails_reads(nbdkit, image):
    """Same URL, another export size after a restart (the image was truncated or swapped):
    every read fails, never one of the wrong image."""
    server = nbdkit("file", image)
    async with open_nbd_source(server.url(), reconnect_initial=0.02, reconnect_max=0.2) as source:
        assert await source.read(0, 4096) == contents(image)[:4096]
        server.stop()
        os.truncate(image, SIZE // 2)
        server.start()
        with trio.fail_after(10):
            for _ in range(3):
                with pytest.raises(SourceReadError) as info:
                    await source.read(0, 4096)
                if "size changed" in str(info.value):
                    break
                await trio.sleep(0.1)
        assert f"size changed from {SIZE} to {SIZE // 2} bytes" in str(info.value)


async def test_a_server_restarted_on_other_data_of_the_same_size_fails_reads_for_good(
        nbdkit, image, tmp_path):
    """The connections dropped and were dialled again: the server may have come back on
    another image of the same size (`nbdkit -U sock file OTHER.img`). Its data sample is read
    again before anything it sends is handed out; other data fails every read from then on."""
    other = make_source_file(tmp_path / "other.img", SIZE, seed=4)
    server = nbdkit("file", image)
    async with open_source(server.url()) as source:
        assert await source.read(0, 4096) == contents(image)[:4096]
        server.stop()
        server.args = ["file", str(other)]  # at the same socket
        server.start()
        with trio.fail_after(10):
            while True:
                with pytest.raises(SourceReadError) as info:  # never the other image's data
                    await source.read(SIZE // 2, 4096)
                if "other data" in str(info.value):
                    break
                await trio.sleep(0.05)  # unreachable meanwhile
        server.stop()
        server.args = ["file", image]  # back on the first image: too late to trust it
        server.start()
        for call in (lambda: source.read(0, 4096), lambda: source.read_for_copy(0, 1 << 20),
                     lambda: source.extents(0, SIZE)):
            with pytest.raises(SourceReadError) as info:
                await call()
            assert info.value.errno == errno.EIO
            assert "the source changed since the clone began" in str(info.value)


async def test_a_server_restarted_on_the_same_data_serves_again(nbdkit, image):
    server = nbdkit("file", image)
    async with open_source(server.url()) as source:
        dialled = source.pool.dialled
        server.restart()
        got = await read_once_it_answers(source, 1000, 70000)
        assert got == contents(image)[1000:71000]
        assert source.pool.dialled > dialled and source.reconnects >= 1


async def test_server_restarted_with_other_block_sizes_is_read_by_its_new_sizes(nbdkit, image, tmp_path):
    """Same URL and export size, but a restart brought other block-size constraints (a 4 KiB
    minimum, a 64 KiB maximum): once reconnected, reads follow the new server's sizes instead
    of failing with EIO until the next mount."""
    aligned = tmp_path / "aligned.img"
    data = contents(image)[:SIZE - SIZE % 4096]
    aligned.write_bytes(data)
    server = nbdkit("file", aligned)
    async with open_nbd_source(server.url(), reconnect_initial=0.02, reconnect_max=0.2) as source:
        assert await source.read(0, 300000) == data[:300000]  # pieces larger than 64 KiB
        server.stop()
        server.args[:0] = ["--filter=blocksize-policy"]
        server.args += ["blocksize-minimum=4096", "blocksize-preferred=65536",
                        "blocksize-maximum=65536", "blocksize-error-policy=error"]
        server.start()
        errors = []
        with trio.move_on_after(10):
            while True:
                try:
                    await source.read(0, 1)
                    break
                except SourceReadError as exc:
                    errors.append(str(exc))  # the restart, then (before the fix) EINVAL for ever
                    await trio.sleep(0.05)
        assert (source.info.min_block_size, source.info.max_block_size) == (4096, 65536), errors[-3:]
        for offset, n in [(1, 10), (5000, 300000), (0, len(data))]:
            assert await source.read(offset, n) == data[offset:offset + n], (offset, n)


def test_partition_starts_of_mbr_gpt_and_no_table():
    from fuseclone.sources.base import partition_starts

    head = bytearray(64 * KiB)
    assert partition_starts(head, 1 << 30) == []  # no table: no partitions' sample
    head[510:512] = b"\x55\xaa"
    for slot, (kind, first) in enumerate([(0x83, 2048), (0x05, 4096), (0x07, 0xF0000000),
                                          (0x8E, 8192)]):
        entry = 446 + 16 * slot
        head[entry + 4] = kind
        head[entry + 8:entry + 12] = first.to_bytes(4, "little")
        head[entry + 12:entry + 16] = (100).to_bytes(4, "little")
    # the extended partition is left out, and one beyond the image's end
    assert partition_starts(head, 1 << 30) == [2048 * 512, 8192 * 512]
    gpt = bytearray(64 * KiB)  # 4096-byte sectors: the header in LBA 1 at 4096
    gpt[510:512] = b"\x55\xaa"
    gpt[4096:4104] = b"EFI PART"
    gpt[4096 + 72:4096 + 80] = (2).to_bytes(8, "little")
    gpt[4096 + 80:4096 + 84] = (4).to_bytes(4, "little")
    gpt[4096 + 84:4096 + 88] = (128).to_bytes(4, "little")
    for index, first in ((0, 256), (2, 1024)):  # entry 1 unused
        at = 8192 + 128 * index
        gpt[at:at + 16] = b"\x01" * 16
        gpt[at + 32:at + 40] = first.to_bytes(8, "little")
    assert partition_starts(gpt, 1 << 30) == [256 * 4096, 1024 * 4096]
