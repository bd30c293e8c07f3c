"""The list of a mount's startup files: read ahead by the next mount, harmless when damaged,
stale or not this user's, and its readers gone when `finish` returns (before the fork)."""

import os
import subprocess
import sys
import time

import pytest

from fuseclone import startup_files
from tests.page_cache import cached_pages

MiB = 1 << 20


def in_fresh_interpreter(code: str, cache_home: str) -> str:
    """CODE run after `from fuseclone import startup_files as s` in a new interpreter (the
    readers set the process's malloc arenas) whose cache directory is CACHE_HOME; its output."""
    env = dict(os.environ, XDG_CACHE_HOME=cache_home)
    return subprocess.run([sys.executable, "-c", f"from fuseclone import startup_files as s\n{code}"],
                          env=env, capture_output=True, text=True, check=True, timeout=60).stdout


def write_list(cache_home, entries, header=startup_files.LIST_HEADER) -> str:
    path = startup_files.list_path({"XDG_CACHE_HOME": str(cache_home)})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join([f"{header}\n", *(f"{what} {p}\n" for what, p in entries)]))
    return path


def cached(path: str, offset: int) -> bool:
    """Whether the page of PATH at OFFSET is in the page cache (asked without reading it in)."""
    return cached_pages(path, offset, 1) == 1


def cold_file(path, size: int) -> str:
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert not cached(str(path), size - 4096), "the file's pages stayed cached"
    return str(path)


def test_the_listed_files_are_read_ahead(tmp_path):
    cold = cold_file(tmp_path / "module.pyc", 4 * MiB)
    write_list(tmp_path / "cache", [(startup_files.READ, cold)])
    in_fresh_interpreter("s.read_ahead(); s.finish()", str(tmp_path / "cache"))
    wait_cached(cold, 4 * MiB - 4096)


def wait_cached(path: str, offset: int) -> None:
    deadline = time.monotonic() + 10  # the hint is asynchronous: its reads complete later
    while not cached(path, offset):
        assert time.monotonic() < deadline, "the listed file was not read ahead"
        time.sleep(0.01)


def test_a_warm_cache_starts_no_reader(tmp_path):
    """The last bytecode of the list cached: the rest is taken to be too."""
    warm = tmp_path / "warm.pyc"
    warm.write_bytes(b"cached")
    cold = cold_file(tmp_path / "cold.pyc", 4096)
    code = "s.read_ahead()\nprint(len(s._readers))\ns.finish()"
    write_list(tmp_path / "cache", [(startup_files.READ, cold), (startup_files.READ, str(warm))])
    assert in_fresh_interpreter(code, str(tmp_path / "cache")).split() == ["0"]
    write_list(tmp_path / "cache", [(startup_files.READ, str(warm)), (startup_files.READ, cold)])
    assert in_fresh_interpreter(code, str(tmp_path / "cache")).split() == [str(startup_files.READERS)]


def test_a_list_not_this_users_is_not_read(tmp_path):
    path = write_list(tmp_path / "cache", [(startup_files.READ, "/etc/hostname")])
    count = "print(len(s._recorded_entries()))"
    assert in_fresh_interpreter(count, str(tmp_path / "cache")).split() == ["1"]
    os.chown(path, 65534, 65534)
    assert in_fresh_interpreter(count, str(tmp_path / "cache")).split() == ["0"]


@pytest.mark.parametrize("text", [b"", b"\x00\xff garbage\n", b"fuseclone startup files 0\nread /a\n",
                                  b"fuseclone startup files 1\nread /a",  # cut short
                                  b"fuseclone startup files 1\nread relative/path\n",
                                  b"fuseclone startup files 1\nunlink /a\n"])
def test_a_damaged_list_is_no_list(text):
    assert startup_files.parse(text) == []


def test_stale_and_odd_entries_hold_nothing_up(tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)  # opened for reading, it would wait for a writer
    entries = [(startup_files.READ, fifo), (startup_files.READ, str(tmp_path / "gone.pyc")),
               (startup_files.READ, str(tmp_path)), (startup_files.STAT, str(tmp_path / "gone.py")),
               (startup_files.LIST, fifo), (startup_files.LIST, str(tmp_path / "gone"))]
    write_list(tmp_path / "cache", entries)
    out = in_fresh_interpreter("s.read_ahead(); s.finish(); print(s._failure)", str(tmp_path / "cache"))
    assert out.split() == ["None"]


def test_no_reader_is_left_once_finished(tmp_path):
    crowded = tmp_path / "crowded"  # listed 10,000 times: seconds of work for the readers
    crowded.mkdir()
    for i in range(2000):
        (crowded / f"{i:0200}").touch()
    write_list(tmp_path / "cache", [(startup_files.LIST, str(crowded))] * 10_000)
    code = ("import threading\ns.read_ahead()\nprint(threading.active_count())\ns.finish()\n"
            "print(threading.active_count())")
    started, finished = in_fresh_interpreter(code, str(tmp_path / "cache")).split()
    assert int(started) == 1 + startup_files.READERS
    assert int(finished) == 1


def test_a_list_is_written_whole_and_only_when_changed(tmp_path):
    path = str(tmp_path / "cache" / "fuseclone" / "startup-files")
    text = startup_files.render([(startup_files.READ, "/a"), (startup_files.STAT, "/b")])
    startup_files._write_if_changed(path, text)
    assert startup_files.parse(open(path, "rb").read()) == [(startup_files.READ, "/a"),
                                                             (startup_files.STAT, "/b")]
    before = os.stat(path)
    startup_files._write_if_changed(path, text)
    assert os.stat(path).st_ino == before.st_ino  # not renamed over: unchanged
    startup_files._write_if_changed(path, startup_files.render([]))
    assert os.stat(path).st_ino != before.st_ino
    assert os.listdir(os.path.dirname(path)) == ["startup-files"]  # no temporary left


def test_the_cache_directory():
    assert startup_files.list_path({"XDG_CACHE_HOME": "/c"}) == "/c/fuseclone/startup-files"
    home = os.path.expanduser("~")
    for environ in ({}, {"XDG_CACHE_HOME": "relative"}):  # the spec: a relative one is invalid
        assert startup_files.list_path(environ) == f"{home}/.cache/fuseclone/startup-files"
