"""nbdkit servers for the NBD source tests: started per test, always killed and reaped after it,
even when the test fails. Unix sockets in tmp_path, or TCP on 127.0.0.1 only."""

import contextlib
import os
import shutil
import socket
import subprocess
import time

import pytest

NBDKIT = shutil.which("nbdkit")


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nbdkit:
    """One nbdkit process: `nbdkit --exit-with-parent -f -r -U SOCK [filters] plugin args`."""

    def __init__(self, workdir, args, *, tcp=False, name="nbd"):
        self.args = [str(a) for a in args]
        self.tcp = tcp
        self.sock = os.path.join(str(workdir), f"{name}.sock")
        self.port = free_port() if tcp else None
        self.log = os.path.join(str(workdir), f"{name}.stderr")
        self.proc = None

    def url(self, export=""):
        if self.tcp:
            return f"nbd://127.0.0.1:{self.port}/{export}"
        return f"nbd+unix:///{export}?socket={self.sock}"

    def command(self):
        where = ["-i", "127.0.0.1", "-p", str(self.port)] if self.tcp else ["-U", self.sock]
        return [NBDKIT, "--exit-with-parent", "-f", "-r", *where, *self.args]

    def start(self, timeout=10.0):
        assert self.proc is None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"nbdkit exited with {code}: {self.stderr()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nbdkit did not start within {timeout} s: {self.stderr()}")
            time.sleep(0.01)
        return self

    def _ready(self):
        """Accepting connections (the socket file exists a moment before nbdkit listens)."""
        if self.tcp:
            family, address = socket.AF_INET, ("127.0.0.1", self.port)
        elif os.path.exists(self.sock):
            family, address = socket.AF_UNIX, self.sock
        else:
            return False
        with contextlib.closing(socket.socket(family, socket.SOCK_STREAM)) as s:
            return s.connect_ex(address) == 0

    def stop(self):
        """Kill and reap (idempotent)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)

    def restart(self):
        self.stop()
        return self.start()

    def stderr(self):
        with contextlib.suppress(FileNotFoundError), open(self.log, errors="replace") as f:
            return f.read().strip()
        return ""


@pytest.fixture
def nbdkit(tmp_path):
    """nbdkit(*args, tcp=False) -> a started Nbdkit; every one is killed at teardown."""
    if NBDKIT is None:
        pytest.skip("nbdkit is not installed")
    servers = []

    def start(*args, tcp=False, name=None):
        server = Nbdkit(tmp_path, args, tcp=tcp, name=name or f"nbd{len(servers)}")
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
