"""Machine plumbing for the benchmark: commands, background servers, loop devices, mounts,
caches and scratch files. Everything that must be undone is registered on a
`contextlib.ExitStack` by the function that created it, so a failure or Ctrl-C anywhere still
detaches, unmounts and kills what this run made — and nothing else (processes are ended by
their pid, never by name).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass

log = logging.getLogger("benchmarks")

WORKDIR_DEFAULT = "/var/tmp/fuseclone-bench"
# The loop devices this run attached and has not detached yet (settle_writes flushes them).
_attached_loops: set[str] = set()


class BenchError(RuntimeError):
    """A set-up step failed; the row reports it and the run goes on."""


def run(cmd: list[str], *, check: bool = True, timeout: float | None = 600,
        input: bytes | None = None) -> subprocess.CompletedProcess:
    log.debug("$ %s", shlex.join(cmd))
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip() or proc.stdout.decode(errors="replace").strip()
        raise BenchError(f"{shlex.join(cmd)} exited {proc.returncode}: {err[-800:]}")
    return proc


def timed(cmd: list[str], **kw) -> float:
    """Wall-clock seconds of one command."""
    t0 = time.perf_counter()
    run(cmd, **kw)
    return time.perf_counter() - t0


def page_cache_bytes() -> int:
    """The machine's page cache now (`Cached` in /proc/meminfo)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    raise BenchError("/proc/meminfo has no Cached line")


def settle_writes() -> None:
    """Every write made so far on its way to disk and waited for: each loop device this run
    attached is flushed, then sync(2). A buffered loop device on a FUSE image with the write
    cache (fuseclone's default) leaves what it writes in the image's page cache, and sync(2)
    does not wait for a FUSE mount's writeback (Linux 6.18 here: it returned in 0.4 s with
    500 MiB still dirty on the mount, written back over the next seconds): a cold sample
    after writes then read part of the image from memory, beside that writeback. A loop
    device's flush fsyncs its backing file, which waits for it."""
    for device in sorted(_attached_loops):
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.sync()


def drop_caches() -> None:
    settle_writes()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def evict(*paths: str) -> None:
    """Drop these files' clean pages from the page cache: the copy rows read their source cold
    while every contender's program files stay cached, as on a machine in use. (drop_caches
    also evicts Python's own modules, which charged fuseclone ~0.13 s of disk reads per sample
    that nbdcopy, a small C program, does not pay.)"""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            # Dirty pages (a source file just written) are not dropped, only queued for
            # writeback, which then competes with the sample for the disk: write them out first.
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_through(path: str, chunk: int = 8 << 20) -> None:
    """Read PATH once, so its pages are in the page cache (a source that is "cached")."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        while f.readinto(buf):
            pass


# ---- background processes ---------------------------------------------------------------------


@dataclass
class Server:
    argv: list[str]
    proc: subprocess.Popen
    log_path: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def command_line(self) -> str:
        return shlex.join(self.argv)


def start_server(stack: contextlib.ExitStack, argv: list[str], log_path: str,
                 ready=lambda: True, timeout: float = 15.0) -> Server:
    """Start ARGV in its own session (Ctrl-C reaches only us; we stop it in order), wait until
    READY() is true, and register its termination on STACK."""
    logf = open(log_path, "ab")
    log.debug("& %s", shlex.join(argv))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                            start_new_session=True)
    logf.close()
    server = Server(argv, proc, log_path)
    stack.callback(stop_process, proc)
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise BenchError(f"{argv[0]} exited {proc.returncode} at start: {tail(log_path)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{argv[0]} not ready after {timeout:.0f} s: {tail(log_path)}")
        time.sleep(0.05)
    return server


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("pid %d ignored SIGTERM: killing it", proc.pid)
        proc.kill()
        proc.wait(timeout)


def kill_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, one pid that is not our child."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not os.path.exists(f"/proc/{pid}"):
                return
            time.sleep(0.05)


def command_lines() -> list[tuple[int, list[str]]]:
    """(pid, arguments) of every process but this one whose command line can be read."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found.append((int(entry), f.read().decode(errors="replace").split("\0")))
        except OSError:
            continue  # gone, or not ours to read
    return found


def tail(path: str, n: int = 600) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


# ---- loop devices -----------------------------------------------------------------------------


@dataclass
class Loop:
    device: str
    backing: str
    dio: bool  # what the kernel reports in /sys/block/loopN/loop/dio, not what was asked

    @property
    def mode(self) -> str:
        return "dio=on" if self.dio else "dio=off"


def losetup(stack: contextlib.ExitStack, path: str, direct_io: bool, read_only: bool = False) -> Loop:
    cmd = ["losetup", "-f", "--show", f"--direct-io={'on' if direct_io else 'off'}"]
    if read_only:
        cmd.append("-r")
    device = run(cmd + [path]).stdout.decode().strip()
    _attached_loops.add(device)
    stack.callback(detach_loop, device)
    return Loop(device, path, loop_dio(device))


def loop_dio(device: str) -> bool:
    with open(f"/sys/block/{os.path.basename(device)}/loop/dio") as f:
        return f.read().strip() == "1"


def detach_loop(device: str, timeout: float = 20.0) -> None:
    """losetup -d, then wait until the kernel has really let go of the backing file (the
    detach is deferred while the device is open, and a FUSE unmount refuses until then)."""
    _attached_loops.discard(device)
    name = os.path.basename(device)
    deadline = time.monotonic() + timeout
    while True:
        proc = run(["losetup", "-d", device], check=False)
        if not os.path.exists(f"/sys/block/{name}/loop/backing_file"):
            return
        if time.monotonic() > deadline:
            log.warning("%s still attached: %s", device, proc.stderr.decode(errors="replace").strip())
            return
        time.sleep(0.1)


# ---- mounts -----------------------------------------------------------------------------------


def mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(_unescape(line.split()[1]) == real for line in f if len(line.split()) > 1)


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount(stack: contextlib.ExitStack, device: str, mountpoint: str, options: str | None = None) -> None:
    os.makedirs(mountpoint, exist_ok=True)
    run(["mount", *(["-o", options] if options else []), device, mountpoint])
    stack.callback(umount, mountpoint)


def umount(mountpoint: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while mounted(mountpoint):
        proc = run(["umount", mountpoint], check=False)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            log.warning("%s busy: lazy unmount (%s)", mountpoint, proc.stderr.decode(errors="replace").strip())
            run(["umount", "-l", mountpoint], check=False)
            return
        time.sleep(0.2)


# ---- scratch files ----------------------------------------------------------------------------


def random_file(path: str, size: int, chunk: int = 4 << 20) -> str:
    """A file of SIZE random bytes (no zero blocks, incompressible); kept if it already exists
    with that size."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return path
    with open(path + ".part", "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())  # on disk before any row reads it "cold"
    os.replace(path + ".part", path)
    return path


def remove(*paths: str) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak), RssAnon, RssFile of PID in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "VmSize"):
                out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of PID (all its threads) so far; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU use of some processes over a stretch of wall time, as a percentage of one core."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = time.perf_counter()
        self.c0 = {k: cpu_seconds(p) for k, p in pids.items()}

    def percent(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        out = {}
        for k, p in self.pids.items():
            c1 = cpu_seconds(p)
            if c1 is not None and self.c0[k] is not None and wall > 0:
                out[k] = round(100 * (c1 - self.c0[k]) / wall, 1)
        return out


def leftovers(workdir: str) -> dict[str, list[str]]:
    """What `grep fuse /proc/mounts; losetup -a; pgrep -a nbdkit; pgrep -a qemu-storage` and
    PostgreSQL servers (row 10's) show,
    split into lines that mention WORKDIR (ours: a leak) and the rest (other users')."""
    found: dict[str, list[str]] = {}
    with open("/proc/mounts") as f:
        found["mounts"] = [l.strip() for l in f if "fuse" in l]
    found["loops"] = run(["losetup", "-a"], check=False).stdout.decode().splitlines()
    found["nbdkit"] = run(["pgrep", "-a", "nbdkit"], check=False).stdout.decode().splitlines()
    found["qemu-storage"] = run(["pgrep", "-a", "qemu-storage"], check=False).stdout.decode().splitlines()
    found["postgres"] = run(["pgrep", "-a", "-f", "postgres -D"], check=False).stdout.decode().splitlines()
    ancestors = own_ancestors()
    found["fuseclone"] = [l for l in run(["pgrep", "-a", "-f", "fuseclone"], check=False).stdout.decode().splitlines()
                          if workdir in l and int(l.split()[0]) not in ancestors]
    return found


def own_ancestors() -> set[int]:
    """This process and the ones that started it, whose command lines may name the workdir
    (e.g. `flock /tmp/fuseclone-bench.lock python -m benchmarks --workdir ...`)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def versions() -> dict[str, str]:
    def first_line(cmd):
        try:
            return run(cmd, check=False, timeout=10).stdout.decode().splitlines()[0].strip()
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    return {"fio": first_line(["fio", "--version"]),
            "qemu-storage-daemon": first_line(["qemu-storage-daemon", "--version"]),
            "nbdkit": first_line(["nbdkit", "--version"]),
            "nbdcopy": first_line(["nbdcopy", "--version"]),
            "kernel": os.uname().release}
