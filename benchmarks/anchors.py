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
