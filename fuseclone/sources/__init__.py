"""Sources: local path, NBD, HTTP(S), behind one async interface (see base.Source)."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

from ..errors import SourceError
from .base import Extent, Source, SourceReadError

__all__ = ["Extent", "Source", "SourceReadError", "check_scheme", "is_remote", "open_source"]


@contextlib.asynccontextmanager
async def open_source(spec: str) -> AsyncIterator[Source]:
    """Open the source a user named (a path, nbd[s]://, nbd[s]+unix:// or http(s):// URL) for the
    duration of the block; its connections and background tasks end with the block. Every
    kind opens the same way: an async context manager that owns what the source holds."""
    async with _opener(spec)(spec) as source:
        yield source


def check_scheme(spec: str) -> None:
    """Raise SourceError unless `spec` is a path or a URL of a scheme we can open."""
    _opener(spec)


def _scheme(spec: str) -> str:
    """The URL scheme of a source, "" for a local path."""
    return spec.split("://", 1)[0].lower() if "://" in spec else ""


def is_remote(spec: str) -> bool:
    """Whether the source is a URL rather than a local path (it has no local identity)."""
    return _scheme(spec) != ""


def _opener(spec: str):
    scheme = _scheme(spec)
    if scheme == "":
        from .local import open_local_source

        return open_local_source
    if scheme in ("nbd", "nbd+unix", "nbds", "nbds+unix"):
        from .nbd import open_nbd_source

        return open_nbd_source
    if scheme in ("http", "https"):
        from .http import open_http_source

        return open_http_source
    raise SourceError(f"unknown source URL scheme {scheme!r} in {spec!r} "
                      "(use a path, nbd://, nbd+unix://, nbds://, nbds+unix://, http:// or https://)")
