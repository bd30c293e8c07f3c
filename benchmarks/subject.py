"""fuseclone under test, driven the way a user drives it: `fuseclone mount`, `message`,
`unmount` as commands, progress read from the mount's control socket (the channel `fuseclone
status`/`wait` use; asking it directly avoids a CLI start-up per request, and its reply names
the daemon's pid, which /proc/PID/status needs for memory figures).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from dataclasses import dataclass, field

from .system import BenchError, command_lines, kill_pid, log, run, tail, umount

FUSECLONE = [sys.executable, "-m", "fuseclone"]


def unavailable_reason() -> str | None:
    """Why `fuseclone mount` cannot work in this checkout (None if it may)."""
    try:
        import fuseclone.fuse.fs  # noqa: F401
        import fuseclone.fuse.session  # noqa: F401
    except ImportError as exc:
        return f"fuseclone's FUSE layer is not importable yet ({exc})"
    return None


def compile_fuseclone() -> None:
    """Byte-compile fuseclone as pip does when it installs a package. An editable checkout has
    no bytecode, and with PYTHONDONTWRITEBYTECODE set every `fuseclone mount` would compile its
    modules first (~30 ms that an installed fuseclone does not spend)."""
    import compileall

    import fuseclone

    compileall.compile_dir(os.path.dirname(fuseclone.__file__), quiet=1)


def nbd_unavailable_reason() -> str | None:
    try:
        import fuseclone.sources.nbd  # noqa: F401
    except ImportError as exc:
        return f"fuseclone's NBD source is not importable yet ({exc})"
    return None


@dataclass
class Clone:
    src: str
    dst: str
    meta: str
    mountpoint: str
    log_path: str
    image: str = ""
    options: list[str] = field(default_factory=list)
    mount_seconds: float = 0.0

    @property
    def argv(self) -> list[str]:
        return [*FUSECLONE, "mount", self.src, self.dst, self.meta, self.mountpoint,
                "--log-file", self.log_path, *self.options]

    @property
    def command_line(self) -> str:
        return shlex.join(["fuseclone", *self.argv[len(FUSECLONE):]])

    # ---- control socket ----

    def request(self, req: dict, timeout: float = 10.0) -> dict | None:
        from fuseclone import control

        return control.request(self.meta, req, timeout=timeout)

    def status(self) -> dict:
        reply = self.request({"op": "status"})
        if reply is None:
            raise BenchError(f"the mount of {self.meta} does not answer: {tail(self.log_path)}")
        return reply

    @property
    def pid(self) -> int:
        return int(self.status()["pid"])

    def hydrated_bytes(self) -> int:
        st = self.status()["status"]
        return min(st["hydrated_regions"] * st["region_size"], st["image_size"])

    def complete(self) -> bool:
        st = self.status()["status"]
        return st["hydrated_regions"] == st["total_regions"]

    def wait(self, timeout: float = 600) -> float:
        """Block until hydration is complete; returns the time.perf_counter() it was seen. The
        mount answers a "wait" request the moment hydration is complete (and committed): no
        polling, which cost the daemon CPU and up to a poll interval of time."""
        reply = self.request({"op": "wait", "timeout": timeout}, timeout=timeout + 30)
        seen = time.perf_counter()
        if reply is None:
            raise BenchError(f"the mount of {self.meta} does not answer: {tail(self.log_path)}")
        st = reply["status"]
        if st["hydrated_regions"] == st["total_regions"]:
            return seen
        if st.get("hydration_error"):
            raise BenchError(f"hydration stopped: {st['hydration_error']}")
        raise BenchError(f"hydration not complete after {timeout:.0f} s "
                         f"({st['hydrated_regions']}/{st['total_regions']} regions)")

    def wait_hydrated(self, nbytes: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.hydrated_bytes() < nbytes:
            if time.monotonic() > deadline:
                raise BenchError(f"only {self.hydrated_bytes()} of {nbytes} bytes hydrated after {timeout:.0f} s")
            time.sleep(0.05)

    def message(self, text: str) -> None:
        run([*FUSECLONE, "message", self.mountpoint, *text.split()])

    def flush(self) -> None:
        """fsync the image: the clone makes DST durable and commits its metadata."""
        fd = os.open(self.image, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def mount(stack: contextlib.ExitStack, clone: Clone) -> Clone:
    """`fuseclone mount` CLONE and register its unmount on STACK. Sets clone.image and
    clone.mount_seconds (the command's wall time: it returns once the image can be opened)."""
    os.makedirs(os.path.dirname(clone.log_path), exist_ok=True)
    t0 = time.perf_counter()
    proc = run(clone.argv, check=False, timeout=300)
    clone.mount_seconds = time.perf_counter() - t0
    # Registered even on failure: a half-started daemon is found and stopped by its META.
    stack.callback(unmount, clone)
    if proc.returncode != 0:
        err = (proc.stderr.decode(errors="replace").strip() or tail(clone.log_path)).splitlines()
        raise BenchError(f"fuseclone mount failed: {err[-1] if err else proc.returncode}")
    out = proc.stdout.decode().strip().splitlines()
    clone.image = out[-1] if out else os.path.join(clone.mountpoint, "image")
    return clone


def daemon_pids(meta: str) -> list[int]:
    """Pids of fuseclone processes whose command line names META (fallback when the control
    socket does not answer)."""
    return [pid for pid, args in command_lines()
            if "mount" in args and meta in args and any("fuseclone" in a for a in args)]


def unmount(clone: Clone, timeout: float = 60) -> None:
    """`fuseclone unmount`; if that fails, stop the daemon by its pid and clean the mount."""
    from fuseclone import control

    if control.meta_of_mountpoint(clone.mountpoint) is not None:
        proc = run([*FUSECLONE, "unmount", clone.mountpoint, "--timeout", str(timeout)],
                   check=False, timeout=timeout + 30)
        if proc.returncode == 0:
            return
        log.warning("fuseclone unmount %s failed: %s", clone.mountpoint,
                    proc.stderr.decode(errors="replace").strip())
    for pid in daemon_pids(clone.meta):
        log.warning("stopping fuseclone daemon %d of %s", pid, clone.meta)
        kill_pid(pid)
    if control.meta_of_mountpoint(clone.mountpoint) is not None:
        umount(clone.mountpoint)
