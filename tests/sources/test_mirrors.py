"""MirroredSource against real servers of different kinds: an NBD primary (nbdkit) with an HTTP
mirror (nginx), and HTTP mirrors whose ETag does or does not match the primary's."""

import os

import pytest
import trio

from fuseclone.errors import SourceError
from fuseclone.sources.base import SAMPLE_KEY
from fuseclone.sources.mirrors import PROBE_INTERVAL, RecordedSource, open_mirrored_source
from tests.sources.conftest import free_port
from tests.sources_http.test_http import nginx, write_file  # noqa: F401  (a fixture)

MiB = 1 << 20


def states(source):
    return [server.state for server in source.servers()]


async def test_reads_fail_over_across_kinds_and_come_back(nbdkit, nginx):  # noqa: F811
    data = write_file(nginx.root / "image.raw", 2 * MiB, seed=3)
    primary = nbdkit("file", nginx.root / "image.raw")
    async with open_mirrored_source(primary.url(), [nginx.url("image.raw")]) as source:
        assert states(source) == ["serving", "standby"]
        assert await source.read(MiB, 4096) == data[MiB:MiB + 4096]
        primary.stop()
        assert await source.read(5, MiB) == data[5:MiB + 5]  # from the mirror
        assert states(source) == ["failing", "serving"]
        assert "nbd" in source.servers()[0].error
        primary.start()
        with trio.fail_after(PROBE_INTERVAL * 10):
            while states(source) != ["serving", "standby"]:
                await trio.sleep(0.1)
        assert await source.read(0, 100) == data[:100]


async def test_an_http_mirror_with_another_etag_is_refused(nginx):  # noqa: F811
    write_file(nginx.root / "a.raw", MiB, seed=4)
    write_file(nginx.root / "b.raw", MiB, seed=4)
    os.utime(nginx.root / "b.raw", (1, 1))  # nginx's ETag is mtime-size
    with pytest.raises(SourceError) as refused:
        async with open_mirrored_source(nginx.url("a.raw"), [nginx.url("b.raw")]):
            pass  # pragma: no cover
    text = str(refused.value)
    assert "\n" not in text and nginx.url("b.raw") in text and "ETag" in text


async def test_an_http_mirror_with_the_same_etag_serves(nginx):  # noqa: F811
    data = write_file(nginx.root / "a.raw", MiB, seed=5)
    write_file(nginx.root / "b.raw", MiB, seed=5)
    st = os.stat(nginx.root / "a.raw")
    os.utime(nginx.root / "b.raw", ns=(st.st_atime_ns, st.st_mtime_ns))
    async with open_mirrored_source(nginx.url("a.raw"), [nginx.url("b.raw")]) as source:
        assert states(source) == ["serving", "standby"]
        assert await source.read(0, MiB) == data


async def test_a_recorded_source_waits_for_a_server(nginx, tmp_path):  # noqa: F811
    """With META's record, opening succeeds while no server answers; reads fail until one
    does, and wait_usable returns once it has been checked."""
    data = write_file(nginx.root / "a.raw", MiB, seed=6)
    url = nginx.url("a.raw")
    async with open_mirrored_source(url) as source:
        recorded = RecordedSource(source.size, source.identity())
    nginx.stop()
    async with open_mirrored_source(url, recorded=recorded) as source:
        assert source.size == MiB and states(source) == ["unreachable"]
        with pytest.raises(OSError):
            await source.read(0, 10)
        nginx.start()
        with trio.fail_after(30):
            assert await source.wait_usable() is None
        assert await source.read(0, 10) == data[:10]


async def test_a_password_in_a_url_stays_out_of_status_and_errors():
    """A server that never answered has no description of its own yet: its URL is shown with
    the password masked, as an open HTTP source shows it."""
    url = f"http://user:hunter2@127.0.0.1:{free_port()}/image.raw"  # nobody listens
    recorded = RecordedSource(MiB, {"kind": "http", "url": url, "size": MiB})
    async with open_mirrored_source(url, [url.replace("image", "copy")], recorded=recorded) as source:
        texts = [source.description, *(str(server) for server in source.servers())]
        with pytest.raises(OSError) as failed:
            await source.read(0, 10)
        texts.append(str(failed.value))
    assert all("hunter2" not in text for text in texts), texts
    assert "user:***@127.0.0.1" in source.description


async def test_a_mirror_added_to_a_clone_recorded_without_a_sample_is_checked_by_its_data(
        nbdkit, tmp_path):
    """A clone of a source with a version mark (a file), made without mirrors, records no data
    sample. Mounted again with a mirror, the mirror is compared with the primary's sample
    (taken because there are mirrors), not by its size alone: another image of the same size
    is refused before it serves anything; one of the same image serves."""
    src, other = tmp_path / "golden.img", tmp_path / "other.img"
    data = write_file(src, 2 * MiB, seed=7)
    write_file(other, 2 * MiB, seed=8)
    async with open_mirrored_source(str(src)) as source:
        recorded = RecordedSource(source.size, source.identity())
    assert SAMPLE_KEY not in recorded.identity
    wrong = nbdkit("file", other)
    with pytest.raises(SourceError) as refused:
        async with open_mirrored_source(str(src), [wrong.url()], recorded=recorded):
            pass  # pragma: no cover
    text = str(refused.value)
    assert "\n" not in text and wrong.url() in text and "its data differs from the source's" in text
    same = nbdkit("file", src)
    async with open_mirrored_source(str(src), [same.url()], recorded=recorded) as source:
        assert states(source) == ["serving", "standby"]
        assert await source.read(0, MiB) == data[:MiB]
