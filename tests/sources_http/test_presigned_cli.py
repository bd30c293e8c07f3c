"""A pre-signed URL's query (its signature: a secret) is neither printed nor stored: not in
META, `status`, `list`, the log or an access trace, and a META that an older fuseclone wrote with
the signature in it loses it at its next mount. Identity matching still tells objects apart."""

from __future__ import annotations

import json
import os
import time

from fuseclone.metadata import Metadata
from fuseclone.regions import Geometry
from tests.integration.conftest import daemon_pid, fuseclone, rig, status_json  # noqa: F401

from .test_http import FILE_SIZE, image, nginx  # noqa: F401

SIGNATURE = "sig0f3a9c7e5b1d"  # distinctive: the test greps for it


def signed(nginx, signature=SIGNATURE):
    return nginx.url(f"image.raw?X-Amz-Expires=60&X-Amz-Signature={signature}")


def assert_signature_absent(rig, *files, signature=SIGNATURE):
    for path in (rig.meta, *files):
        assert signature.encode() not in open(path, "rb").read(), path
    assert signature not in fuseclone("status", rig.meta, "--json").stdout
    assert signature not in fuseclone("list", "--json").stdout


def test_a_signature_is_neither_shown_nor_stored(rig, nginx, image, tmp_path):
    trace = str(tmp_path / "trace")
    rig.mount("--no-hydration", "--log-level", "debug", "--record-access", trace, src=signed(nginx))
    with open(rig.image, "rb") as f:
        assert f.read(4096) == image[:4096]
    status = status_json(rig.mnt)
    assert status["source"] == nginx.url("image.raw")  # the URL without its query
    assert SIGNATURE.encode() not in open(f"/proc/{daemon_pid(rig.mnt)}/cmdline", "rb").read()  # ps
    assert_signature_absent(rig, status["log_file"])
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    assert_signature_absent(rig, trace)
    checked = fuseclone("check", rig.meta, "--src", signed(nginx))
    assert "matches" in checked.stdout and SIGNATURE not in checked.stdout + checked.stderr
    # re-signed: the same object (the strong ETag says so), so the clone resumes, with the trace
    rig.mount("--no-hydration", "--prefetch", trace, src=signed(nginx, "sig2"))
    deadline = time.monotonic() + 60
    while status_json(rig.mnt)["hydrated_regions"] == 0:  # the trace's region, fetched first
        assert time.monotonic() < deadline, "the trace's region was not fetched"
        time.sleep(0.1)
    fuseclone("unmount", rig.mnt)


def test_an_old_meta_with_a_signature_loses_it_at_the_next_mount(rig, nginx, image):
    # What fuseclone wrote before: the URL as given, query and all, in META's identity.
    rig.mount("--no-hydration", src=signed(nginx))
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    with Metadata.open(rig.meta, writable=False) as meta:
        identity, region_size = meta.header.identity, meta.header.region_size
    identity["source"] = {key: value for key, value in identity["source"].items()
                          if key != "query_sha256"} | {"url": signed(nginx)}
    os.unlink(rig.meta)
    Metadata.create(rig.meta, Geometry(FILE_SIZE, region_size), identity).close()
    assert SIGNATURE.encode() in open(rig.meta, "rb").read()
    assert SIGNATURE not in fuseclone("status", rig.meta).stdout  # shown without it at once
    rig.mount("--no-hydration", src=signed(nginx, "sig3"))  # still this clone's META
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    assert_signature_absent(rig)
    assert "sig3" not in json.dumps(Metadata.read_header(rig.meta).identity)


def test_the_header_file_is_neither_trace_nor_log(rig, nginx, image, tmp_path):
    """Truncated as a trace or appended to as a log, the headers (a token) would be lost."""
    from tests.integration.test_identity import mount_refused

    from .test_http import FIRST_TOKEN, write_header_file

    headers = write_header_file(tmp_path / "headers", FIRST_TOKEN)
    before = open(headers).read()
    open(rig.src, "wb").close()  # mount_refused checks that SRC is unchanged; here it is remote
    for option in ("--record-access", "--log-file"):
        mount_refused(rig, nginx.url("bearer/image.raw"), rig.dst, rig.meta, rig.mnt,
                      "--http-header-file", headers, option, headers,
                      expect="must be a file of its own")
        assert open(headers).read() == before


def test_a_password_in_the_url_is_neither_shown_nor_stored(rig, nginx, image):
    """`http://user:password@host/...`: httpx sends it as basic auth; like a signature, it
    stays out of `ps` (the daemon's command line), META, `status`, `list` and the log."""
    password = "pw7c1e9a4d"
    url = nginx.url("image.raw").replace("http://", f"http://someone:{password}@")
    rig.mount("--no-hydration", "--log-level", "debug", src=url)
    with open(rig.image, "rb") as f:
        assert f.read(4096) == image[:4096]
    status = status_json(rig.mnt)
    assert password.encode() not in open(f"/proc/{daemon_pid(rig.mnt)}/cmdline", "rb").read()
    assert_signature_absent(rig, status["log_file"], signature=password)
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    assert_signature_absent(rig, signature=password)
