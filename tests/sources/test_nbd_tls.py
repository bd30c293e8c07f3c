"""nbds:// and nbds+unix://: NBD_OPT_STARTTLS against a real `nbdkit --tls=require`, with
certificates made by openssl for the session (see conftest.TlsCertificates)."""

import os

import pytest

from fuseclone.errors import SourceError
from fuseclone.sources import open_source
from tests.engine.conftest import make_source_file
from tests.integration import conftest as integration
from tests.integration.conftest import fuseclone, sha256, status_json
from tests.sources.conftest import read_once_it_answers

rig = integration.rig  # the CLI tests' fixture, for mounts over nbds://

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    return str(make_source_file(tmp_path / "src.img", 4 * MiB + 12345, seed=7))


def contents(path):
    with open(path, "rb") as f:
        return f.read()


def tls_server(nbdkit, certificates, image, *, tcp=False, verify_peer=False, directory=None):
    flags = ["--tls=require", f"--tls-certificates={directory or certificates.server}"]
    if verify_peer:
        flags.append("--tls-verify-peer")
    return nbdkit(*flags, "file", image, tcp=tcp)


async def test_nbds_over_tcp_trusts_ssl_cert_file_and_checks_the_host(
        nbdkit, tls_certificates, image, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", tls_certificates.ca_file)
    server = tls_server(nbdkit, tls_certificates, image, tcp=True)
    expected = contents(image)
    for url in (server.url(tls=True), f"nbds://localhost:{server.port}/"):
        async with open_source(url) as source:
            assert source.size == len(expected)
            assert source.connections == 4  # the whole pool runs inside TLS
            assert await source.read(0, source.size) == expected
            assert await source.read(MiB - 7, 3 * MiB) == expected[MiB - 7:4 * MiB - 7]
            extents = await source.extents(0, source.size)
            assert sum(e.length for e in extents) == source.size


async def test_nbds_unix_with_a_client_certificate_from_tls_certificates(nbdkit, tls_certificates,
                                                                         image):
    server = tls_server(nbdkit, tls_certificates, image, verify_peer=True)
    url = server.url(tls=True) + f"&tls-certificates={tls_certificates.client}"
    async with open_source(url) as source:
        assert await source.read(0, source.size) == contents(image)
        assert source.identity()["url"].startswith("nbds+unix:///")
        assert "tls-certificates" not in str(source.identity())


async def test_a_dropped_tls_connection_is_redialled_with_tls(nbdkit, tls_certificates, image):
    server = tls_server(nbdkit, tls_certificates, image)
    url = server.url(tls=True) + f"&tls-certificates={tls_certificates.client}"
    expected = contents(image)
    async with open_source(url) as source:
        assert await source.read(0, 4096) == expected[:4096]
        server.restart()
        got = await read_once_it_answers(source, 5000, 70000)
        assert got == expected[5000:75000]
        assert source.reconnects >= 1


@pytest.mark.parametrize("case, words", [
    ("plain", "requires TLS (connect with nbds://"),
    ("untrusted", "TLS: the server's certificate is not trusted"),
    ("wrong_name", "TLS: the server's certificate is for another host: IP address mismatch"),
    ("no_client_certificate", "TLS: the server requires a client certificate"),
])
async def test_tls_failures_are_one_clear_line(nbdkit, tls_certificates, image, monkeypatch,
                                               case, words):
    monkeypatch.setenv("SSL_CERT_FILE", tls_certificates.ca_file)
    directory = tls_certificates.wrong_name if case == "wrong_name" else None
    if case == "untrusted":
        directory = tls_certificates.rogue
    server = tls_server(nbdkit, tls_certificates, image, tcp=True, directory=directory,
                        verify_peer=case == "no_client_certificate")
    url = server.url(tls=case != "plain")
    if case == "no_client_certificate":
        url += f"?tls-certificates={tls_certificates.ca_only}"
    with pytest.raises(SourceError) as info:
        async with open_source(url):
            pass
    message = str(info.value)
    assert words in message and "\n" not in message, message


async def test_missing_certificates_directory(tmp_path):
    with pytest.raises(SourceError, match="tls-certificates=.* is not a directory"):
        async with open_source(f"nbds://127.0.0.1:1/?tls-certificates={tmp_path}/none"):
            pass


# ---- through the CLI ---------------------------------------------------------------------------


def test_mount_over_nbds_hydrates_the_image(rig, nbdkit, tls_certificates):
    make_source_file(rig.src, 8 * MiB, seed=12)
    server = tls_server(nbdkit, tls_certificates, rig.src, verify_peer=True)
    url = server.url(tls=True) + f"&tls-certificates={tls_certificates.client}"
    rig.mount(src=url)
    fuseclone("wait", rig.mnt, "--timeout", "60")
    assert sha256(rig.image) == sha256(rig.src)
    status = status_json(rig.mnt)
    assert status["hydrated_regions"] == status["total_regions"]
    fuseclone("unmount", rig.mnt)
    assert sha256(rig.dst) == sha256(rig.src)


@pytest.mark.parametrize("case", ["plain", "untrusted"])
def test_mount_refused_for_tls_leaves_no_meta(rig, nbdkit, tls_certificates, case):
    make_source_file(rig.src, 1 * MiB, seed=13)
    directory = tls_certificates.rogue if case == "untrusted" else None
    server = tls_server(nbdkit, tls_certificates, rig.src, tcp=True, directory=directory)
    result = fuseclone("mount", server.url(tls=case != "plain"), rig.dst, rig.meta, rig.mnt,
                       check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ("TLS" in lines[0]), result.stderr
    assert not os.path.exists(rig.meta)
    assert rig.mnt not in open("/proc/mounts").read()
