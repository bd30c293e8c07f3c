"""PostgreSQL for the database row: the server's binaries (Debian's `postgresql`), a cluster laid
out in a directory, started on a Unix socket of its own, and pgbench's TPS."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
from dataclasses import dataclass

from .system import BenchError, command_lines, kill_pid, run

USER = "postgres"  # the server refuses to run as root
PORT = 5499  # only on a Unix socket inside the data directory: no TCP, no clash with a real server
SETTINGS = ["-c", "shared_buffers=128MB", "-c", "listen_addresses=", "-c", f"port={PORT}"]


def binaries() -> str | None:
    """The directory holding initdb, pg_ctl and pgbench (the newest installed), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(re.sub(r"\D", "", p.split("/")[4]) or 0))
    if found:
        bindir = os.path.dirname(found[-1])
    elif shutil.which("pg_ctl"):
        bindir = os.path.dirname(os.path.realpath(shutil.which("pg_ctl")))
    else:
        return None
    if not all(os.access(os.path.join(bindir, b), os.X_OK) for b in ("initdb", "pg_ctl", "pgbench")):
        return None
    return bindir


def missing_reason() -> str | None:
    """Why the row cannot run here, in one line, or None."""
    if binaries() is None:
        return "PostgreSQL is not installed (Debian package postgresql: initdb, pg_ctl, pgbench)"
    try:
        run(["id", "-u", USER])
    except BenchError:
        return f"no {USER!r} user to run the server as"
    return None


@dataclass
class Cluster:
    datadir: str
    bindir: str

    def _as_user(self, program: str, *args: str, timeout: float = 300) -> str:
        cmd = ["runuser", "-u", USER, "--", os.path.join(self.bindir, program), *args]
        return run(cmd, timeout=timeout).stdout.decode(errors="replace")

    def init(self) -> None:
        os.makedirs(self.datadir, exist_ok=True)
        shutil.chown(self.datadir, USER, USER)
        os.chmod(self.datadir, 0o700)
        self._as_user("initdb", "-D", self.datadir, "--no-sync", "-A", "trust", "-U", USER)

    @contextlib.contextmanager
    def running(self):
        """The server, started (waiting until it answers) and stopped (fast: a checkpoint).
        Killed where pg_ctl cannot stop it (qsd's export once corrupted the filesystem under
        it: "could not open PID file ... Bad message"), so that no server is left holding the
        filesystem, and with it a loop device, busy; the failure is still raised."""
        log = os.path.join(self.datadir, "server.log")
        options = " ".join([*SETTINGS, "-c", f"unix_socket_directories={self.datadir}"])
        try:
            self._as_user("pg_ctl", "-D", self.datadir, "-l", log, "-o", options, "-w", "start")
        except BaseException:
            self.kill_servers()
            raise
        try:
            yield self
        finally:
            try:
                self._as_user("pg_ctl", "-D", self.datadir, "-m", "fast", "-w", "stop")
            finally:
                self.kill_servers()

    def kill_servers(self) -> None:
        """Kill every process started with `-D` this data directory (a postmaster: its
        children end when it does)."""
        for pid in processes_with_args("-D", self.datadir):
            kill_pid(pid)

    def pgbench(self, *args: str, timeout: float = 600) -> str:
        return self._as_user("pgbench", "-h", self.datadir, "-p", str(PORT), *args, USER,
                             timeout=timeout)

    def tps(self, *args: str) -> float:
        """pgbench ARGS (a run); its TPS without the initial connection time."""
        out = self.pgbench(*args)
        found = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
        if not found:
            raise BenchError(f"pgbench printed no TPS: {out[-300:]}")
        return float(found.group(1))


def processes_with_args(*args: str) -> list[int]:
    """The pids of processes whose command line holds ARGS in a row."""
    wanted = list(args)
    return [pid for pid, argv in command_lines()
            if any(argv[i:i + len(wanted)] == wanted for i in range(len(argv)))]
