"""Sizes and rates as users write them (4096, 4K, 64KiB, 1M, 10MB/s): for the CLI's options
and the mount's messages alike, without importing either."""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b)?\s*(/s)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
# The largest file offset (off_t): every size or rate beyond it is a mistake, and a rate of
# hundreds of digits ended a hydrating mount (its throttle's float of it overflowed).
LARGEST_SIZE = (1 << 63) - 1


def parse_size(text: str) -> int:
    """4096, 4K, 64KiB, 1M, 10MB/s -> bytes (binary units: K = 1024)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 4K, 64KiB, 1M)")
    size = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if size > LARGEST_SIZE:
        raise ValueError(f"{text!r} is too large (at most {LARGEST_SIZE} bytes)")
    return size
