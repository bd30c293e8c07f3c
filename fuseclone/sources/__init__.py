"""Sources: local path, NBD, HTTP(S), S3, behind one async interface (see base.Source)."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import urllib.parse
from typing import AsyncIterator

from ..cmdline import URL_PASSWORD
from ..errors import SourceError
from .base import Extent, Source, SourceReadError

__all__ = ["Extent", "Source", "SourceReadError", "check_scheme", "describe_identity", "describe_spec", "is_remote",
           "open_source", "takes_http_headers", "with_absolute_paths"]


@contextlib.asynccontextmanager
async def open_source(spec: str, *, http_header_file: str | None = None
                      ) -> AsyncIterator[Source]:
    """Open the source a user named (a path, nbd[s]://, nbd[s]+unix://, http(s):// or s3:// URL)
    for the duration of the block; its connections and background tasks end with the block.
    Every kind opens the same way: an async context manager that owns what the source holds.
    A source without a version mark has its data sample taken (`Source.take_sample`), part of
    its identity. `http_header_file`: headers every HTTP request carries (http(s):// and s3://
    only)."""
    async with _opener(spec, http_header_file)(spec) as source:
        if not source.has_version_mark:
            await source.take_sample()
        yield source


def check_scheme(spec: str, http_header_file: str | None = None) -> None:
    """Raise SourceError unless `spec` is a path or a URL of a scheme we can open (with
    `http_header_file`, if given)."""
    _opener(spec, http_header_file)


def takes_http_headers(spec: str) -> bool:
    """Whether the source's requests can carry headers (--http-header-file)."""
    return _scheme(spec) in ("http", "https", "s3")


def describe_spec(spec: str) -> str:
    """`spec` for messages and status (the description of every source opened from it): a
    password in the URL shown as ***, and an http(s) URL without its query and fragment (a
    pre-signed URL's signature, a secret, is in the query)."""
    if not is_remote(spec):
        return spec
    try:
        given = urllib.parse.urlsplit(spec)
    except ValueError:  # not a URL after all (an unclosed '['): its opener says why
        return _PASSWORD.sub(r"\1***", spec)
    parts = given
    if _scheme(spec) in ("http", "https"):
        parts = parts._replace(query="", fragment="")
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1))
    # Rebuilt only when changed: urlunsplit respells some URLs (nbd+unix:/// as nbd+unix:/).
    return spec if parts == given else urllib.parse.urlunsplit(parts)


_PASSWORD = re.compile(URL_PASSWORD, re.IGNORECASE)


# Query keys of NBD URLs (libnbd's) that name local paths
_NBD_PATH_KEYS = ("socket", "tls-certificates")


def with_absolute_paths(spec: str) -> str:
    """A remote SPEC with the local paths in its query (an NBD URL's ?socket= and
    ?tls-certificates=) absolute, from this directory: the mount's daemon leaves it. Spelled
    as given when nothing changes, or when it does not parse (its opener says why)."""
    if _scheme(spec) not in ("nbd+unix", "nbds+unix", "nbd", "nbds"):
        return spec
    try:
        parts = urllib.parse.urlsplit(spec)
    except ValueError:
        return spec
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    absolute = [(key, os.path.join(os.getcwd(), value) if key in _NBD_PATH_KEYS and value
                 and not os.path.isabs(value) else value) for key, value in query]
    if absolute == query:
        return spec
    # Not urlunsplit: it respells nbd+unix:/// as nbd+unix:/
    before, _, rest = spec.partition("?")
    fragment = rest[len(parts.query):]
    return (f"{before}?{urllib.parse.urlencode(absolute, safe='/', quote_via=urllib.parse.quote)}"
            f"{fragment}")


def describe_identity(identity: object) -> str:
    """A recorded identity (of a source or destination) for a message: `key=value, ...`, its
    URL as describe_spec shows it."""
    if not isinstance(identity, dict):
        return str(identity)
    return ", ".join(f"{key}={describe_spec(value) if key == 'url' else value}"
                     for key, value in sorted(identity.items()))


def _scheme(spec: str) -> str:
    """The URL scheme of a source, "" for a local path."""
    return spec.split("://", 1)[0].lower() if "://" in spec else ""


def is_remote(spec: str) -> bool:
    """Whether the source is a URL rather than a local path (it has no local identity)."""
    return _scheme(spec) != ""


def _opener(spec: str, http_header_file: str | None = None):
    scheme = _scheme(spec)
    if http_header_file is not None and not takes_http_headers(spec):
        raise SourceError(f"--http-header-file applies to http://, https:// and s3:// sources, "
                          f"not {spec!r}")
    if scheme == "":
        from .local import open_local_source

        return open_local_source
    if scheme in ("nbd", "nbd+unix", "nbds", "nbds+unix"):
        from .nbd import open_nbd_source

        return open_nbd_source
    if scheme in ("http", "https"):
        from .http import open_http_source

        return functools.partial(open_http_source, header_file=http_header_file)
    if scheme == "s3":
        from .s3 import open_s3_source

        return functools.partial(open_s3_source, header_file=http_header_file)
    raise SourceError(f"unknown source URL scheme {scheme!r} in {spec!r} "
                      "(use a path, nbd://, nbd+unix://, nbds://, nbds+unix://, http://, https:// or s3://)")
