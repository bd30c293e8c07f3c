"""The files a mount loads (its modules' bytecode and sources, their directories, extension
modules and shared libraries), recorded by each mount once it is ready, and asked of the disk
all at once by the next `fuseclone mount` as it starts.

On a cold page cache, the imports of a mount read ~280 files one after the other: each file's
inode, then its data (~0.1-0.2 s of a cold mount, docs/benchmark/startup.md). READERS threads
going through the recorded list open each file and hint its data (POSIX_FADV_WILLNEED), stat a
source, list a directory, so that the waits overlap and the imports find the pages cached.

Only a hint: a missing, stale or damaged list costs nothing, a path gone is skipped, and a bug
here is logged by the mount, never fails it. This module imports only what a Python start-up has
loaded already (and ctypes): it runs before click, logging and trio are imported."""

from __future__ import annotations

import os
import sys
import threading

READERS = 4  # threads; each waits for one inode at a time
LIST_HEADER = "fuseclone startup files 1"
MAX_LIST_BYTES = 1 << 20  # a longer list is not one a mount wrote
READ, STAT, LIST = "read", "stat", "list"  # what a reader does with an entry's path

_readers: list[threading.Thread] = []
_stop = threading.Event()
_failure: BaseException | None = None  # a bug met before the mount's log existed


def list_path(environ: dict[str, str] | None = None) -> str:
    """$XDG_CACHE_HOME/fuseclone/startup-files (~/.cache when unset): a cache that, unlike the
    runtime directory, survives a reboot, after which a mount is at its coldest."""
    environ = os.environ if environ is None else environ
    cache = environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(cache):  # the spec: a relative one is invalid
        cache = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fuseclone", "startup-files")


# ---- at the start of `fuseclone mount` ------------------------------------------------------


def read_ahead() -> None:
    """Start the readers on the recorded list, without waiting for them (`finish` does)."""
    global _failure
    try:
        # Imported with or without a list, so that every mount lists its modules in one order
        from .libc import M_ARENA_MAX, libc  # noqa: F401

        entries = _recorded_entries()
        if entries and not _cached_already(entries):
            _start_readers(entries)
    except Exception as exc:  # a bug: told in the mount's log by `record`
        _failure = exc


def finish() -> None:
    """Stop the readers and join them: before a fork, which must find no other thread. What
    they have not hinted yet is left to the imports."""
    _stop.set()
    while _readers:
        _readers.pop().join()


def _recorded_entries() -> list[tuple[str, str]]:
    try:
        fd = os.open(list_path(), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return []  # none yet, or none for this user
    try:
        if os.fstat(fd).st_uid != os.geteuid():  # not this user's: its paths are not ours to open
            return []
        text = os.read(fd, MAX_LIST_BYTES + 1)
    finally:
        os.close(fd)
    if len(text) > MAX_LIST_BYTES:
        return []
    # Less what this process loaded already: its modules, the libraries it maps (the whole of
    # libpython is not needed)
    loaded = {*_module_files(), *_mapped_files()}
    return [(what, path) for what, path in parse(text) if path not in loaded]


def parse(text: bytes) -> list[tuple[str, str]]:
    """The (what, path) entries of a list; none from a damaged one."""
    lines = os.fsdecode(text).split("\n")
    if lines[0] != LIST_HEADER or lines[-1] != "":  # another format, or cut short
        return []
    entries = [tuple(line.partition(" ")[::2]) for line in lines[1:-1]]
    if not all(what in (READ, STAT, LIST) and os.path.isabs(path) for what, path in entries):
        return []
    return entries


def _cached_already(entries: list[tuple[str, str]]) -> bool:
    """Whether the last bytecode the recorded mount loaded is still in the page cache: then
    the rest is too, most likely (read before it), and readers would only compete with this
    thread for the GIL (+3% on a warm mount)."""
    last = next((path for what, path in reversed(entries)
                 if what == READ and path.endswith(".pyc")), None)
    if last is None:
        return False
    try:
        fd = os.open(last, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return False
    try:
        # Refused (EAGAIN) unless cached; then it starts reading the page in, as wanted anyway
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
        return True
    except OSError:  # not cached; or a filesystem without RWF_NOWAIT: the readers start
        return False
    finally:
        os.close(fd)


def _start_readers(entries: list[tuple[str, str]]) -> None:
    # The daemon's heap.use_one_arena, made now: a thread's first malloc creates an arena of
    # its own otherwise, which a later mallopt neither removes nor keeps from the daemon's
    # threads (glibc hands out the arenas of threads gone first).
    from .libc import M_ARENA_MAX, libc

    if not libc.mallopt(M_ARENA_MAX, 1):
        return
    _stop.clear()
    for first in range(READERS):
        # Every READERS-th entry: each reader goes through the list in the order it was loaded.
        reader = threading.Thread(target=_read, args=(entries[first::READERS],), daemon=True,
                                  name="startup-files")
        reader.start()
        _readers.append(reader)


def _read(entries: list[tuple[str, str]]) -> None:
    global _failure
    try:
        for what, path in entries:
            if _stop.is_set():
                return
            try:
                _prepare(what, path)
            except OSError:
                pass  # gone, or changed into something else since recorded: the import will say
    except Exception as exc:
        _failure = exc


def _prepare(what: str, path: str) -> None:
    if what == STAT:  # a source: the import only compares its time with the bytecode's
        os.stat(path)
    elif what == LIST:
        os.listdir(path)
    else:
        # O_NONBLOCK: a path that became a FIFO must not hold the reader
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


# ---- once a mount is ready --------------------------------------------------------------------


def record() -> None:
    """Write the list of the files this process loaded, if it differs from the recorded one.
    Any failure is logged (a bug as one), never raised: the mount is served already."""
    import logging  # here: the reader's side runs before logging is imported

    log = logging.getLogger(__name__)
    if _failure is not None:
        log.error("reading the startup files ahead failed", exc_info=_failure)
    try:
        _write_if_changed(list_path(), render(loaded_entries()))
    except OSError as exc:
        log.debug("startup files not recorded: %s", exc)
    except Exception:
        log.exception("startup files not recorded")


def loaded_entries() -> list[tuple[str, str]]:
    """What this process loaded, in the order of its imports, then the other shared libraries
    it maps."""
    entries: dict[tuple[str, str], None] = {}
    for path in sys.path:
        if os.path.isabs(path):
            entries[(LIST, path)] = None
    for module in list(sys.modules.values()):
        source, cached = getattr(module, "__file__", None), getattr(module, "__cached__", None)
        if isinstance(cached, str) and isinstance(source, str):
            entries[(STAT, source)] = None
            entries[(READ, cached)] = None
        elif isinstance(source, str):  # an extension module
            entries[(READ, source)] = None
        for directory in getattr(module, "__path__", None) or ():
            if isinstance(directory, str):
                entries[(LIST, directory)] = None
    for path in _mapped_files():
        entries[(READ, path)] = None
    return [(what, path) for what, path in entries
            if os.path.isabs(path) and "\n" not in path]


def _module_files() -> list[str]:
    files = []
    for module in list(sys.modules.values()):
        files += [path for path in (getattr(module, "__file__", None),
                                    getattr(module, "__cached__", None)) if isinstance(path, str)]
    return files


def _mapped_files() -> list[str]:
    """The regular files mapped into this process (libraries, mostly)."""
    with open("/proc/self/maps") as maps:
        fields = [line.split(maxsplit=5) for line in maps]
    paths = {line[5].rstrip("\n") for line in fields if len(line) == 6}
    return sorted(path for path in paths if path.startswith("/") and not path.endswith(
        " (deleted)") and os.path.isfile(path))


def render(entries: list[tuple[str, str]]) -> bytes:
    return os.fsencode("".join([f"{LIST_HEADER}\n", *(f"{what} {path}\n"
                                                     for what, path in entries)]))


def _write_if_changed(path: str, text: bytes) -> None:
    try:
        with open(path, "rb") as recorded:
            if recorded.read(MAX_LIST_BYTES + 1) == text:
                return
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    # Written whole, then renamed over the old one: a mount starting meanwhile reads one list
    # or the other. Not synced: a list cut short by a crash is read as none.
    temporary = f"{path}.{os.getpid()}"
    try:
        with open(temporary, "wb") as new:
            new.write(text)
        os.rename(temporary, path)
    except BaseException:
        _remove(temporary)
        raise


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
