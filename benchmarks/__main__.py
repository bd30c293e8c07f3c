"""python -m benchmarks [--quick] [--only ROWS] [--out DIR]

Measures every row of SPEC's performance targets against its anchors, on this machine, in one
run, and prints medians and ratios; writes DIR/latest.json and DIR/latest.png. Needs root (loop
devices, mounts, drop_caches). Cleans up every mount, loop device and server it started, also on
failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shutil
import signal
import sys
import time
import traceback

from rich.console import Console

from . import report, subject
from .rows import ROWS, Bench, Profile
from .stats import Metric
from .system import (WORKDIR_DEFAULT, command_lines, detach_loop, kill_pid, leftovers, log, own_ancestors, run, umount,
                     versions)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_rows(text: str | None) -> list[int]:
    """'1,3-5' -> [1, 3, 4, 5]."""
    if not text:
        return sorted(ROWS)
    rows: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            rows.update(range(int(lo), int(hi) + 1))
        elif part:
            rows.add(int(part))
    unknown = rows - set(ROWS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown rows {sorted(unknown)} (rows are {sorted(ROWS)})")
    return sorted(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller files, shorter fio runs, 3 repetitions (< 10 min)")
    ap.add_argument("--only", metavar="ROWS", help="rows to run, e.g. 1,3-5 (default: all)")
    ap.add_argument("--out", metavar="DIR", default=os.path.join(REPO, "bench-results"),
                    help="where latest.json and latest.png go (default: bench-results/ in the repo)")
    ap.add_argument("--reps", type=int, help="repetitions per figure (default 3 quick, 5 full)")
    ap.add_argument("--workdir", default=WORKDIR_DEFAULT, help=f"scratch files (default {WORKDIR_DEFAULT})")
    ap.add_argument("--keep", action="store_true", help="keep the scratch files (sources, images) afterwards")
    ap.add_argument("--r3-sizes", metavar="MIB", help="row 3's image sizes in MiB, e.g. 512 (default: 512,4096)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every command")
    args = ap.parse_args(argv)
    try:
        args.rows = parse_rows(args.only)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        ap.error(str(exc))
    return args


def install_signal_handlers(console: Console) -> None:
    """First Ctrl-C / SIGTERM: raise KeyboardInterrupt so every ExitStack unwinds. Later ones
    are ignored, so they cannot cut the cleanup short."""

    def first(signum, frame):
        signal.signal(signal.SIGINT, later)
        signal.signal(signal.SIGTERM, later)
        raise KeyboardInterrupt

    def later(signum, frame):
        console.print("[yellow]cleaning up, please wait[/]")

    signal.signal(signal.SIGINT, first)
    signal.signal(signal.SIGTERM, first)


def clean_previous_run(workdir: str, console: Console) -> None:
    """Undo what a killed earlier run left under WORKDIR: loop devices on its files, mounts in
    it, and servers whose command line names it (by pid)."""
    real = os.path.realpath(workdir)
    for name in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing.startswith(real + "/"):
            console.print(f"[yellow]detaching leftover /dev/{name} ({backing})[/]")
            detach_loop(f"/dev/{name}")
    for point, fstype in reversed(mounts_under(real)):  # ext4 on loop devices first, FUSE after
        console.print(f"[yellow]unmounting leftover {point} ({fstype})[/]")
        if fstype == "fuse.fuseclone":
            run([*subject.FUSECLONE, "unmount", point], check=False)
        umount(point)
    ancestors = own_ancestors()
    for pid, args in command_lines():
        if pid not in ancestors and is_leftover_server(args, real):
            console.print(f"[yellow]stopping leftover pid {pid}: {' '.join(args)[:120]}[/]")
            kill_pid(pid)


def is_leftover_server(args: list[str], workdir: str) -> bool:
    """Whether a process with these arguments is a server an earlier run in WORKDIR started:
    nbdkit, qemu-storage-daemon, a fuseclone mount or PostgreSQL, naming a file in WORKDIR. Path
    boundaries count: /var/tmp/b is not in /var/tmp/b2, and another run's `flock
    /tmp/fuseclone-bench.lock ...` waiting for its turn is no fuseclone."""
    program = os.path.basename(args[0]) if args else ""
    server = (program in ("nbdkit", "qemu-storage-daemon", "fuseclone", "postgres")
              or args[1:3] == ["-m", "fuseclone"])
    return server and any(a == workdir or workdir + "/" in a for a in args[1:])


def mounts_under(real: str) -> list[tuple[str, str]]:
    with open("/proc/self/mounts") as f:
        fields = [line.split() for line in f]
    return [(fl[1], fl[2]) for fl in fields if len(fl) > 2 and fl[1].startswith(real + "/")]


def remove_workdir(workdir: str, console: Console) -> None:
    """Delete the scratch files, but never descend into something still mounted there."""
    busy = mounts_under(os.path.realpath(workdir))
    if busy:
        console.print(f"[red]not removing {workdir}: still mounted there: {busy}[/]")
        return
    shutil.rmtree(workdir, ignore_errors=True)


def error_metric(row: int, exc: BaseException) -> Metric:
    m = Metric(row, f"r{row}.error", f"row {row} failed", "")
    m.notes.append("".join(traceback.format_exception_only(type(exc), exc)).strip())
    return m


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    width = int(os.environ.get("COLUMNS", "0")) or (None if sys.stdout.isatty() else 200)
    console = Console(highlight=False, width=width)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(message)s")
    if os.geteuid() != 0:
        console.print("[red]the benchmark needs root (loop devices, mounts, drop_caches)[/]")
        return 2
    for tool in ("fio", "losetup", "qemu-storage-daemon", "qemu-img", "nbdkit", "nbdcopy", "mkfs.ext4"):
        if shutil.which(tool) is None:
            console.print(f"[red]{tool} is missing: run ./run setup[/]")
            return 2

    if subject.unavailable_reason() is None:
        subject.compile_fuseclone()
    profile = Profile.quick() if args.quick else Profile.full()
    if args.reps:
        profile.reps = args.reps
    if args.r3_sizes:
        profile.r3_sizes = tuple(int(mib) * 1024 * 1024 for mib in args.r3_sizes.split(","))
    os.makedirs(args.workdir, exist_ok=True)
    clean_previous_run(args.workdir, console)
    bench = Bench(workdir=args.workdir, profile=profile, say=console.print,
                  fuseclone_reason=subject.unavailable_reason(), nbd_reason=subject.nbd_unavailable_reason())
    for reason in (bench.fuseclone_reason, bench.nbd_reason):
        if reason:
            console.print(f"[yellow]note: {reason}; fuseclone's figures that need it are skipped[/]")

    started = datetime.datetime.now().astimezone()
    t0 = time.monotonic()
    metrics: list[Metric] = []
    row_seconds: dict[int, float] = {}
    row_load: dict[int, list[float]] = {}  # load average as each row starts: how busy the machine was
    interrupted = False
    install_signal_handlers(console)
    try:
        for n in args.rows:
            console.rule(f"row {n}: {ROWS[n].__doc__ or ROWS[n].__name__}")
            t_row = time.monotonic()
            row_load[n] = [round(x, 2) for x in os.getloadavg()]
            try:
                metrics += ROWS[n](bench)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - a broken row is reported, the others still run
                log.debug("row %d", n, exc_info=True)
                console.print(f"[red]row {n} failed: {exc}[/]")
                metrics.append(error_metric(n, exc))
            row_seconds[n] = time.monotonic() - t_row
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]interrupted: reporting what was measured[/]")
    finally:
        if not args.keep:
            remove_workdir(args.workdir, console)

    left = leftovers(os.path.realpath(args.workdir))
    ours = {k: [l for l in v if os.path.realpath(args.workdir) in l] for k, v in left.items()}
    ours = {k: v for k, v in ours.items() if v}
    title = (f"fuseclone benchmark, {started:%Y-%m-%d %H:%M %Z}, {profile.name} profile, "
             f"{os.cpu_count()} CPUs, kernel {os.uname().release}"
             + (" (INTERRUPTED)" if interrupted else ""))
    report.print_report(console, metrics, title, bench.commands)

    os.makedirs(args.out, exist_ok=True)
    doc = {"date": started.isoformat(timespec="seconds"), "machine": report.machine(),
           "versions": versions(), "profile": profile.__dict__, "rows": args.rows,
           "interrupted": interrupted, "duration_s": time.monotonic() - t0, "row_seconds": row_seconds,
           "load_average_at_row_start": row_load,
           "fuseclone_unavailable": bench.fuseclone_reason, "nbd_unavailable": bench.nbd_reason,
           "summary": report.summary(metrics), "metrics": [m.to_dict() for m in metrics],
           "commands": bench.commands, "leftovers_after_run": left}
    json_path = os.path.join(args.out, "latest.json")
    report.write_json(json_path, doc)
    png_path = os.path.join(args.out, "latest.png")
    why_not = report.write_chart(png_path, metrics, title)
    console.print(f"\nwrote {json_path}" + (f" and {png_path}" if why_not is None else f" (no chart: {why_not})"))
    console.print(f"took {time.monotonic() - t0:,.0f} s")
    if ours:
        console.print(f"[red]LEFT BEHIND by this run: {ours}[/]")
        return 1
    console.print("clean: no mount, loop device or server of this run is left "
                  "(grep fuse /proc/mounts; losetup -a; pgrep -a nbdkit; pgrep -a qemu-storage)")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
