"""What other users see of a mount's command line (/proc/PID/cmdline, `ps`): any user can read
it, and a pre-signed URL's query is its signature, a secret, as is the password of a URL's
`user:password@`. Once the arguments are parsed, the query of every http(s) URL among them and
the password of every URL are overwritten in place with '*', their lengths kept (the kernel
shows the process's argument area as it is in memory; Python has its own copies)."""

from __future__ import annotations

import logging
import os
import re
import sys

log = logging.getLogger(__name__)

_URL_QUERY = re.compile(rb"(https?://[^?]*\?)(.*)", re.IGNORECASE | re.DOTALL)
# scheme://user:PASSWORD@ (RFC 3986 userinfo: no '/', '?', '#' or '@' inside); group 2 is the
# password. Also what sources.describe_spec masks in a URL it cannot parse.
URL_PASSWORD = r"([a-z][a-z0-9+.-]*://[^/?#@:]*:)([^/?#@]*)(?=@)"
_URL_PASSWORD = re.compile(URL_PASSWORD.encode(), re.IGNORECASE)
# /proc/PID/stat fields after the command's name: arg_start and arg_end are fields 48 and 49,
# the 46th and 47th after the name (fields 1 and 2).
_ARG_START_AFTER_NAME = 48 - 3


def mask_url_queries() -> None:
    """Overwrite the queries of http(s) URLs, and URLs' passwords, in this process's argument
    area (untouched where the arguments hold none)."""
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
    """AREA (NUL-separated arguments) with each http(s) URL's query, and each URL's password,
    replaced by '*'s."""
    return b"\0".join(_masked(arg) for arg in area.split(b"\0"))


def _masked(arg: bytes) -> bytes:
    """ARG with the query of an http(s) URL in it, and a URL's password, masked: the URL may
    follow an option's '=' (`--mirror=https://...`)."""
    arg = _URL_PASSWORD.sub(lambda m: m[1] + b"*" * len(m[2]), arg)
    return _URL_QUERY.sub(lambda m: m[1] + b"*" * len(m[2]), arg)


def _argument_area() -> tuple[int, int]:
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[_ARG_START_AFTER_NAME]), int(fields[_ARG_START_AFTER_NAME + 1])
