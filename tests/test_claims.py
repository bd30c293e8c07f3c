"""claims.py: holds meet other holds of the same file; a filesystem without locks (which cannot
be made here, hence the one mock) leaves shared holds empty and fails DST's."""

import errno
import fcntl
import os

import pytest

from fuseclone import claims


def opened(path):
    return os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)


def test_a_shared_hold_meets_an_exclusive_one(tmp_path):
    path = str(tmp_path / "f")
    dst, src, link = opened(path), opened(path), str(tmp_path / "link")
    os.link(path, link)
    try:
        claims.hold(dst, path, exclusive=True)
        with pytest.raises(claims.HeldError):
            claims.hold(src, path, exclusive=False)
        with pytest.raises(claims.FusecloneError, match=f"the log file {link} is in use by a live clone"):
            claims.refuse_if_held("log file", link)
    finally:
        os.close(dst)
    claims.hold(src, path, exclusive=False)  # let go with its descriptor
    claims.refuse_if_held("log file", str(tmp_path / "missing"))
    os.close(src)


def test_without_locks_only_the_destination_fails(tmp_path, monkeypatch, caplog):
    path = str(tmp_path / "f")
    fd = opened(path)

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    try:
        assert claims.hold(fd, path, exclusive=False) == []
        assert "not held against other clones" in caplog.text
        claims.refuse_if_held("access trace", path)
        with pytest.raises(OSError):
            claims.hold(fd, path, exclusive=True)
    finally:
        os.close(fd)
