"""Sources: local path, NBD, HTTP(S), behind one async interface (see base.Source)."""

from .base import Extent, Source, SourceReadError

__all__ = ["Extent", "Source", "SourceReadError", "open_source"]


async def open_source(spec: str) -> Source:
    """Open the source a user named: a path, nbd://, nbd+unix:// or http(s):// URL."""
    from ..errors import SourceError

    scheme = spec.split("://", 1)[0].lower() if "://" in spec else ""
    if scheme == "":
        from .local import LocalSource

        return await LocalSource.open(spec)
    if scheme in ("nbd", "nbd+unix", "nbds"):
        from .nbd import open_nbd_source

        return await open_nbd_source(spec)
    if scheme in ("http", "https"):
        from .http import open_http_source

        return await open_http_source(spec)
    raise SourceError(f"unknown source URL scheme {scheme!r} in {spec!r} (use a path, nbd://, nbd+unix://, http:// or https://)")
