"""Files a mount opens by path after its checks (the trace it records, its log, the prefetch
trace, the header file, DST's second descriptor) may have been swapped meanwhile: a FIFO put
there used to block open(2) for ever (the mount, and the command waiting for it, hung), another
file put there took the writes. Each is refused at once with one line, or reached through the
descriptor already checked."""

import contextlib
import logging
import os
import threading

import pytest

from fuseclone import cli
from fuseclone.destination import Destination
from fuseclone.errors import FusecloneError, SourceError
from fuseclone.regions import Geometry
from fuseclone.sources.http import _read_header_file
from fuseclone.trace import TraceError, TraceRecorder, read_trace

GEOMETRY = Geometry(1 << 20, 4096)


@contextlib.contextmanager
def fifo_whose_other_end_comes_late(path):
    """A FIFO at PATH. Its other end is opened (and closed) after a few seconds: an open(2)
    that waits for it (the bug) then returns, instead of hanging the test."""
    os.mkfifo(path)
    timer = threading.Timer(3, lambda: os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK)))
    timer.start()
    try:
        yield str(path)
    finally:
        timer.cancel()


def test_a_recorded_trace(tmp_path):
    with fifo_whose_other_end_comes_late(tmp_path / "trace") as fifo:
        with pytest.raises(TraceError, match=f"cannot write the access trace {fifo}: not a regular file"):
            TraceRecorder(fifo, {"kind": "file"}, GEOMETRY, clock=lambda: 0.0)


def test_a_prefetch_trace(tmp_path):
    with fifo_whose_other_end_comes_late(tmp_path / "trace") as fifo:
        with pytest.raises(TraceError, match="cannot read the access trace .not a regular file"):
            read_trace(fifo)


def test_a_header_file(tmp_path):
    with fifo_whose_other_end_comes_late(tmp_path / "headers") as fifo:
        with pytest.raises(SourceError, match=f"cannot read the header file {fifo}: not a regular file"):
            _read_header_file(fifo)


def test_a_log_file(tmp_path):
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        with fifo_whose_other_end_comes_late(tmp_path / "log") as fifo:
            with pytest.raises(FusecloneError, match=f"cannot write the log file {fifo}: not a regular file"):
                cli._setup_logging(fifo, "info")
        cli._setup_logging(os.devnull, "info")  # a log may go nowhere
    finally:
        for handler in set(root.handlers) - set(handlers):
            root.removeHandler(handler)
            handler.close()


def test_destinations_direct_descriptor_is_the_file_opened(tmp_path, monkeypatch):
    """Hydration copies go through a second descriptor (O_DIRECT): opened by DST's path, it
    was whatever that path named by then."""
    path = str(tmp_path / "dst.img")

    def swap_the_path(dst):
        os.rename(path, path + ".moved")
        with open(path, "wb") as other:
            other.truncate(1 << 20)

    monkeypatch.setattr(Destination, "_no_readahead", swap_the_path)  # runs just before
    dst = Destination.open(path, 1 << 20, create=True)
    try:
        if dst._direct_fd >= 0:
            assert os.fstat(dst._direct_fd).st_ino == os.fstat(dst.fd).st_ino
    finally:
        dst.close()
