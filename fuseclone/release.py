"""Which release of fuseclone this is, for `--version`: the package's version, and, for an
install from a git checkout (`./run setup` installs the checkout editable), the commit and its
date, which is how README's Versions section tells releases apart."""

from __future__ import annotations

import os
import subprocess

from . import __version__

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def release() -> str:
    """`0.1.0 (commit 3b71428, 2026-11-28 14:52:07 +0000)`; `0.1.0` alone where the package
    is not in a git checkout of its own (a wheel in site-packages) or git cannot tell."""
    commit = _commit()
    return f"{__version__} ({commit})" if commit else __version__


def _commit() -> str | None:
    """The checkout's commit and date, with `, modified` when the package differs from it.
    None unless the package's parent directory is the top of a git work tree."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or os.path.realpath(top) != os.path.realpath(_CHECKOUT):
        return None  # not a checkout, or the package sits inside some other repository
    described = _git("log", "-1", "--format=%h, %cd", "--date=iso")
    if not described:
        return None
    modified = _git("status", "--porcelain", "--untracked-files=no", "--", "fuseclone", "pyproject.toml")
    return f"commit {described}{', modified' if modified else ''}"


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", _CHECKOUT, *args], capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None
