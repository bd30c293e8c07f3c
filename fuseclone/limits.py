"""The resource limits a mount inherits from the shell or service manager that starts it
(`ulimit`, systemd's `LimitNOFILE=`; the memory of its cgroup, systemd's `MemoryMax=`), checked
before anything is created: a limit the daemon would run into mid-life fails there instead,
where a client has the image open."""

from __future__ import annotations

import logging
import os
import resource

from .control import MAX_CLIENTS, MAX_WAITS
from .errors import FusecloneError
from .fuse.mount import mount_entries

log = logging.getLogger(__name__)

# The descriptors a mount may hold at once: its control clients (served at once, and pending
# `wait`s), and 128 for the rest: about 26 of its own (DST twice, META, three more of each for
# their fdatasyncs (blockio.DataSync), SRC, the log, /dev/fuse, the io_uring and its mappings,
# trio's wakeup, the control listener) and a source's connections (16 per HTTP server, 4 per
# NBD server, mirrors included). 512 in all.
MOUNT_OPEN_FILES = MAX_CLIENTS + MAX_WAITS + 128


def ensure_open_files(needed: int = MOUNT_OPEN_FILES) -> None:
    """Raise the soft limit of open files to NEEDED where the hard limit allows it (never
    lowering it, so a command the mount runs gets at least what the caller had); refuse with
    one line where it does not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _at_least(soft, needed):
        return
    if not _at_least(hard, needed):
        raise FusecloneError(f"at most {hard} files may be open (ulimit -n): a mount needs "
                             f"{needed} (ulimit -n {needed}, or LimitNOFILE={needed} in its "
                             "systemd unit)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _at_least(limit: int, needed: int) -> bool:
    return limit == resource.RLIM_INFINITY or limit >= needed


# The memory a process may still use: the machine's, and that of its cgroups (systemd's
# MemoryMax=, MemoryLimit=), found like this.
MEMINFO = "/proc/meminfo"
PROC_CGROUPS = "/proc/self/cgroup"
# per hierarchy: its limit's file, and the key of memory.stat that counts the memory the
# cgroup's processes hold and the kernel cannot reclaim (page cache it can, under the limit)
CGROUP_V2_MEMORY = ("memory.max", "anon")
CGROUP_V1_MEMORY = ("memory.limit_in_bytes", "total_rss")


def available_memory() -> tuple[int, str]:
    """Bytes this process may still allocate, and what bounds them: the machine's
    MemAvailable, or less under the memory limit of its cgroup or of one above it (cgroup v2's
    memory.max, v1's memory.limit_in_bytes), less what the cgroup's processes hold already.
    Past that limit the kernel's OOM killer ends the mount, whatever the machine has free."""
    best = (_mem_available(), "available")
    for directory, limit_name, held_key in _memory_cgroups():
        try:
            limit = _read_limit(os.path.join(directory, limit_name))
            if limit is None:
                continue
            room = max(0, limit - _read_stat(os.path.join(directory, "memory.stat"), held_key))
        except (OSError, ValueError) as exc:  # a cgroup gone meanwhile, or another layout
            log.debug("cannot read the memory limit of %s: %s", directory, exc)
            continue
        if room < best[0]:
            best = (room, f"left under the memory limit of cgroup {directory}")
    return best


def _mem_available() -> int:
    with open(MEMINFO) as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{MEMINFO} has no MemAvailable")


def _memory_cgroups() -> list[tuple[str, str, str]]:
    """(directory, limit file, memory.stat key) of this process's memory cgroup and of each
    one above it, in the hierarchies mounted here (v2, or v1's memory controller)."""
    paths = {}  # hierarchy -> this process's cgroup in it
    with open(PROC_CGROUPS) as f:
        for line in f:
            number, controllers, path = line.rstrip("\n").split(":", 2)
            if number == "0":
                paths["v2"] = path
            elif "memory" in controllers.split(","):
                paths["v1"] = path
    found = []
    for entry in mount_entries():
        if entry.fstype == "cgroup2" and "v2" in paths:
            found += _ancestors(entry.mountpoint, paths["v2"], CGROUP_V2_MEMORY)
        elif entry.fstype == "cgroup" and "memory" in entry.options.split(",") and "v1" in paths:
            found += _ancestors(entry.mountpoint, paths["v1"], CGROUP_V1_MEMORY)
    return found


def _ancestors(root: str, path: str, files: tuple[str, str]) -> list[tuple[str, str, str]]:
    directory = os.path.normpath(root + "/" + path)
    found = []
    while directory.startswith(root):
        if os.path.exists(os.path.join(directory, files[0])):
            found.append((directory, *files))
        if directory == root:
            break
        directory = os.path.dirname(directory)
    return found


def _read_limit(path: str) -> int | None:
    with open(path) as f:
        text = f.read().strip()
    return None if text == "max" else int(text)


def _read_stat(path: str, key: str) -> int:
    with open(path) as f:
        for line in f:
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    raise ValueError(f"{path} has no {key}")
