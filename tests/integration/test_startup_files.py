"""A mount records the files it loaded; the next one reads them ahead, in threads gone before
its fork, and its daemon keeps one malloc arena; a damaged list fails no mount."""

import os

from fuseclone import startup_files
from tests.cli.test_startup_files import cold_file, wait_cached
from tests.integration.conftest import daemon_pid, fuseclone

MiB = 1 << 20
ARENA_SIZE = 64 * MiB  # glibc's HEAP_MAX_SIZE on 64-bit: a thread arena's reservation


def recorded() -> list[tuple[str, str]]:
    with open(startup_files.list_path(), "rb") as f:
        return startup_files.parse(f.read())


def thread_arenas(pid: int) -> int:
    """glibc's arenas other than the main one in PID: anonymous mappings that start at a
    multiple of ARENA_SIZE and, with the reserved rest after them, span exactly ARENA_SIZE."""
    starts, ends = {}, set()
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if len(fields) == 5:  # anonymous
                starts[start] = fields[1]
                ends.add(end)
    return sum(1 for start, perms in starts.items()
               if start % ARENA_SIZE == 0 and perms == "rw-p" and start + ARENA_SIZE in ends)


def test_the_next_mount_reads_ahead_what_a_mount_loaded(rig, random_source):
    rig.mount("--no-hydration")
    fuseclone("unmount", rig.mnt)  # the list is written before the mount can be let go
    loaded = dict((path, what) for what, path in recorded())
    daemon_side = os.path.join(os.path.dirname(startup_files.__file__), "fuse", "session.py")
    assert loaded[daemon_side] == startup_files.STAT
    assert loaded[startup_files.__cached__] == startup_files.READ
    assert any(path.endswith(".so") for path in loaded)
    written = os.stat(startup_files.list_path())

    # One more file in the list, cold, first (the readers stop at the fork), and a cold last
    # bytecode (a cached one tells the mount that all is): the next mount's readers bring it in
    cold = cold_file(rig.tmp / "cold.pyc", 4 * MiB)
    last = cold_file(rig.tmp / "last.pyc", 4096)
    with open(startup_files.list_path(), "rb") as f:
        header, rest = f.read().split(b"\n", 1)
    with open(startup_files.list_path(), "wb") as f:
        f.write(header + os.fsencode(f"\n{startup_files.READ} {cold}\n") + rest
                + os.fsencode(f"{startup_files.READ} {last}\n"))
    rig.mount("--no-hydration")
    wait_cached(cold, 4 * MiB - 4096)
    assert thread_arenas(daemon_pid(rig.mnt)) == 0  # the readers' mallocs took the main arena
    fuseclone("unmount", rig.mnt)
    again = os.stat(startup_files.list_path())
    assert again.st_ino != written.st_ino  # rewritten: the cold file is not one it loads
    assert cold not in dict((path, what) for what, path in recorded())

    rig.mount("--no-hydration")
    fuseclone("unmount", rig.mnt)
    assert os.stat(startup_files.list_path()).st_ino == again.st_ino  # unchanged: not rewritten


def test_a_damaged_list_fails_no_mount(rig, random_source):
    os.makedirs(os.path.dirname(startup_files.list_path()), exist_ok=True)
    with open(startup_files.list_path(), "wb") as f:
        f.write(b"\x00\xff not a list")
    rig.mount("--no-hydration")
    fuseclone("unmount", rig.mnt)
    assert recorded()  # replaced by this mount's
