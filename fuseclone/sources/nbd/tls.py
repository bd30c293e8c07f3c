"""TLS for `nbds://` and `nbds+unix://`: the client's SSL context and what a failure means.

The server's certificate is verified against the system's CAs (or `SSL_CERT_FILE` /
`SSL_CERT_DIR`, which OpenSSL reads), and over TCP its name against the host in the URL. Over a
Unix socket there is no host name to check, so only the chain is verified (libnbd, too, checks
a name only when it has one). `?tls-certificates=DIR` follows libnbd's URI convention:
DIR/ca-cert.pem, when present, is the CA to trust instead of the system's, and
DIR/client-cert.pem with DIR/client-key.pem, when both are present, is the client's
certificate for servers that verify their peers (`nbdkit --tls-verify-peer`).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

import trio

from ...errors import SourceError

CA_CERT = "ca-cert.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


@dataclass(frozen=True)
class TlsClient:
    """How to start TLS on a connection to one server."""

    context: ssl.SSLContext
    server_hostname: str | None  # None over a Unix socket: the chain is checked, no name
    client_certificate: bool  # one was loaded from tls-certificates=DIR

    def wrap(self, stream: trio.abc.Stream) -> trio.SSLStream:
        return trio.SSLStream(stream, self.context, server_hostname=self.server_hostname)

    def hang_up_reason(self) -> str:
        """Why a server hangs up right after the TLS handshake: it checks client certificates."""
        if self.client_certificate:
            return ("TLS: the server refused our client certificate (it hung up after the TLS "
                    "handshake)")
        return ("TLS: the server requires a client certificate (it hung up after the TLS "
                "handshake; put client-cert.pem and client-key.pem in DIR and add "
                "?tls-certificates=DIR)")


def tls_client(url: str, host: str | None, certificates: str | None) -> TlsClient:
    """The TLS settings of `url`; SourceError when the certificates directory is unusable."""
    ca_file = None
    if certificates is not None:
        if not os.path.isdir(certificates):
            raise SourceError(f"{url}: tls-certificates={certificates} is not a directory")
        candidate = os.path.join(certificates, CA_CERT)
        ca_file = candidate if os.path.exists(candidate) else None
    try:
        # cafile=None: the system's store, or SSL_CERT_FILE / SSL_CERT_DIR
        context = ssl.create_default_context(cafile=ca_file)
        client_certificate = (certificates is not None
                              and _load_client_certificate(context, certificates))
    except (OSError, ssl.SSLError) as exc:
        raise SourceError(f"{url}: cannot load the TLS certificates from {certificates}: "
                          f"{getattr(exc, 'reason', None) or exc.strerror or exc}") from None
    if host is None:
        context.check_hostname = False  # the chain is still verified (CERT_REQUIRED)
    return TlsClient(context, host, client_certificate)


def _load_client_certificate(context: ssl.SSLContext, directory: str) -> bool:
    """Load DIR/client-cert.pem and DIR/client-key.pem when both are there."""
    cert, key = os.path.join(directory, CLIENT_CERT), os.path.join(directory, CLIENT_KEY)
    if not (os.path.exists(cert) and os.path.exists(key)):
        return False
    context.load_cert_chain(cert, key)
    return True


def describe_failure(exc: BaseException) -> str:
    """One line for a connection that broke during or inside TLS (`exc` is what trio raised;
    its cause is the ssl or socket error)."""
    cause = exc.__cause__ or exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        said = (cause.verify_message or "").rstrip(".")
        if cause.verify_code in NAME_MISMATCH:
            return f"TLS: the server's certificate is for another host: {said}"
        return (f"TLS: the server's certificate is not trusted: {said} (trusted are the "
                "system's CAs, SSL_CERT_FILE, or ca-cert.pem in ?tls-certificates=DIR)")
    if isinstance(cause, ssl.SSLError):
        reason = (cause.reason or str(cause)).replace("_", " ").lower()
        return f"TLS: {reason}"
    if isinstance(cause, OSError):
        return f"connection lost: {os.strerror(cause.errno) if cause.errno else cause}"
    return f"connection lost: {cause}"
