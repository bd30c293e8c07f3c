"""nbdkit servers for the NBD source tests: started per test, always killed and reaped after it,
even when the test fails. Unix sockets in tmp_path, or TCP on 127.0.0.1 only."""

import contextlib
import os
import shutil
import socket
import subprocess
import time

import pytest
import trio

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

    def url(self, export="", tls=False):
        scheme = "nbds" if tls else "nbd"
        if self.tcp:
            return f"{scheme}://127.0.0.1:{self.port}/{export}"
        return f"{scheme}+unix:///{export}?socket={self.sock}"

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


async def read_once_it_answers(source, offset, length, timeout=10.0):
    """`source.read(offset, length)` tried every 50 ms until the (restarted) server answers."""
    from fuseclone.sources import SourceReadError

    with trio.fail_after(timeout):
        while True:
            try:
                return await source.read(offset, length)
            except SourceReadError:
                await trio.sleep(0.05)


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


OPENSSL = shutil.which("openssl")


def _openssl(*args, cwd):
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(where, name):
    """A CA certificate and key (EC P-256: quick to make) in `where`."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=where)


def _issue(ca_dir, where, stem, subject, extensions):
    """`stem`-cert.pem and `stem`-key.pem in `where`, signed by the CA in `ca_dir`."""
    ext = os.path.join(where, f"{stem}.ext")
    with open(ext, "w") as f:
        f.write("\n".join(["basicConstraints=CA:FALSE", "subjectKeyIdentifier=hash",
                           "authorityKeyIdentifier=keyid,issuer", *extensions]) + "\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{stem}-key.pem", "-out", f"{stem}.csr", "-subj", f"/CN={subject}", cwd=where)
    _openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", os.path.join(ca_dir, "ca-cert.pem"),
             "-CAkey", os.path.join(ca_dir, "ca-key.pem"), "-CAcreateserial", "-days", "2",
             "-out", f"{stem}-cert.pem", "-extfile", ext, cwd=where)


class TlsCertificates:
    """Directories in nbdkit's (--tls-certificates) and libnbd's (?tls-certificates=) layouts.

    ca: the test CA (ca-cert.pem, for SSL_CERT_FILE); server: ca-cert.pem, server-cert.pem and
    server-key.pem for 127.0.0.1 and localhost; client: ca-cert.pem, client-cert.pem and
    client-key.pem; ca_only: just ca-cert.pem (no client certificate); wrong_name: a server
    certificate of the same CA for another host; rogue: a server certificate of a CA nobody
    trusts."""

    def __init__(self, root):
        for name in ("ca", "server", "client", "ca_only", "wrong_name", "rogue"):
            path = os.path.join(root, name)
            os.mkdir(path)
            setattr(self, name, path)
        _make_ca(self.ca, "fuseclone test CA")
        _make_ca(self.rogue, "nobody's CA")
        server_ext = ["keyUsage=critical,digitalSignature", "extendedKeyUsage=serverAuth"]
        _issue(self.ca, self.server, "server", "localhost",
               [*server_ext, "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        _issue(self.ca, self.wrong_name, "server", "elsewhere.example",
               [*server_ext, "subjectAltName=DNS:elsewhere.example"])
        _issue(self.rogue, self.rogue, "server", "localhost",
               [*server_ext, "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        _issue(self.ca, self.client, "client", "fuseclone-client",
               ["keyUsage=critical,digitalSignature", "extendedKeyUsage=clientAuth"])
        for directory in (self.server, self.client, self.ca_only, self.wrong_name):
            shutil.copy(os.path.join(self.ca, "ca-cert.pem"), directory)

    @property
    def ca_file(self):
        return os.path.join(self.ca, "ca-cert.pem")


@pytest.fixture(scope="session")
def tls_certificates(tmp_path_factory):
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    return TlsCertificates(tmp_path_factory.mktemp("tls"))
