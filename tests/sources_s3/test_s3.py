"""The s3:// source against a real SeaweedFS that checks signatures: reads, the CLI mounting
and hydrating an object, one clear line for wrong credentials, a missing bucket or key and an
endpoint without Range support, a replaced object refused on resume, and the secret key kept
out of META, status, the log and the command line."""

from __future__ import annotations

import hashlib
import json
import os
import random

import pytest

from fuseclone.errors import SourceError
from fuseclone.sources import open_source
from fuseclone.sources.base import SourceReadError
from tests.integration.conftest import (assert_secret_absent, fuseclone, rig,  # noqa: F401
                                        sha256, status_json)
from tests.sources_http.test_http import Nginx, NGINX, assert_one_line

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
    assert len(lines) == 1 and "belongs to another clone" in lines[0], result.stderr
    assert "etag" in lines[0]
    assert open(rig.meta, "rb").read() == meta_before
