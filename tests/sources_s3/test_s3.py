"""The s3:// source against a real SeaweedFS that checks signatures: reads, the CLI mounting
and hydrating an object, one clear line for wrong credentials, a missing bucket or key and an
endpoint without Range support, a replaced object refused on resume, and the secret key kept
out of META, status, the log and the command line."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import json
import os
import random
import threading
import urllib.parse

import pytest

from fuseclone.errors import SourceError
from fuseclone.sources import open_source
from fuseclone.sources.base import SourceReadError
from tests.integration.conftest import (assert_secret_absent, fuseclone, rig,  # noqa: F401
                                        sha256, status_json)
from tests.sources_http.test_http import NGINX, Nginx, assert_one_line, serving_scripted

from .conftest import SECRET_KEY

KiB = 1024
MiB = 1024 * KiB
SIZE = 3 * MiB + 12345  # not a multiple of any piece or region size


def upload(server, bucket: str, key: str, size: int = SIZE, seed: int = 1) -> bytes:
    data = random.Random(seed).randbytes(size)
    server.client().put_object(Bucket=bucket, Key=key, Body=data)
    return data


async def test_reads_ranges_of_an_object_and_its_identity(aws_env, bucket):
    key = "golden images/debian 12.raw"  # a space and a slash: the key is URL-encoded
    data = upload(aws_env, bucket, key)
    etag = aws_env.client().head_object(Bucket=bucket, Key=key)["ETag"]
    async with open_source(f"s3://{bucket}/{key}") as source:
        assert source.size == SIZE
        assert source.description == f"s3://{bucket}/{key}"
        assert source.identity() == {"kind": "s3", "bucket": bucket, "key": key, "size": SIZE,
                                     "etag": etag}
        assert await source.read(0, 10) == data[:10]
        assert await source.read(MiB - 3, 2 * MiB + 7) == data[MiB - 3 : 3 * MiB + 4]
        assert await source.read(SIZE - 100, 4096) == data[SIZE - 100 :]


async def test_wrong_secret_is_one_line_naming_the_credentials(aws_env, bucket, monkeypatch):
    upload(aws_env, bucket, "wrong-secret.raw")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(SourceError) as exc_info:
        async with open_source(f"s3://{bucket}/wrong-secret.raw"):
            pass
    assert_one_line(exc_info, f"s3://{bucket}/wrong-secret.raw", "access denied", "credentials")
    assert "not-the-secret" not in str(exc_info.value)


async def test_missing_bucket_and_key_are_one_line_each(aws_env, bucket):
    with pytest.raises(SourceError) as exc_info:
        async with open_source("s3://no-such-bucket-here/img"):
            pass
    assert_one_line(exc_info, "no such bucket 'no-such-bucket-here'")
    with pytest.raises(SourceError) as exc_info:
        async with open_source(f"s3://{bucket}/missing.raw"):
            pass
    assert_one_line(exc_info, "no such key 'missing.raw'")


@pytest.mark.parametrize("spec", ["s3://bucket-only", "s3:///key", "s3://b/k?versionId=1"])
async def test_malformed_s3_urls_are_refused(spec):
    with pytest.raises(SourceError) as exc_info:
        async with open_source(spec):
            pass
    assert_one_line(exc_info, "s3://BUCKET/KEY")


async def test_an_endpoint_without_range_support_is_refused(aws_env, tmp_path, monkeypatch):
    """nginx with ranges off stands in for such a store (path-style: ENDPOINT/BUCKET/KEY)."""
    if NGINX is None:
        pytest.skip("nginx is not installed")
    server = Nginx(tmp_path)
    (server.root / "bucket").mkdir()
    (server.root / "bucket" / "img").write_bytes(b"x" * 100_000)
    server.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.url("norange"))
        with pytest.raises(SourceError) as exc_info:
            async with open_source("s3://bucket/img"):
                pass
    finally:
        server.stop()
    assert_one_line(exc_info, "does not support Range requests")


async def test_an_object_replaced_while_open_fails_reads(aws_env, bucket):
    upload(aws_env, bucket, "changing.raw", seed=7)
    async with open_source(f"s3://{bucket}/changing.raw") as source:
        await source.read(0, 4096)
        upload(aws_env, bucket, "changing.raw", seed=8)  # same size: only the ETag tells
        with pytest.raises(SourceReadError) as exc_info:
            await source.read(0, 4096)
    assert "changed" in str(exc_info.value)



async def test_a_multipart_object_replaced_while_open_fails_reads(aws_env, bucket):
    """A multipart upload's ETag (an MD5 of the parts' MD5s, `-N` after it) is the object's
    version mark as a single PUT's is: replaced by another of the same size and parts, reads
    fail instead of mixing the two, and the next opening sees the new ETag."""
    import io

    from boto3.s3.transfer import TransferConfig

    parts = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    first, second = (random.Random(seed).randbytes(12 * MiB) for seed in (21, 22))
    client = aws_env.client()
    client.upload_fileobj(io.BytesIO(first), bucket, "multipart.raw", Config=parts)
    async with open_source(f"s3://{bucket}/multipart.raw") as source:
        etag = source.identity()["etag"]
        assert etag.endswith('-3"') and source.has_version_mark
        assert await source.read(6 * MiB, 4096) == first[6 * MiB:6 * MiB + 4096]
        client.upload_fileobj(io.BytesIO(second), bucket, "multipart.raw", Config=parts)
        with pytest.raises(SourceReadError) as info:
            await source.read(7 * MiB, 4096)
        assert "changed on the server" in str(info.value) and etag in str(info.value)
    async with open_source(f"s3://{bucket}/multipart.raw") as source:
        assert source.identity()["etag"] not in (etag, None)


SESSION_TOKEN = "fc-session-token-Kd93LpQ"  # distinctive: looked for where it must not go


async def test_a_redirect_to_another_server_is_refused_sending_it_nothing(aws_env, bucket,
                                                                          monkeypatch):
    """A 307 Temporary Redirect (a bucket in another region) was followed with the headers of
    the request signed for the endpoint: the session token went to the other server."""
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    with serving_scripted() as (endpoint, endpoint_url), serving_scripted() as (other, other_url):
        endpoint.head, endpoint.location, endpoint.redirect_status = "redirect", other_url, 307
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint_url.rsplit("/", 1)[0])
        with pytest.raises(SourceError) as exc_info:
            async with open_source(f"s3://{bucket}/img"):
                pass
        assert other.requests == []
    assert_one_line(exc_info, f"s3://{bucket}/img: redirected to another server ({other_url})",
                    "AWS_REGION")
    [(_, sent)] = endpoint.requests  # the endpoint had the signed request
    assert sent["X-Amz-Security-Token"] == SESSION_TOKEN and "Authorization" in sent


class RedirectingProxy(http.server.ThreadingHTTPServer):
    """An S3 endpoint in front of SeaweedFS that answers GETs of `moved_from` with a 307 to
    `moved_to` on itself and hands every other request to SeaweedFS as it came (its Host
    header too, which the signature covers)."""

    daemon_threads = True

    def __init__(self, store: str, moved_from: str, moved_to: str) -> None:
        super().__init__(("127.0.0.1", 0), RedirectingHandler)
        self.store = urllib.parse.urlsplit(store).netloc
        self.moved_from, self.moved_to = moved_from, moved_to
        self.paths: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class RedirectingHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.paths.append(self.path)
        if self.path == self.server.moved_from:
            self.send_response(307)
            self.send_header("Location", self.server.url + self.server.moved_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        store = http.client.HTTPConnection(self.server.store, timeout=30)
        try:
            store.request("GET", self.path, headers=dict(self.headers))
            answer = store.getresponse()
            body = answer.read()
        finally:
            store.close()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def redirecting_proxy(store: str, moved_from: str, moved_to: str):
    proxy = RedirectingProxy(store, moved_from, moved_to)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(5)


async def test_a_redirect_on_the_same_server_is_signed_for_its_own_path(aws_env, bucket,
                                                                        monkeypatch):
    """The hop went out with the first request's signature, made for another path: refused by
    the store (SignatureDoesNotMatch), the mount failed as if the credentials were wrong."""
    data = upload(aws_env, bucket, "moved.raw", seed=5)
    with redirecting_proxy(aws_env.endpoint, f"/{bucket}/old.raw", f"/{bucket}/moved.raw") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        async with open_source(f"s3://{bucket}/old.raw") as source:
            assert source.size == SIZE
            assert await source.read(SIZE - 100, 100) == data[SIZE - 100 :]
        assert proxy.paths[:2] == [f"/{bucket}/old.raw", f"/{bucket}/moved.raw"]


CREDENTIAL_PROCESS = """#!{python}
import datetime, json
with open({calls!r}, "a") as f:
    f.write("call\\n")
expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)
print(json.dumps({{"Version": 1, "AccessKeyId": {access!r}, "SecretAccessKey": {secret!r},
                  "SessionToken": "", "Expiration": expires.isoformat()}}))
"""


async def test_expiring_credentials_are_refreshed_for_later_requests(aws_env, bucket, tmp_path,
                                                                    monkeypatch):
    """A profile's credential_process hands out credentials that expire within botocore's
    refresh window: each request is signed with freshly fetched ones."""
    import sys

    from benchmarks.anchors import S3_ACCESS_KEY

    data = upload(aws_env, bucket, "refreshed.raw")
    calls = tmp_path / "calls"
    script = tmp_path / "credentials.py"
    script.write_text(CREDENTIAL_PROCESS.format(python=sys.executable, calls=str(calls),
                                                access=S3_ACCESS_KEY, secret=SECRET_KEY))
    script.chmod(0o755)
    (tmp_path / "aws-config").write_text(f"[profile fleet]\ncredential_process = {script}\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_PROFILE", "fleet")
    async with open_source(f"s3://{bucket}/refreshed.raw") as source:
        assert await source.read(0, 100) == data[:100]
        before = calls.read_text().count("call")
        assert await source.read(SIZE - 100, 100) == data[SIZE - 100 :]
        assert calls.read_text().count("call") > before


# ---- through the CLI ------------------------------------------------------------------------


def test_mount_hydrates_an_object_and_keeps_the_secret_out_of_sight(rig, aws_env, bucket):
    data = upload(aws_env, bucket, "disk.raw", size=8 * MiB + 4096, seed=3)
    spec = f"s3://{bucket}/disk.raw"
    rig.mount("--log-level", "debug", src=spec)
    fuseclone("wait", rig.mnt, "--timeout", "60")
    with open(rig.image, "rb") as f:
        assert f.read() == data
    status = status_json(rig.mnt)
    assert status["source"] == spec
    assert status["hydrated_regions"] == status["total_regions"]
    assert sha256(rig.dst, len(data)) == hashlib.sha256(data).hexdigest()
    assert_secret_absent(SECRET_KEY, rig, status)
    fuseclone("unmount", rig.mnt)
    meta = open(rig.meta, "rb").read()
    assert b"disk.raw" in meta and bucket.encode() in meta  # the identity is recorded


def test_cli_refuses_wrong_credentials_and_missing_objects_leaving_no_meta(rig, aws_env, bucket,
                                                                           monkeypatch):
    upload(aws_env, bucket, "refused.raw", size=MiB)
    cases = [(f"s3://{bucket}/refused.raw", {"AWS_SECRET_ACCESS_KEY": "wrong-secret"},
              "access denied"),
             (f"s3://{bucket}/nothing.raw", {}, "no such key"),
             ("s3://absent-bucket/disk.raw", {}, "no such bucket")]
    for spec, env, needle in cases:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        result = fuseclone("mount", spec, rig.dst, rig.meta, rig.mnt, check=False)
        for name in env:
            monkeypatch.setenv(name, aws_env.env()[name])
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], result.stderr
        assert "wrong-secret" not in result.stderr
        assert not os.path.exists(rig.meta) and not os.path.exists(rig.dst)


def test_resume_refuses_a_replaced_object_and_resumes_the_same_one(rig, aws_env, bucket):
    upload(aws_env, bucket, "replaced.raw", size=4 * MiB, seed=5)
    spec = f"s3://{bucket}/replaced.raw"
    rig.mount("--no-hydration", src=spec)
    fuseclone("unmount", rig.mnt)
    rig.mount("--no-hydration", src=spec)  # the same object: resumed
    fuseclone("unmount", rig.mnt)
    upload(aws_env, bucket, "replaced.raw", size=4 * MiB, seed=6)  # same size, new content
    meta_before = open(rig.meta, "rb").read()
    result = fuseclone("mount", spec, rig.dst, rig.meta, rig.mnt, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "the source changed since the clone began" in lines[0], result.stderr
    assert "etag" in lines[0]
    assert open(rig.meta, "rb").read() == meta_before
