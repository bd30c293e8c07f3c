"""systemd's notify protocol (sd_notify(3)), for a mount run as a `Type=notify` service.

systemd passes the address of a datagram socket in $NOTIFY_SOCKET (a path, or an abstract name
written with a leading '@'); the service sends newline-separated KEY=VALUE assignments to it:
READY=1 once the image can be opened, STATUS=<progress> now and then, STOPPING=1 on the way
out. Without $NOTIFY_SOCKET nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable, MutableMapping

import trio

log = logging.getLogger(__name__)

STATUS_INTERVAL = 2.0  # seconds between STATUS= updates (sent only when the text changed)


class SystemdNotifier:
    """Sends notifications to one $NOTIFY_SOCKET; a failed send is logged, never raised: the
    clone serves on whatever happened to systemd."""

    def __init__(self, address: str) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)  # a full queue loses a STATUS=, never stalls the mount
        self._last_status: str | None = None

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] = os.environ) -> SystemdNotifier | None:
        """The notifier $NOTIFY_SOCKET asks for, or None. The variable is removed, like
        sd_notify's unset_environment, so that the commands a mount runs (--on-complete) do not
        speak for it."""
        address = environ.pop("NOTIFY_SOCKET", "")
        if not address:
            return None
        if address[0] not in "/@":
            log.warning("NOTIFY_SOCKET=%s: only Unix socket addresses are supported; not notifying",
                        address)
            return None
        return cls(address)

    def send(self, **fields: str) -> None:
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._sock.sendto(message.encode(), self.address)
        except OSError as exc:
            log.warning("systemd notification %r not sent: %s", message, exc)

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send(READY="1", STATUS=status)

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(STATUS=status)

    def stopping(self) -> None:
        self.send(STOPPING="1", STATUS="stopping: committing and unmounting")

    async def report_progress(self, progress: Callable[[], str],
                              interval: float = STATUS_INTERVAL) -> None:
        """Send STATUS=progress() every INTERVAL seconds it changed, until cancelled."""
        while True:
            await trio.sleep(interval)
            self.status(progress())

    def close(self) -> None:
        self._sock.close()
