"""Sources: local path, NBD, HTTP(S), S3, behind one async interface (see base.Source)."""

from __future__ import annotations

import contextlib
import functools
from typing import AsyncIterator

from ..errors import SourceError
from .base import Extent, Source, SourceReadError

__all__ = ["Extent", "Source", "SourceReadError", "is_remote", "open_source"]


@contextlib.asynccontextmanager
async def open_source(spec: str, *, http_header_file: str | None = None
                      ) -> AsyncIterator[Source]:
    """Open the source a user named (a path, nbd[s]://, nbd[s]+unix://, http(s):// or s3:// URL)
    for the duration of the block; its connections and background tasks end with the block.
    Every kind opens the same way: an async context manager that owns what the source holds.
    `http_header_file`: headers every HTTP request carries (http(s):// and s3:// only)."""
    async with _opener(spec, http_header_file)(spec) as source:
        yield source


def _scheme(spec: str) -> str:
    """The URL scheme of a source, "" for a local path."""
    return spec.split("://", 1)[0].lower() if "://" in spec else ""


def is_remote(spec: str) -> bool:
    """Whether the source is a URL rather than a local path (it has no local identity)."""
    return _scheme(spec) != ""


def _opener(spec: str, http_header_file: str | None = None):
    scheme = _scheme(spec)
    if http_header_file is not None and scheme not in ("http", "https", "s3"):
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
