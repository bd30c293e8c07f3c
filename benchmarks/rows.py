"""The rows of SPEC's target list, each a function `rowN(bench) -> list[Metric]`.

Every row sets up its own anchors and fuseclone mounts on an ExitStack that closes when the row
ends (however it ends). Repetitions are interleaved across contenders, in a rotating order, so a
burst of noise on this shared machine lands on all of them rather than on one. fuseclone's
figures are skipped with a note when its mount does not work (or its NBD source is missing);
the anchors are measured regardless.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from . import anchors, postgres, subject
from .fio import FioJob, fio_command, run_fio
from .stats import Metric, Target
from .system import (BenchError, CpuMeter, drop_caches, evict, losetup, mount, page_cache_bytes,
                     random_file, read_through, remove, rss_kib, run, tail)

MiB = 1 << 20
GiB = 1 << 30


@dataclass
class Profile:
    name: str
    reps: int
    fio_runtime: float
    fio_ramp: float
    r1_size: int  # hydrated image for the fio rows
    r2_size: int  # local-source hydration
    # source hydrating while fio measures latency: large enough that hydration (250-400 MB/s
    # here) outlasts fio (with 1 GiB in 3 s it finished early in two of three quick samples)
    r4_size: int
    r4_hot: int  # pre-hydrated part fio reads
    r4_runtime: float
    r5_sizes: tuple[int, ...] = (16 * GiB, 1 * GiB)
    r5_payload: int = 4 * MiB
    r6_size: int = 1 << 40
    r6_io_runtime: float = 3.0
    r6_hydrate_seconds: float = 3.0
    r7_size: int = 512 * MiB  # ext4 image a database-like fio job runs on
    r3_sizes: tuple[int, ...] = (512 * MiB, 4 * GiB)  # NBD hydration, source cached and not
    r8_size: int = 512 * MiB  # S3 object hydrated from SeaweedFS
    r8_fleet_size: int = 256 * MiB  # object four clones hydrate at once
    r10_runtime: float = 8.0  # seconds per pgbench run (read-write, then select-only)

    @classmethod
    def quick(cls) -> "Profile":
        return cls("quick", reps=3, fio_runtime=2, fio_ramp=0.5, r1_size=256 * MiB,
                   r2_size=512 * MiB, r4_size=3 * GiB, r4_hot=64 * MiB,
                   r4_runtime=3)

    @classmethod
    def full(cls) -> "Profile":
        return cls("full", reps=5, fio_runtime=5, fio_ramp=1, r1_size=1 * GiB,
                   r2_size=1 * GiB, r4_size=4 * GiB, r4_hot=256 * MiB,
                   r4_runtime=5, r6_io_runtime=10, r6_hydrate_seconds=5, r7_size=1 * GiB,
                   r8_size=1 * GiB, r8_fleet_size=512 * MiB,
                   r10_runtime=15.0)


@dataclass
class Bench:
    """What every row gets: where to put files, how hard to try, where to say what it does."""

    workdir: str
    profile: Profile
    say: Callable[[str], None] = print
    commands: dict[str, str] = field(default_factory=dict)  # exact command lines, for the report
    fuseclone_reason: str | None = None  # why fuseclone cannot mount, if it cannot
    nbd_reason: str | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def log_path(self, name: str) -> str:
        os.makedirs(self.path("logs"), exist_ok=True)
        return os.path.join(self.workdir, "logs", name)

    def fio(self, filename: str, rw: str, bs: str, iodepth: int = 16, runtime: float | None = None,
            size: int | None = None) -> FioJob:
        return FioJob(filename=filename, rw=rw, bs=bs, iodepth=iodepth,
                      runtime=runtime or self.profile.fio_runtime, ramp_time=self.profile.fio_ramp,
                      size=str(size) if size else None)

    def clone(self, tag: str, src: str, options: list[str] = (), mountpoint: str | None = None) -> subject.Clone:
        """A fresh clone (no DST, no META yet) of SRC with a directory mountpoint."""
        dst, meta = self.path(f"{tag}-dst.img"), self.path(f"{tag}.meta")
        remove(dst, meta)
        mnt = mountpoint or self.path(f"{tag}-mnt")
        os.makedirs(mnt, exist_ok=True)
        return subject.Clone(src=src, dst=dst, meta=meta, mountpoint=mnt,
                             log_path=self.log_path(f"{tag}.log"), options=list(options))


PASSTHROUGH = "fuseclone passthrough"  # a complete clone mounted with --passthrough


def passthrough_clone(stack: contextlib.ExitStack, bench: Bench, src: str, tag: str) -> subject.Clone:
    """A clone hydrated by one mount, then mounted again with --passthrough: complete at mount,
    so the kernel reads and writes its DST without the daemon. Unmounted and removed by STACK."""
    clone = bench.clone(tag, src)
    stack.callback(remove, clone.dst, clone.meta)
    with contextlib.ExitStack() as hydrating:
        subject.mount(hydrating, clone)
        clone.wait(timeout=600)
    clone.options = [*clone.options, "--passthrough"]
    subject.mount(stack, clone)
    bench.commands["fuseclone mount (passthrough, once complete)"] = clone.command_line
    if not clone.status()["status"].get("passthrough"):
        raise BenchError(f"the mount got no FUSE passthrough: {tail(clone.log_path)}")
    return clone


def rotated(items: list, rep: int) -> list:
    k = rep % len(items)
    return items[k:] + items[:k]


class Contender:
    """Runs one contender's measurement per repetition; after its first failure it stops trying
    and leaves the note on its figure."""

    def __init__(self, metric: Metric, name: str, measure: Callable[[], float],
                 skip_reason: str | None = None) -> None:
        self.metric, self.name, self.measure = metric, name, measure
        self.failed = skip_reason
        if skip_reason:
            metric.skip([name], skip_reason)

    def run(self, bench: Bench, label: str) -> None:
        if self.failed:
            return
        try:
            value = self.measure()
        except BenchError as exc:
            self.failed = str(exc)
            self.metric.skip([self.name], f"failed: {exc}")
            bench.say(f"  {label} {self.name}: [red]failed[/]: {exc}")
            return
        self.metric.figure(self.name).add(value)
        bench.say(f"  {label} {self.name}: {value:,.1f} {self.metric.unit}")


# ---- row 1: hydrated data through a loop device ------------------------------------------------

R1_TESTS = [  # key, label, unit, fio rw, bs, SPEC's factor over qsd
    ("randread4k", "4 KiB random read (hydrated)", "IOPS", "randread", "4k", 2.0),
    ("randwrite4k", "4 KiB random write (hydrated)", "IOPS", "randwrite", "4k", 2.0),
    ("read1m", "1 MiB sequential read (hydrated)", "MB/s", "read", "1M", 5.0),
    ("write1m", "1 MiB sequential write (hydrated)", "MB/s", "write", "1M", 5.0),
    ("randread4k_cold", "4 KiB random read (hydrated, cold)", "IOPS", "randread", "4k", 1.0),
    ("randread4k_cold_qd1", "4 KiB random read (hydrated, cold, iodepth 1)", "IOPS", "randread", "4k", 1.0),
]
# Cold tests drop every page cache before each sample (a clone larger than RAM, steady state).
R1_COLD = {"randread4k_cold", "randread4k_cold_qd1"}
R1_IODEPTH = {"randread4k_cold_qd1": 1}
R1_WHO = ["fuseclone", PASSTHROUGH, "qsd", "raw"]
R1_MODES = ["dio=off", "dio=on"]
# Page cache that a cold read through a buffered loop device leaves behind, per GiB read: the
# loop's backing file keeps what it read (the raw loop: one copy); DST's cache must not add one.
R1_CACHED_READ = 256 * MiB


def r1_page_cache_metric() -> Metric:
    m = Metric(1, "r1.cached_per_gib", "page cache per GiB read cold through a buffered loop device",
               "MiB", False, targets=[Target("fuseclone / raw loop (one copy)", ["fuseclone"], "<=", 1.1,
                                             ["raw"], info=True)])
    for who in R1_WHO:
        m.figure(who)
    m.notes.append(f"`Cached` (/proc/meminfo) after minus before dd bs=1M iflag=direct of "
                   f"{R1_CACHED_READ // MiB} MiB from a dio=off loop device, caches dropped first; per GiB read")
    return m


def page_cache_per_gib(device: str) -> float:
    """MiB of page cache left per GiB read cold from `device` (a buffered loop device)."""
    drop_caches()
    before = page_cache_bytes()
    run(["dd", f"if={device}", "of=/dev/null", "bs=1M", f"count={R1_CACHED_READ // MiB}",
         "iflag=direct", "status=none"])
    return (page_cache_bytes() - before) / MiB * (GiB / R1_CACHED_READ)


def row1(bench: Bench) -> list[Metric]:
    """hydrated data through a loop device: fio 4 KiB random and 1 MiB sequential, fuseclone vs qsd's FUSE export vs the raw loop device"""
    p = bench.profile
    metrics = {}
    for key, label, unit, rw, bs, factor in R1_TESTS:
        fc, pt, qsd, raw = ([f"{who} {mode}" for mode in R1_MODES] for who in R1_WHO)
        cold = key in R1_COLD  # SPEC "Performance": cold hydrated reads ≥ 0.8× the raw loop
        targets = [Target(f"≥ {factor:g}× qsd (best loop mode each)", fc, ">=", factor, qsd),
                   Target("fraction of raw loop (best modes)", fc, ">=", 0.8 if cold else 0.0, raw,
                          info=not cold)]
        targets += [Target(f"fuseclone / qsd at loop {mode}", [f"fuseclone {mode}"], ">=", factor,
                           [f"qsd {mode}"], info=True) for mode in R1_MODES]
        targets.append(Target("passthrough: fraction of raw loop (best modes)", pt, ">=", 0.8, raw,
                              info=True))
        m = Metric(1, f"r1.{key}", label, unit, True, targets=targets)
        for who in R1_WHO:
            for mode in R1_MODES:
                m.figure(f"{who} {mode}")
        m.notes.append(f"fio {rw} bs={bs} iodepth={R1_IODEPTH.get(key, 16)} libaio direct=1 on a loop device; "
                       f"{p.fio_runtime:g} s + {p.fio_ramp:g} s ramp per sample; image {p.r1_size // MiB} MiB, "
                       + ("page caches dropped before each sample" if key in R1_COLD
                          else "warmed by one sequential read pass per loop device"))
        metrics[key] = m
    cached = r1_page_cache_metric()

    src = random_file(bench.path(f"src-random-{p.r1_size}.img"), p.r1_size)
    with contextlib.ExitStack() as stack:
        files: dict[str, str] = {}  # who -> file that a loop device is put on
        pids: dict[str, int] = {}  # who -> daemon pid, for its CPU use during each fio run
        raw_file = bench.path("r1-raw.img")
        run(["cp", "--sparse=never", src, raw_file])
        stack.callback(remove, raw_file)
        files["raw"] = raw_file

        try:
            server = qsd_export_of_copy(stack, bench, src, "r1", sparse="never")
            files["qsd"] = server.export
            pids["qsd"] = server.pid
        except BenchError as exc:
            for m in metrics.values():
                m.skip([f"qsd {mode}" for mode in R1_MODES], f"qsd FUSE export failed: {exc}")
            cached.skip(["qsd"], f"qsd FUSE export failed: {exc}")

        fc_reason = bench.fuseclone_reason
        if not fc_reason:
            try:
                clone = bench.clone("r1", src)
                stack.callback(remove, clone.dst, clone.meta)
                subject.mount(stack, clone)
                bench.commands["fuseclone mount (row 1)"] = clone.command_line
                bench.say(f"  row 1: hydrating the {p.r1_size // MiB} MiB clone")
                clone.wait(timeout=600)
                clone.flush()
                files["fuseclone"] = clone.image
                pids["fuseclone"] = clone.pid
            except BenchError as exc:
                fc_reason = f"fuseclone mount/hydration failed: {exc}"
        if fc_reason:
            for m in metrics.values():
                m.skip([f"fuseclone {mode}" for mode in R1_MODES], fc_reason)
            cached.skip(["fuseclone"], fc_reason)
        pt_reason = bench.fuseclone_reason
        if not pt_reason:
            try:
                clone = passthrough_clone(stack, bench, src, "r1p")
                files[PASSTHROUGH] = clone.image
                pids[PASSTHROUGH] = clone.pid
            except BenchError as exc:
                pt_reason = f"fuseclone passthrough mount failed: {exc}"
        if pt_reason:
            for m in metrics.values():
                m.skip([f"{PASSTHROUGH} {mode}" for mode in R1_MODES], pt_reason)
            cached.skip([PASSTHROUGH], pt_reason)

        who_up = [w for w in R1_WHO if w in files]
        for mode in R1_MODES:
            with contextlib.ExitStack() as loops_stack:
                loops = {}
                for who in who_up:
                    loop = losetup(loops_stack, files[who], direct_io=(mode == "dio=on"))
                    if loop.mode != mode:
                        for m in metrics.values():
                            m.skip([f"{who} {mode}"], f"losetup --direct-io=on fell back to dio=off for {who}")
                        bench.say(f"  row 1: {who}: the loop device refused direct I/O")
                        continue
                    loops[who] = loop
                    # warm every stack the same way: one sequential pass
                    run(["dd", f"if={loop.device}", "of=/dev/null", "bs=1M", "iflag=direct", "status=none"])
                bench.commands[f"losetup (row 1, {mode})"] = (
                    f"losetup -f --show --direct-io={mode.split('=')[1]} FILE")
                # the warm tests' repetitions first: a cold test's drop_caches would chill them
                for rep, cold in [(rep, cold) for cold in (False, True) for rep in range(p.reps)]:
                    for key, label, unit, rw, bs, _ in [t for t in R1_TESTS if (t[0] in R1_COLD) == cold]:
                        m = metrics[key]
                        for who in rotated(list(loops), rep):
                            job = bench.fio(loops[who].device, rw, bs, iodepth=R1_IODEPTH.get(key, 16))
                            bench.commands.setdefault(f"fio (row 1, {key})", " ".join(
                                fio_command(replace(job, filename="/dev/loopN"))))
                            if key in R1_COLD:
                                drop_caches()
                            meter = CpuMeter({who: pids[who]} if who in pids else {})
                            try:
                                res = run_fio(job)
                            except Exception as exc:  # noqa: BLE001 - one failed sample is reported, not fatal
                                bench.say(f"  row 1 {who} {mode} {rw}: [red]fio failed[/]: {exc}")
                                m.figure(f"{who} {mode}").note = f"fio failed: {exc}"
                                continue
                            side = res.side(rw)
                            value = side.iops if unit == "IOPS" else side.mb_per_s
                            cpu = meter.percent().get(who)
                            m.figure(f"{who} {mode}").add(value, p99_us=side.percentile(99), daemon_cpu_pct=cpu)
                            bench.say(f"  rep {rep + 1}/{p.reps} {label}: {who} {mode}: {value:,.0f} {unit}"
                                      + (f" [dim](daemon CPU {cpu:.0f}%)[/]" if cpu is not None else ""))
                for rep in range(p.reps if mode == "dio=off" else 0):
                    for who in rotated(list(loops), rep):
                        value = page_cache_per_gib(loops[who].device)
                        cached.figure(who).add(value)
                        bench.say(f"  rep {rep + 1}/{p.reps} page cache per GiB read: {who}: {value:,.0f} MiB")
    return [*metrics.values(), cached]


@dataclass
class QsdExport:
    export: str  # the file a loop device is put on
    pid: int


def qsd_export_of_copy(stack: contextlib.ExitStack, bench: Bench, src: str, tag: str,
                       sparse: str) -> QsdExport:
    """qemu-storage-daemon's FUSE export of a copy of SRC (`cp --sparse=SPARSE`), for row TAG;
    stopped and removed when STACK closes."""
    qsd_file, qsd_export = bench.path(f"{tag}-qsd.img"), bench.path(f"{tag}-qsd-export.img")
    run(["cp", f"--sparse={sparse}", src, qsd_file])
    stack.callback(remove, qsd_file, qsd_export)
    server = anchors.qsd_fuse_export(stack, qsd_file, qsd_export, bench.log_path(f"{tag}-qsd.log"))
    bench.commands[f"qsd FUSE export (row {tag[1:]})"] = server.command_line
    return QsdExport(qsd_export, server.pid)


# ---- row 2: hydration from a local source ------------------------------------------------------


def row2(bench: Bench) -> list[Metric]:
    """hydration from a local source: fuseclone vs dd bs=1M conv=fsync vs qsd block-stream"""
    p = bench.profile
    size = p.r2_size
    m = Metric(2, "r2.hydrate_local", f"hydration from a local source ({size // MiB} MiB)", "MB/s",
               targets=[Target("≥ 0.8× dd", ["fuseclone"], ">=", 0.8, ["dd"]),
                        Target("fuseclone / qsd block-stream", ["fuseclone"], ">=", 0.0, ["qsd stream"], info=True)])
    m.notes.append("the source's page cache evicted before each sample; fuseclone: `fuseclone mount` start → "
                   "hydration complete → fsync of the image (DST and META durable); dd: conv=fsync; "
                   "qsd: start → block-stream complete → quit (flushes)")
    src = random_file(bench.path(f"src-random-{size}.img"), size)
    bench.commands["dd (row 2)"] = " ".join(anchors.dd_argv(src, bench.path("r2-dd.img")))
    bench.commands["qsd block-stream (row 2)"] = " ".join(
        anchors.qsd_stream_argv(src, bench.path("qsd-overlay.qcow2"), bench.path("qsd-qmp.sock")))
    bench.commands["qsd QMP (row 2)"] = anchors.QSD_STREAM_QMP
    bench.commands["qemu-img (row 2)"] = f"qemu-img create -f qcow2 -b {src} -F raw OVERLAY"

    def dd():
        evict(src)
        return size / anchors.dd_copy(src, bench.path("r2-dd.img")) / 1e6

    def qsd():
        evict(src)
        seconds, _ = anchors.qsd_stream(src, bench.workdir, bench.log_path("r2-qsd.log"))
        return size / seconds / 1e6

    def fc():
        return size / hydrate_once(bench, "r2", src, m, functools.partial(evict, src)) / 1e6

    contenders = [Contender(m, "dd", dd), Contender(m, "qsd stream", qsd),
                  Contender(m, "fuseclone", fc, bench.fuseclone_reason)]
    for rep in range(p.reps):
        for c in rotated(contenders, rep):
            c.run(bench, f"rep {rep + 1}/{p.reps}")
    return [m]


def hydrate_once(bench: Bench, tag: str, src: str, metric: Metric, before: Callable[[], None],
                 options: list[str] = ()) -> float:
    """Seconds from `fuseclone mount` to a complete, flushed hydration of a fresh clone of SRC
    (a path or URL), with BEFORE (e.g. evicting the source's data) run first, untimed."""
    clone = bench.clone(tag, src, options)
    try:
        with contextlib.ExitStack() as stack:
            before()
            t0 = time.perf_counter()
            subject.mount(stack, clone)
            t_ready = time.perf_counter()
            meter = CpuMeter({"daemon": clone.pid})
            t_done = clone.wait(timeout=900)
            clone.flush()
            t_flushed = time.perf_counter()
            cpu = meter.percent().get("daemon")
            st = clone.status()["status"]
            bench.commands.setdefault(f"fuseclone mount ({tag})", clone.command_line)
        bench.say(f"    fuseclone: mount {t_ready - t0:.2f} s, hydrate {t_done - t_ready:.2f} s, "
                  f"flush {t_flushed - t_done:.2f} s, daemon CPU {cpu}% of a core while hydrating")
        metric.figure("fuseclone").details.append(
            {"mount_s": t_ready - t0, "hydrate_s": t_done - t_ready, "flush_s": t_flushed - t_done,
             "daemon_cpu_pct": cpu,
             "source_bytes_read": st.get("source_bytes_read"), "region_size": st.get("region_size")})
        return t_flushed - t0
    finally:
        remove(clone.dst, clone.meta)


# ---- row 3: hydration from NBD with 2 ms latency -----------------------------------------------

R3_CASES = [  # key suffix, label, what happens to the served file's page cache before each sample
    ("cached", "source cached", "read once through, so nbdkit serves it from the page cache"),
    ("cold", "source uncached", "every page cache dropped (sync; drop_caches)"),
]


def row3(bench: Bench) -> list[Metric]:
    """hydration from NBD with 2 ms added latency, source cached and uncached: fuseclone vs nbdcopy"""
    p = bench.profile
    metrics = []
    for size in p.r3_sizes:
        cases = {}
        for key, label, how in R3_CASES:
            m = Metric(3, f"r3.hydrate_nbd_{size // MiB}M_{key}",
                       f"hydration from NBD, +2 ms per read ({size // MiB} MiB, {label})", "MB/s",
                       targets=[Target("≥ 0.8× nbdcopy", ["fuseclone"], ">=", 0.8, ["nbdcopy"])])
            m.notes.append(f"nbdkit delay filter rdelay=2ms on a unix socket; before each sample the served "
                           f"file's {how}; nbdcopy --flush (defaults: 4 connections × 64 requests) to a file "
                           "beside DST; fuseclone: mount → complete → fsync of the image")
            cases[key] = m
        metrics += cases.values()
        hydration_from_nbd(bench, size, cases)
    return metrics


def hydration_from_nbd(bench: Bench, size: int, cases: dict[str, Metric]) -> None:
    """Row 3 at one SIZE: every case's contenders interleaved, against one nbdkit."""
    p = bench.profile
    src = random_file(bench.path(f"src-random-{size}.img"), size)
    prepare = {"cached": functools.partial(read_through, src), "cold": drop_caches}
    with contextlib.ExitStack() as stack:
        nbd = anchors.nbdkit_server(stack, src, bench.path("r3-nbd.sock"), bench.log_path("r3-nbdkit.log"))
        bench.commands["nbdkit (rows 3, 5)"] = nbd.server.command_line
        nbdcopy_dst = bench.path("r3-nbdcopy.img")
        bench.commands["nbdcopy (row 3)"] = " ".join(anchors.nbdcopy_argv(nbd.uri, nbdcopy_dst))

        def nbdcopy(before: Callable[[], None]) -> float:
            before()
            return size / anchors.nbdcopy(nbd.uri, nbdcopy_dst) / 1e6

        def fc(m: Metric, before: Callable[[], None]) -> float:
            return size / hydrate_once(bench, "r3", nbd.uri, m, before) / 1e6

        contenders = []
        for key, m in cases.items():
            contenders += [Contender(m, "nbdcopy", functools.partial(nbdcopy, prepare[key])),
                           Contender(m, "fuseclone", functools.partial(fc, m, prepare[key]),
                                     bench.fuseclone_reason or bench.nbd_reason)]
        for rep in range(p.reps):
            for c in rotated(contenders, rep):
                c.run(bench, f"rep {rep + 1}/{p.reps} {c.metric.key}")


# ---- row 4: p99 read latency while hydrating ---------------------------------------------------


def row4(bench: Bench) -> list[Metric]:
    """p99 4 KiB read latency while hydrating vs idle"""
    p = bench.profile
    m = Metric(4, "r4.p99_hydrating", "p99 4 KiB read latency, hydrating vs idle", "µs", False,
               targets=[Target("≤ 3× idle", ["hydrating"], "<=", 3.0, ["idle"])])
    m.notes.append(f"fio randread 4k iodepth 1 direct=1, {p.r4_runtime:g} s, over the first "
                   f"{p.r4_hot // MiB} MiB of a {p.r4_size // MiB} MiB clone, pre-hydrated by reading it; "
                   "mounted --no-hydration, then `fuseclone message MNT enable_hydration` for the busy run")
    for name in ("idle", "hydrating"):
        m.figure(name)
    if bench.fuseclone_reason:
        m.skip(["idle", "hydrating"], bench.fuseclone_reason)
        return [m]
    src = random_file(bench.path(f"src-random-{p.r4_size}.img"), p.r4_size)
    for rep in range(p.reps):
        clone = bench.clone("r4", src, ["--no-hydration"])
        try:
            with contextlib.ExitStack() as stack:
                subject.mount(stack, clone)
                bench.commands["fuseclone mount (row 4)"] = clone.command_line
                loop = losetup(stack, clone.image, direct_io=True)
                run(["dd", f"if={loop.device}", "of=/dev/null", "bs=1M", f"count={p.r4_hot // MiB}",
                     "iflag=direct", "status=none"])
                clone.wait_hydrated(p.r4_hot)
                clone.flush()
                job = bench.fio(loop.device, "randread", "4k", iodepth=1, runtime=p.r4_runtime, size=p.r4_hot)
                drop_caches()
                idle = run_fio(job).read
                before = clone.hydrated_bytes()
                clone.message("enable_hydration")
                drop_caches()
                t0 = time.perf_counter()
                meter = CpuMeter({"daemon": clone.pid})
                busy = run_fio(job).read
                cpu = meter.percent().get("daemon")
                elapsed = time.perf_counter() - t0
                after = clone.hydrated_bytes()
                complete = clone.complete()
        except BenchError as exc:
            m.skip(["idle", "hydrating"], f"failed: {exc}")
            bench.say(f"  row 4: [red]failed[/]: {exc}")
            break
        finally:
            remove(clone.dst, clone.meta)
        rate = (after - before) / elapsed / 1e6
        m.figure("idle").add(idle.percentile(99), p50_us=idle.percentile(50), iops=idle.iops, loop=loop.mode)
        m.figure("hydrating").add(busy.percentile(99), p50_us=busy.percentile(50), iops=busy.iops,
                                  hydration_mb_s_during_fio=rate, hydration_complete_before_fio_end=complete,
                                  daemon_cpu_pct=cpu)
        if rep == 0:
            m.notes.append(f"loop device {loop.mode}"
                           + (" (every read reaches the daemon)" if loop.dio else
                              " (page cache dropped before each fio run)"))
        bench.say(f"  rep {rep + 1}/{p.reps}: p99 idle {idle.percentile(99):,.0f} µs, hydrating "
                  f"{busy.percentile(99):,.0f} µs (hydration ran at {rate:,.0f} MB/s meanwhile"
                  f"{', and finished early' if complete else ''}; daemon CPU {cpu}%; loop {loop.mode})")
    return [m]


# ---- row 5: time to first use ------------------------------------------------------------------


def ext4_image(bench: Bench, size: int, payload: int) -> tuple[str, str]:
    """A sparse SIZE file holding an ext4 filesystem with one PAYLOAD-byte random file in it.
    Returns (image path, sha256 of the file). Kept in the work directory between rows."""
    path = bench.path(f"r5-ext4-{size >> 30}G.img")
    sums = path + ".sha256"
    if os.path.exists(path) and os.path.exists(sums):
        with open(sums) as f:
            return path, f.read().strip()
    remove(path, sums)
    with open(path, "wb") as f:
        f.truncate(size)
    run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", path])
    data = os.urandom(payload)
    with contextlib.ExitStack() as stack:
        loop = losetup(stack, path, direct_io=False)
        mnt = bench.path("r5-build-mnt")
        mount(stack, loop.device, mnt)
        with open(os.path.join(mnt, "payload.bin"), "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
    digest = hashlib.sha256(data).hexdigest()
    with open(sums, "w") as f:
        f.write(digest)
    return path, digest


def row5(bench: Bench) -> list[Metric]:
    """time to first use of a 16 GiB (and 1 GiB) ext4 image behind 2 ms latency"""
    p = bench.profile
    names = [f"{s >> 30} GiB" for s in p.r5_sizes]
    m = Metric(5, "r5.first_use", "time to first use behind 2 ms (mount → losetup → mount ext4 → read)", "s",
               False, targets=[Target("< 2 s at 16 GiB", [names[0]], "<", 2.0),
                               Target("16 GiB / 1 GiB (not growing: ≤ 1.5)", [names[0]], "<=", 1.5,
                                      [names[-1]])])
    m.notes.append(f"fresh DST and META each sample, page cache dropped; reads {p.r5_payload // MiB} MiB "
                   "file; nbdkit delay filter rdelay=2ms; losetup default (buffered); ext4 mounted rw")
    for n in names:
        m.figure(n)
    reason = bench.fuseclone_reason or bench.nbd_reason
    if reason:
        m.skip(names, reason)
        return [m]
    with contextlib.ExitStack() as stack:
        servers = {}
        for size, name in zip(p.r5_sizes, names):
            img, digest = ext4_image(bench, size, p.r5_payload)
            nbd = anchors.nbdkit_server(stack, img, bench.path(f"r5-{size >> 30}G.sock"),
                                        bench.log_path(f"r5-nbdkit-{size >> 30}G.log"))
            servers[name] = (nbd, digest)
        for rep in range(p.reps):
            for name in rotated(names, rep):
                nbd, digest = servers[name]
                try:
                    seconds, parts = first_use_once(bench, nbd.uri, digest)
                except BenchError as exc:
                    m.skip(names, f"failed: {exc}")
                    bench.say(f"  row 5: [red]failed[/]: {exc}")
                    return [m]
                m.figure(name).add(seconds, **parts)
                bench.say(f"  rep {rep + 1}/{p.reps} {name}: {seconds:.2f} s "
                          + " ".join(f"{k}={v:.2f}" for k, v in parts.items()))
    return [m]


def first_use_once(bench: Bench, uri: str, digest: str) -> tuple[float, dict]:
    clone = bench.clone("r5", uri)
    fsmnt = bench.path("r5-fs")
    try:
        with contextlib.ExitStack() as stack:
            drop_caches()  # first use is cold: the program's files too
            t0 = time.perf_counter()
            subject.mount(stack, clone)
            t1 = time.perf_counter()
            loop = losetup(stack, clone.image, direct_io=False)
            t2 = time.perf_counter()
            mount(stack, loop.device, fsmnt)
            t3 = time.perf_counter()
            h = hashlib.sha256()
            with open(os.path.join(fsmnt, "payload.bin"), "rb") as f:
                while chunk := f.read(MiB):
                    h.update(chunk)
            t4 = time.perf_counter()
            bench.commands["fuseclone mount (row 5)"] = clone.command_line
            if h.hexdigest() != digest:
                raise BenchError("the file read through the clone differs from the one written")
    finally:
        remove(clone.dst, clone.meta)
    return t4 - t0, {"fuseclone_mount_s": t1 - t0, "losetup_s": t2 - t1, "mount_ext4_s": t3 - t2,
                     "read_s": t4 - t3}


# ---- row 6: memory ------------------------------------------------------------------------------


def row6(bench: Bench) -> list[Metric]:
    """memory of a 1 TiB sparse clone with 4 KiB regions"""
    p = bench.profile
    m = Metric(6, "r6.rss", f"RSS of a {p.r6_size >> 40} TiB clone, 4 KiB regions", "MiB", False,
               targets=[Target("< 100 MiB after mount", ["after mount"], "<", 100),
                        Target("< 100 MiB after I/O", ["after I/O"], "<", 100),
                        Target("< 100 MiB peak (VmHWM)", ["peak"], "<", 100),
                        Target("< 100 MiB peak hydrating from NBD", ["NBD peak"], "<", 100),
                        Target("< 100 MiB peak hydrating from sparse NBD", ["NBD sparse peak"], "<", 100)])
    m.notes.append(f"sparse local source, mounted --no-hydration --region-size 4K; I/O = fio randrw 4k "
                   f"iodepth 16 for {p.r6_io_runtime:g} s over the whole image + 256 MiB sequential read "
                   f"through a loop device; then enable_hydration for {p.r6_hydrate_seconds:g} s; "
                   f"VmRSS/VmHWM from /proc/PID/status")
    m.notes.append(f"NBD: nbdkit pattern plugin (every byte data) behind rdelay=2ms, mounted with defaults, "
                   f"hydrating for {p.r6_hydrate_seconds:g} s")
    m.notes.append(f"NBD sparse: nbdkit sparse-random plugin, {' '.join(R6_SPARSE_ARGS)} (runs of data of "
                   f"odd lengths), no delay, the same way")
    names = ["after mount", "after I/O", "hydrating", "peak", "NBD hydrating", "NBD peak",
             "NBD sparse hydrating", "NBD sparse peak"]
    for n in names:
        m.figure(n)
    if bench.fuseclone_reason:
        m.skip(names, bench.fuseclone_reason)
        return [m]
    src = bench.path("r6-src-sparse.img")
    with open(src, "wb") as f:
        f.truncate(p.r6_size)
    clone = bench.clone("r6", src, ["--no-hydration", "--region-size", "4K"])
    try:
        with contextlib.ExitStack() as stack:
            subject.mount(stack, clone)
            bench.commands["fuseclone mount (row 6)"] = clone.command_line
            pid = clone.pid
            mib = lambda kib: kib / 1024  # noqa: E731
            r = rss_kib(pid)
            m.figure("after mount").add(mib(r["VmRSS"]), mount_s=clone.mount_seconds, **r)
            loop = losetup(stack, clone.image, direct_io=False)
            run_fio(FioJob(loop.device, "randrw", "4k", 16, p.r6_io_runtime, 0))
            run(["dd", f"if={loop.device}", "of=/dev/null", "bs=1M", "count=256", "iflag=direct", "status=none"])
            r = rss_kib(pid)
            m.figure("after I/O").add(mib(r["VmRSS"]), **r)
            clone.message("enable_hydration")
            time.sleep(p.r6_hydrate_seconds)
            r = rss_kib(pid)
            m.figure("hydrating").add(mib(r["VmRSS"]), complete=clone.complete(), **r)
            m.figure("peak").add(mib(r["VmHWM"]))
            bench.say("  row 6: RSS " + ", ".join(f"{f.name} {f.median:,.1f}" for f in m.figures if f.ok))
    except BenchError as exc:
        m.skip(names[:4], f"failed: {exc}")
        bench.say(f"  row 6: [red]failed[/]: {exc}")
    finally:
        remove(clone.dst, clone.meta, src)
    if bench.nbd_reason:
        m.skip(names[4:], bench.nbd_reason)
    else:
        rss_hydrating_from_nbd(bench, m, "NBD", "pattern", [], "2ms")
        rss_hydrating_from_nbd(bench, m, "NBD sparse", "sparse-random", R6_SPARSE_ARGS, None)
    return [m]


# A sparse VM disk behind NBD: runs of data of odd lengths, so copies read extents of ever new
# lengths (the receive buffers kept for reuse came on top of those in flight: peak 99-102 MiB).
# The seed makes every run hydrate the same image.
R6_SPARSE_ARGS = ["seed=1"]


def rss_hydrating_from_nbd(bench: Bench, m: Metric, name: str, plugin: str, args: list[str],
                           rdelay: str | None) -> None:
    """A clone of an image of the profile's size served by nbdkit's PLUGIN (with ARGS): its
    data has to cross the network, and hydration's buffers (the copies in flight) come on top
    of the bitmap. Figures `NAME hydrating` and `NAME peak`."""
    p = bench.profile
    clone = None
    tag = name.lower().replace(" ", "-")
    try:
        with contextlib.ExitStack() as stack:
            nbd = anchors.nbdkit_server(stack, "", bench.path(f"r6-{tag}.sock"),
                                        bench.log_path(f"r6-{tag}-nbdkit.log"), rdelay,
                                        [plugin, str(p.r6_size), *args])
            bench.commands[f"nbdkit (row 6, {name})"] = nbd.server.command_line
            clone = bench.clone(f"r6{tag}", nbd.uri, ["--region-size", "4K"])
            subject.mount(stack, clone)
            time.sleep(p.r6_hydrate_seconds)
            r = rss_kib(clone.pid)
            st = clone.status()["status"]
            m.figure(f"{name} hydrating").add(r["VmRSS"] / 1024, hydrated_bytes=clone.hydrated_bytes(),
                                              hydration_threshold=st.get("hydration_threshold"), **r)
            m.figure(f"{name} peak").add(r["VmHWM"] / 1024)
            bench.say(f"  row 6: from {name}, RSS {r['VmRSS'] / 1024:,.1f} MiB, peak {r['VmHWM'] / 1024:,.1f} MiB")
    except BenchError as exc:
        m.skip([f"{name} hydrating", f"{name} peak"], f"failed: {exc}")
        bench.say(f"  row 6 ({name}): [red]failed[/]: {exc}")
    finally:
        if clone is not None:
            remove(clone.dst, clone.meta)


# ---- row 7: a database's commits ---------------------------------------------------------------

R7_JOBS = 4
R7_FILE_SIZE = "64M"
R7_HYDRATING_RATE = "20M"  # --max-rate while hydrating: the source is still being copied at the end


def row7(bench: Bench) -> list[Metric]:
    """a database's commits: fio --fsync=1 4 KiB random writes, 4 jobs, on ext4 over a direct-I/O loop device"""
    p = bench.profile
    names = ["fuseclone hydrated", PASSTHROUGH, "fuseclone hydrating", "qsd", "raw"]
    m = Metric(7, "r7.fsync4k", "synced 4 KiB random writes on ext4 (fio --fsync=1, 4 jobs)", "IOPS", True,
               targets=[Target("≥ 0.8× raw (hydrated)", ["fuseclone hydrated"], ">=", 0.8, ["raw"]),
                        Target("≥ qsd (hydrated)", ["fuseclone hydrated"], ">=", 1.0, ["qsd"]),
                        Target("≥ 0.8× raw (hydrating)", ["fuseclone hydrating"], ">=", 0.8, ["raw"]),
                        Target("passthrough ≥ 0.8× raw", [PASSTHROUGH], ">=", 0.8, ["raw"], info=True)])
    m.notes.append(f"fio randwrite bs=4k fsync=1 numjobs={R7_JOBS} psync, one {R7_FILE_SIZE} file laid out "
                   f"first, {p.fio_runtime:g} s + {p.fio_ramp:g} s ramp; ext4 on a {p.r7_size // MiB} MiB image "
                   f"through losetup --direct-io=on; hydrating: a fresh clone each sample, --max-rate "
                   f"{R7_HYDRATING_RATE}, from a local file")
    for name in names:
        m.figure(name)
    # A commit's latency is its fsync's (fio's write is a page-cache copy): hydrating vs idle.
    lat = Metric(7, "r7.fsync_p99", "p99 fsync latency of a synced 4 KiB write, hydrating vs idle", "µs", False,
                 targets=[Target("≤ 3× idle", ["fuseclone hydrating"], "<=", 3.0, ["fuseclone hydrated"])])
    lat.notes.append("the same fio runs; idle: the hydrated clone")
    for name in names:
        lat.figure(name)
    src = bench.path(f"r7-ext4-{p.r7_size // MiB}M.img")
    if not os.path.exists(src):
        with open(src, "wb") as f:
            f.truncate(p.r7_size)
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", src])
    with contextlib.ExitStack() as stack:
        dirs = filesystems_on_dio_loops(stack, bench, [m, lat], src, "r7",
                                        lambda file, who: ext4_on_dio_loop(stack, bench, file, who))
        if bench.fuseclone_reason:
            for metric in (m, lat):
                metric.skip(["fuseclone hydrating"], bench.fuseclone_reason)
        contenders = [Contender(m, who, functools.partial(synced_writes, bench, m, lat, who, d))
                      for who, d in dirs.items()]
        if not bench.fuseclone_reason:
            contenders.append(Contender(m, "fuseclone hydrating",
                                        functools.partial(synced_writes_hydrating, bench, m, lat, src)))
        for rep in range(p.reps):
            for c in rotated(contenders, rep):
                c.run(bench, f"rep {rep + 1}/{p.reps}")
    return [m, lat]


def filesystems_on_dio_loops(stack: contextlib.ExitStack, bench: Bench, metrics: list[Metric], src: str,
                             tag: str, mount_fs: Callable[[str, str], str]) -> dict[str, str]:
    """The filesystem in SRC on four images, each through `mount_fs(file, short name)`: a copy
    ("raw"), qsd's FUSE export of a copy ("qsd"), fuseclone's clone once hydrated ("fuseclone
    hydrated"), and another complete clone mounted with --passthrough (PASSTHROUGH). Their
    directories by contender; a contender that failed is skipped in METRICS."""
    def skip(who: str, note: str) -> None:
        for m in metrics:
            m.skip([who], note)

    raw_file = bench.path(f"{tag}-raw.img")
    run(["cp", "--sparse=always", src, raw_file])
    stack.callback(remove, raw_file)
    dirs = {"raw": mount_fs(raw_file, "raw")}
    try:
        server = qsd_export_of_copy(stack, bench, src, tag, sparse="always")
        dirs["qsd"] = mount_fs(server.export, "qsd")
    except BenchError as exc:
        skip("qsd", f"qsd FUSE export failed: {exc}")
    if bench.fuseclone_reason:
        skip("fuseclone hydrated", bench.fuseclone_reason)
        skip(PASSTHROUGH, bench.fuseclone_reason)
        return dirs
    try:
        clone = bench.clone(tag, src)
        stack.callback(remove, clone.dst, clone.meta)
        subject.mount(stack, clone)
        bench.commands[f"fuseclone mount (row {tag[1:]})"] = clone.command_line
        clone.wait(timeout=600)
        dirs["fuseclone hydrated"] = mount_fs(clone.image, "fc")
    except BenchError as exc:
        skip("fuseclone hydrated", f"fuseclone mount/hydration failed: {exc}")
    try:
        dirs[PASSTHROUGH] = mount_fs(passthrough_clone(stack, bench, src, f"{tag}p").image, "fcp")
    except BenchError as exc:
        skip(PASSTHROUGH, f"fuseclone passthrough mount failed: {exc}")
    return dirs


def ext4_on_dio_loop(stack: contextlib.ExitStack, bench: Bench, file: str, tag: str) -> str:
    """Mount the ext4 filesystem in FILE through a direct-I/O loop device; its mountpoint, with
    fio's file laid out (and the first writes' costs paid) by a short run."""
    directory = mount_on_dio_loop(stack, bench, file, f"r7-{tag}-fs")
    run_fio(replace(synced_writes_job(bench, directory), runtime=1, ramp_time=0))
    return directory


def mount_on_dio_loop(stack: contextlib.ExitStack, bench: Bench, file: str, name: str) -> str:
    """Mount the filesystem in FILE through a direct-I/O loop device at bench.path(NAME)."""
    loop = losetup(stack, file, direct_io=True)
    if not loop.dio:
        raise BenchError(f"the loop device on {file} refused direct I/O")
    bench.commands["losetup (rows 7, 10)"] = "losetup -f --show --direct-io=on FILE"
    directory = bench.path(name)
    mount(stack, loop.device, directory)
    return directory


def synced_writes_job(bench: Bench, directory: str) -> FioJob:
    p = bench.profile
    return FioJob(filename=os.path.join(directory, "fio.dat"), rw="randwrite", bs="4k", iodepth=1,
                  runtime=p.fio_runtime, ramp_time=p.fio_ramp, ioengine="psync", direct=False,
                  size=R7_FILE_SIZE, extra=["--fsync=1", f"--numjobs={R7_JOBS}"])


def synced_writes(bench: Bench, m: Metric, lat: Metric, who: str, directory: str) -> float:
    """One sample: IOPS into M; the fsyncs' p99 into LAT (the write's own p99 into M's details)."""
    job = synced_writes_job(bench, directory)
    bench.commands.setdefault("fio (row 7)", " ".join(fio_command(replace(job, filename="MNT/fio.dat"))))
    try:
        res = run_fio(job)
    except Exception as exc:  # noqa: BLE001 - reported as this contender's failure
        raise BenchError(f"fio failed: {exc}") from exc
    m.figure(who).details.append({"p99_us": res.write.percentile(99)})
    if res.sync is not None:
        lat.figure(who).add(res.sync.percentile(99), p50_us=res.sync.percentile(50))
    return res.write.iops


def synced_writes_hydrating(bench: Bench, m: Metric, lat: Metric, src: str) -> float:
    """One sample on a fresh clone that hydrates (at --max-rate) all the while."""
    clone = bench.clone("r7h", src, ["--max-rate", R7_HYDRATING_RATE])
    try:
        with contextlib.ExitStack() as stack:
            subject.mount(stack, clone)
            bench.commands["fuseclone mount (row 7, hydrating)"] = clone.command_line
            directory = ext4_on_dio_loop(stack, bench, clone.image, "fch")
            iops = synced_writes(bench, m, lat, "fuseclone hydrating", directory)
            m.figure("fuseclone hydrating").details[-1]["complete_at_end"] = clone.complete()
            return iops
    finally:
        remove(clone.dst, clone.meta)


# ---- row 8: hydration from S3 (SeaweedFS) ------------------------------------------------------


def row8(bench: Bench) -> list[Metric]:
    """hydration from S3 (SeaweedFS on this host): fuseclone vs a boto3 download; four at once"""
    import subprocess

    p = bench.profile
    one = Metric(8, "r8.hydrate_s3", f"hydration from S3 / SeaweedFS ({p.r8_size // MiB} MiB)",
                 "MB/s", targets=[Target("≥ 0.8× boto3", ["fuseclone"], ">=", 0.8, ["boto3"])])
    four = Metric(8, "r8.hydrate_s3_x4",
                  f"four clones of one S3 object at once ({p.r8_fleet_size // MiB} MiB each), total",
                  "MB/s", targets=[Target("≥ 0.8× 4 boto3", ["fuseclone ×4"], ">=", 0.8,
                                          ["boto3 ×4"])])
    for m in (one, four):
        m.notes.append("weed server -s3 on 127.0.0.1, signatures checked; SeaweedFS's volume "
                       "files evicted from the page cache before each sample; boto3: "
                       "download_file (10 threads, 8 MiB parts) then fsync, in its own process; "
                       "fuseclone: mount → complete → fsync of the image (×4: the four mounts and "
                       "the four downloads each started at once)")
    with contextlib.ExitStack() as stack:
        os.makedirs(bench.path("r8-seaweedfs"), exist_ok=True)
        server = anchors.start_seaweedfs(bench.path("r8-seaweedfs"), bench.log_path("r8-weed.log"))
        stack.callback(anchors.stop_seaweedfs, server)
        bench.commands["SeaweedFS (row 8)"] = " ".join(server.argv)
        saved = {name: os.environ.get(name) for name in server.env()}
        os.environ.update(server.env())  # the fuseclone and boto3 processes read these
        stack.callback(_restore_env, saved)
        for key, size in (("r8-one.raw", p.r8_size), ("r8-fleet.raw", p.r8_fleet_size)):
            src = random_file(bench.path(f"src-random-{size}.img"), size)
            server.client().upload_file(src, anchors.S3_BUCKET, key)
        bench.commands["boto3 (row 8)"] = " ".join(
            anchors.boto3_download_argv(server, "KEY", "DST")[:2]) + " ..."

        def boto3(key: str, copies: int, size: int) -> float:
            for path in server.volume_files():
                evict(path)
            dsts = [bench.path(f"r8-boto3-{i}.img") for i in range(copies)]
            remove(*dsts)
            t0 = time.perf_counter()
            procs = [subprocess.Popen(anchors.boto3_download_argv(server, key, dst),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                     for dst in dsts]
            for proc in procs:
                _, err = proc.communicate(timeout=900)
                if proc.returncode:
                    raise BenchError(f"boto3 download failed: {err.decode()[-400:]}")
            seconds = time.perf_counter() - t0
            remove(*dsts)
            return copies * size / seconds / 1e6

        def fc_one() -> float:
            return p.r8_size / hydrate_once(bench, "r8", f"s3://{anchors.S3_BUCKET}/r8-one.raw",
                                            one, lambda: evict(*server.volume_files())) / 1e6

        def fc_four() -> float:
            return 4 * p.r8_fleet_size / hydrate_together(
                bench, "r8x4", f"s3://{anchors.S3_BUCKET}/r8-fleet.raw", 4,
                server.volume_files()) / 1e6

        contenders = [Contender(one, "boto3", lambda: boto3("r8-one.raw", 1, p.r8_size)),
                      Contender(one, "fuseclone", fc_one, bench.fuseclone_reason),
                      Contender(four, "boto3 ×4", lambda: boto3("r8-fleet.raw", 4, p.r8_fleet_size)),
                      Contender(four, "fuseclone ×4", fc_four, bench.fuseclone_reason)]
        for rep in range(p.reps):
            for c in rotated(contenders, rep):
                c.run(bench, f"rep {rep + 1}/{p.reps}")
    return [one, four]


def _restore_env(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def hydrate_together(bench: Bench, tag: str, src: str, count: int, cold_files: list[str]) -> float:
    """Seconds from COUNT `fuseclone mount`s of SRC (fresh clones, started at once, as the
    anchor starts its downloads) until every one is hydrated and flushed."""
    from concurrent.futures import ThreadPoolExecutor

    clones = [bench.clone(f"{tag}-{i}", src) for i in range(count)]
    try:
        with contextlib.ExitStack() as stack:
            for path in cold_files:
                evict(path)
            # One ExitStack per clone, each entered here: its unmount is registered even when
            # another mount fails.
            stacks = [stack.enter_context(contextlib.ExitStack()) for _ in clones]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(count) as pool:
                for mounted in [pool.submit(subject.mount, s, c) for s, c in zip(stacks, clones)]:
                    mounted.result()
            for clone in clones:
                clone.wait(timeout=900)
                clone.flush()
            seconds = time.perf_counter() - t0
            bench.commands.setdefault(f"fuseclone mount ({tag})", clones[0].command_line)
        return seconds
    finally:
        for clone in clones:
            remove(clone.dst, clone.meta)


# ---- row 10: PostgreSQL ------------------------------------------------------------------------

R10_SCALE = 20  # pgbench -s: about 300 MiB of tables
R10_IMAGE_SIZE = 1 * GiB
R10_CLIENTS = ["-c", "8", "-j", "2"]
R10_WHO = ["fuseclone hydrated", PASSTHROUGH, "qsd", "raw"]


def row10(bench: Bench) -> list[Metric]:
    """PostgreSQL: pgbench read-write and select-only on ext4 over a direct-I/O loop device"""
    p = bench.profile
    metrics = [Metric(10, f"r10.{key}", f"pgbench {label} (-s {R10_SCALE}, {' '.join(R10_CLIENTS)})", "TPS", True,
                      targets=[Target("≥ 0.8× raw", ["fuseclone hydrated"], ">=", 0.8, ["raw"]),
                               Target("≥ qsd", ["fuseclone hydrated"], ">=", 1.0, ["qsd"]),
                               Target("passthrough ≥ 0.8× raw", [PASSTHROUGH], ">=", 0.8, ["raw"],
                                      info=True)])
               for key, label in (("rw", "read-write"), ("select", "select-only"))]
    read_write, select_only = metrics
    for m in metrics:
        m.notes.append(f"PostgreSQL, shared_buffers 128 MB, pgbench -s {R10_SCALE} laid out once in an "
                       f"ext4 image; each sample starts the server, runs pgbench -n -T {p.r10_runtime:g} "
                       "(read-write, then -S) and stops it; ext4 through losetup --direct-io=on")
        for who in R10_WHO:
            m.figure(who)
    reason = postgres.missing_reason()
    if reason:
        for m in metrics:
            m.skip(R10_WHO, reason)
        bench.say(f"  row 10 skipped: {reason}")
        return metrics
    src = pgbench_image(bench)
    with contextlib.ExitStack() as stack:
        dirs = filesystems_on_dio_loops(stack, bench, metrics, src, "r10",
                                        lambda file, who: mount_on_dio_loop(stack, bench, file, f"r10-{who}-fs"))
        bench.commands["pgbench (row 10)"] = (f"pgbench -n -T {p.r10_runtime:g} {' '.join(R10_CLIENTS)} [-S] "
                                             f"(server: {' '.join(postgres.SETTINGS)})")
        failed: set[str] = set()
        for rep in range(p.reps):
            for who in rotated(list(dirs), rep):
                if who in failed:
                    continue
                try:
                    with postgres.Cluster(os.path.join(dirs[who], "pgdata"), postgres.binaries()).running() as db:
                        runtime = ["-n", "-T", f"{p.r10_runtime:g}", *R10_CLIENTS]
                        read_write.figure(who).add(db.tps(*runtime))
                        select_only.figure(who).add(db.tps(*runtime, "-S"))
                except BenchError as exc:
                    failed.add(who)
                    for m in metrics:
                        m.skip([who], f"failed: {exc}")
                    bench.say(f"  rep {rep + 1}/{p.reps} {who}: [red]failed[/]: {exc}")
                    continue
                bench.say(f"  rep {rep + 1}/{p.reps} {who}: read-write {read_write.figure(who).samples[-1]:,.0f} TPS, "
                          f"select-only {select_only.figure(who).samples[-1]:,.0f} TPS")
    return metrics


def pgbench_image(bench: Bench) -> str:
    """An ext4 image holding a PostgreSQL cluster with pgbench's tables at R10_SCALE, cleanly
    stopped; made once and kept in the work directory."""
    image = bench.path(f"r10-pgbench-s{R10_SCALE}.img")
    if os.path.exists(image):
        return image
    partial = image + ".partial"
    remove(partial)
    with open(partial, "wb") as f:
        f.truncate(R10_IMAGE_SIZE)
    run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", partial])
    with contextlib.ExitStack() as stack:
        loop = losetup(stack, partial, direct_io=False)
        directory = bench.path("r10-build-fs")
        mount(stack, loop.device, directory)
        cluster = postgres.Cluster(os.path.join(directory, "pgdata"), postgres.binaries())
        cluster.init()
        with cluster.running():
            cluster.pgbench("-i", "-q", "-s", str(R10_SCALE))
    os.replace(partial, image)
    return image


from .follow import row9  # noqa: E402  (it uses this module's Bench)

ROWS: dict[int, Callable[[Bench], list[Metric]]] = {1: row1, 2: row2, 3: row3, 4: row4, 5: row5, 6: row6, 7: row7, 8: row8,
                                                   9: row9, 10: row10}
