"""What other users see of a mount's command line (/proc/PID/cmdline, `ps`): any user can read
it, and a pre-signed URL's query is its signature, a secret. Once the arguments are parsed, the
query of every http(s) URL among them is overwritten in place with '*', its length kept (the
kernel shows the process's argument area as it is in memory; Python has its own copies)."""

from __future__ import annotations

import logging
import os
import re
import sys

log = logging.getLogger(__name__)

_URL_QUERY = re.compile(rb"(https?://[^?]*\?)(.*)", re.IGNORECASE | re.DOTALL)
# /proc/PID/stat fields after the command's name: arg_start and arg_end are fields 48 and 49,
# the 46th and 47th after the name (fields 1 and 2).
_ARG_START_AFTER_NAME = 48 - 3


def mask_url_queries() -> None:
    """Overwrite the queries of http(s) URLs in this process's argument area (untouched where
    the arguments hold none)."""
    if not any(_masked(os.fsencode(arg)) != os.fsencode(arg) for arg in sys.argv):
        return
    try:
        start, end = _argument_area()
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            area = mem.read(end - start)
            masked = masked_url_queries(area)
            if masked != area:
                mem.seek(start)
                mem.write(masked)
    except OSError as exc:
        log.warning("cannot hide URL queries from ps: %s", exc)


def masked_url_queries(area: bytes) -> bytes:
    """AREA (NUL-separated arguments) with each http(s) URL's query replaced by '*'s."""
    return b"\0".join(_masked(arg) for arg in area.split(b"\0"))


def _masked(arg: bytes) -> bytes:
    """ARG with the query of an http(s) URL in it masked: the URL may follow an option's '='
    (`--mirror=https://...`)."""
    return _URL_QUERY.sub(lambda m: m[1] + b"*" * len(m[2]), arg)


def _argument_area() -> tuple[int, int]:
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[_ARG_START_AFTER_NAME]), int(fields[_ARG_START_AFTER_NAME + 1])
