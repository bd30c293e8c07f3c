"""The resource limits a mount inherits from the shell or service manager that starts it
(`ulimit`, systemd's `LimitNOFILE=`), checked before anything is created: a limit the daemon
would run into mid-life fails there instead, where a client has the image open."""

from __future__ import annotations

import resource

from .control import MAX_CLIENTS, MAX_WAITS
from .errors import FusecloneError

# The descriptors a mount may hold at once: its control clients (served at once, and pending
# `wait`s), and 128 for the rest: about 20 of its own (DST twice, META, SRC, the log,
# /dev/fuse, the io_uring and its mappings, trio's wakeup, the control listener) and a source's
# connections (16 per HTTP server, 4 per NBD server, mirrors included). 512 in all.
MOUNT_OPEN_FILES = MAX_CLIENTS + MAX_WAITS + 128


def ensure_open_files(needed: int = MOUNT_OPEN_FILES) -> None:
    """Raise the soft limit of open files to NEEDED where the hard limit allows it (never
    lowering it, so a command the mount runs gets at least what the caller had); refuse with
    one line where it does not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _at_least(soft, needed):
        return
    if not _at_least(hard, needed):
        raise FusecloneError(f"at most {hard} files may be open (ulimit -n): a mount needs "
                             f"{needed} (ulimit -n {needed}, or LimitNOFILE={needed} in its "
                             "systemd unit)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _at_least(limit: int, needed: int) -> bool:
    return limit == resource.RLIM_INFINITY or limit >= needed
