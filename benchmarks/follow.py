"""Row 9: hydration that follows the user (issue 17), behind 5 ms per source read.

* sequential reads of unhydrated data: 64 KiB direct and 1 MiB buffered `dd` of the image, and
  random 4 KiB direct reads, on a fresh clone with background hydration off; the peer is
  qemu-storage-daemon's copy-on-read over NBD (nbd blockdev ← qcow2 overlay ← copy-on-read,
  FUSE export) from the same nbdkit;
* the start-up workload: an ext4 image mounted read-only from a loop device over the image,
  then a fixed set of files read; on a first clone (recording its access trace), a second
  clone prefetching that trace, and a loop device straight on a local copy (the limit);
* p99 of 4 KiB direct reads of hydrated data, idle and while a sequential reader's readahead
  and a prefetch run.
Every sample starts from a fresh DST and META with the page cache dropped.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import shlex
import threading
import time

from . import anchors, subject
from .stats import Metric, Target
from .system import BenchError, drop_caches, losetup, mount, mounted, random_file, remove, run, start_server

MiB = 1 << 20
DELAY = "5ms"
SEQ_BYTES = 128 * MiB
RANDOM_READS = 400
FILES = 60  # start-up workload: files of 64 KiB to 1 MiB


def qsd_cor_argv(sock: str, overlay: str, export: str) -> list[str]:
    """qemu-storage-daemon's copy-on-read of an NBD source, exported through FUSE."""
    return ["qemu-storage-daemon",
            "--blockdev", f"driver=nbd,node-name=src,server.type=unix,server.path={sock},read-only=on",
            "--blockdev", f"driver=file,node-name=ovl-file,filename={overlay}",
            "--blockdev", "driver=qcow2,node-name=ovl,file=ovl-file,backing=src",
            "--blockdev", "driver=copy-on-read,node-name=cor,file=ovl",
            "--export", f"type=fuse,id=e,node-name=cor,mountpoint={export},writable=on"]


@contextlib.contextmanager
def qsd_cor(bench, sock: str, size: int):
    """A fresh qsd copy-on-read export of the NBD source; yields the exported file."""
    overlay, export = bench.path("r9-qsd.qcow2"), bench.path("r9-qsd-export.img")
    remove(overlay)
    run(["qemu-img", "create", "-q", "-f", "qcow2", overlay, str(size)])
    with open(export, "ab"):
        pass
    argv = qsd_cor_argv(sock, overlay, export)
    bench.commands["qsd copy-on-read over NBD (row 9)"] = shlex.join(argv)
    try:
        with contextlib.ExitStack() as stack:
            start_server(stack, argv, bench.log_path("r9-qsd.log"), ready=lambda: mounted(export))
            yield export
    finally:
        remove(overlay)


@contextlib.contextmanager
def fresh_clone(bench, uri: str, options: list[str], tag: str = "r9"):
    clone = bench.clone(tag, uri, ["--no-hydration", *options])
    try:
        with contextlib.ExitStack() as stack:
            subject.mount(stack, clone)
            bench.commands[f"fuseclone mount (row 9, {tag})"] = clone.command_line
            yield clone
    finally:
        remove(clone.dst, clone.meta)


def dd_mb_s(image: str, bs: str, direct: bool) -> float:
    count = SEQ_BYTES // (64 << 10 if bs == "64k" else MiB)
    drop_caches()
    t0 = time.perf_counter()
    run(["dd", f"if={image}", "of=/dev/null", f"bs={bs}", f"count={count}", "status=none",
         *(["iflag=direct"] if direct else [])])
    return SEQ_BYTES / (time.perf_counter() - t0) / 1e6


def random_iops(image: str, size: int, seed: int) -> float:
    rng = random.Random(seed)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(RANDOM_READS)]
    latencies = direct_read_latencies(image, offsets)
    return len(latencies) / sum(latencies)


def direct_read_latencies(image: str, offsets: list[int]) -> list[float]:
    buf = mmap.mmap(-1, 4096)
    fd = os.open(image, os.O_RDONLY | os.O_DIRECT)
    try:
        out = []
        for offset in offsets:
            t0 = time.perf_counter()
            os.preadv(fd, [buf], offset)
            out.append(time.perf_counter() - t0)
        return out
    finally:
        os.close(fd)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def startup_image(bench) -> tuple[str, list[str]]:
    """A 512 MiB ext4 image holding FILES random files of 64 KiB-1 MiB spread over its block
    groups, and the names of the files the workload reads."""
    path = bench.path("r9-ext4.img")
    names = [f"dir{i % 6}/f{i}.bin" for i in range(FILES)]
    if not os.path.exists(path):
        files = bench.path("r9-files")
        rng = random.Random(17)
        for name in names:
            os.makedirs(os.path.join(files, os.path.dirname(name)), exist_ok=True)
            with open(os.path.join(files, name), "wb") as f:
                f.write(rng.randbytes(rng.randrange(64 << 10, MiB)))
            filler = os.path.join(files, os.path.dirname(name), f"filler-{os.path.basename(name)}")
            with open(filler, "wb") as f:  # the files do not sit side by side
                f.write(rng.randbytes(3 * MiB))
        run(["mkfs.ext4", "-q", "-F", "-d", files, path, "512M"])
        run(["rm", "-rf", files])
    return path, names


def startup_seconds(bench, image: str, names: list[str], before=lambda stack: None) -> tuple[float, float]:
    """Seconds from BEFORE (which mounts a clone, or nothing) through losetup, a read-only
    mount of the ext4 and reading every file; and the seconds of BEFORE alone."""
    fsmnt = bench.path("r9-fs")
    drop_caches()
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        target = before(stack) or image
        mounted_at = time.perf_counter()
        loop = losetup(stack, target, direct_io=False, read_only=True)
        mount(stack, loop.device, fsmnt, "ro")
        for name in names:
            with open(os.path.join(fsmnt, name), "rb") as f:
                while f.read(MiB):
                    pass
        seconds = time.perf_counter() - t0
    return seconds, mounted_at - t0


def row9(bench) -> list[Metric]:
    """hydration that follows the user: readahead, prefetch traces (behind 5 ms)"""
    p = bench.profile
    size = 512 * MiB
    seq = Metric(9, "r9.seq_unhydrated", f"sequential reads of unhydrated data behind {DELAY}", "MB/s",
                 targets=[Target("64 KiB direct ≥ 60 MB/s", ["fuseclone 64k direct"], ">=", 60),
                          Target("1 MiB buffered ≥ 150 MB/s", ["fuseclone 1M buffered"], ">=", 150),
                          Target("64 KiB direct / qsd", ["fuseclone 64k direct"], ">=", 0,
                                 ["qsd 64k direct"], info=True)])
    rnd = Metric(9, "r9.random_unhydrated", f"random 4 KiB direct reads of unhydrated data behind {DELAY}",
                 "IOPS", targets=[Target("/ qsd", ["fuseclone"], ">=", 0, ["qsd"], info=True)])
    start = Metric(9, "r9.startup", "start-up workload (fuseclone mount, then mount ext4 ro from a loop device, read 60 files)",
                   "s", False, targets=[Target("second clone ≤ 0.4× first", ["second clone --prefetch"],
                                               "<=", 0.4, ["first clone"]),
                                        Target("second clone / local", ["second clone --prefetch"], "<=", 0,
                                               ["local DST"], info=True)])
    lat = Metric(9, "r9.p99_following", "p99 4 KiB direct read of hydrated data", "µs", False,
                 targets=[Target("readahead ≤ 3× idle", ["during readahead"], "<=", 3.0, ["idle"]),
                          Target("prefetch ≤ 3× idle", ["during prefetch"], "<=", 3.0, ["idle"])])
    metrics = [seq, rnd, start, lat]
    if bench.fuseclone_reason or bench.nbd_reason:
        for m in metrics:
            m.notes.append(f"skipped: {bench.fuseclone_reason or bench.nbd_reason}")
        return metrics
    seq.notes.append(f"{SEQ_BYTES // MiB} MiB read by dd from the image file, fresh clone, "
                     "--no-hydration, page cache dropped; nbdkit --filter=delay rdelay=5ms")
    src = random_file(bench.path(f"src-random-{size}.img"), size)
    img, names = startup_image(bench)
    for rep in range(p.reps):
        # Servers of their own per repetition: nbdkit 1.32 sometimes aborts (an assertion in
        # raw_send_socket) when a clone disconnects under replies, which ended the whole row.
        with contextlib.ExitStack() as stack:
            nbd = anchors.nbdkit_server(stack, src, bench.path("r9.sock"), bench.log_path("r9-nbdkit.log"),
                                        rdelay=DELAY)
            ext4 = anchors.nbdkit_server(stack, img, bench.path("r9-ext4.sock"),
                                         bench.log_path("r9-nbdkit-ext4.log"), rdelay=DELAY)
            bench.commands["nbdkit (row 9)"] = shlex.join(anchors.nbdkit_argv(src, nbd.socket, DELAY))
            try:
                _sequential_and_random(bench, nbd, size, seq, rnd, rep)
                _startup(bench, ext4, img, names, start)
                _latency(bench, nbd, lat)
            except BenchError as exc:
                bench.say(f"  row 9: [red]failed[/]: {exc}")
                for m in metrics:
                    m.notes.append(f"failed: {exc}")
                break
    return metrics


def _sequential_and_random(bench, nbd, size, seq, rnd, rep) -> None:
    for name, bs, direct in (("64k direct", "64k", True), ("1M buffered", "1M", False)):
        with fresh_clone(bench, nbd.uri, []) as clone:
            seq.figure(f"fuseclone {name}").add(dd_mb_s(clone.image, bs, direct))
        with qsd_cor(bench, nbd.socket, size) as export:
            seq.figure(f"qsd {name}").add(dd_mb_s(export, bs, direct))
    with fresh_clone(bench, nbd.uri, []) as clone:
        rnd.figure("fuseclone").add(random_iops(clone.image, size, rep))
    with qsd_cor(bench, nbd.socket, size) as export:
        rnd.figure("qsd").add(random_iops(export, size, rep))
    bench.say("  " + ", ".join(f"{f.name} {f.samples[-1]:,.1f}" for f in [*seq.figures, *rnd.figures]))


def traces_supported() -> bool:
    """Whether this checkout's fuseclone records and prefetches traces (main before issue 17
    did not: its "second clone" is then a clone like the first, the figure to compare with)."""
    return "--record-access" in run([*subject.FUSECLONE, "mount", "--help"]).stdout.decode()


def _startup(bench, ext4, img, names, start) -> None:
    trace = bench.path("r9-startup.trace")
    remove(trace)  # the last repetition's: a trace is never recorded over
    traces = traces_supported()

    def clone_of(options, tag):
        def before(stack):
            clone = bench.clone(tag, ext4.uri, ["--no-hydration", *options])
            stack.callback(remove, clone.dst, clone.meta)
            subject.mount(stack, clone)
            bench.commands[f"fuseclone mount (row 9, {tag})"] = clone.command_line
            return clone.image
        return before

    first, first_mount = startup_seconds(
        bench, img, names, clone_of(["--record-access", trace] if traces else [], "r9-first"))
    second, second_mount = startup_seconds(
        bench, img, names, clone_of(["--prefetch", trace] if traces else [], "r9-second"))
    local, _ = startup_seconds(bench, img, names)
    start.figure("first clone").add(first, fuseclone_mount_s=first_mount)
    start.figure("second clone --prefetch").add(second, fuseclone_mount_s=second_mount)
    start.figure("local DST").add(local)
    bench.say(f"  start-up: first {first:.2f} s (mount command {first_mount:.2f}), second (--prefetch) "
              f"{second:.2f} s (mount command {second_mount:.2f}), local {local:.2f} s")


def _latency(bench, nbd, lat) -> None:
    """p99 of 4 KiB direct reads over a hydrated 32 MiB, idle, then while a sequential reader
    streams through unhydrated data, then while a second clone prefetches the trace it left."""
    hot = 32 * MiB
    rng = random.Random(5)
    offsets = [rng.randrange(hot // 4096) * 4096 for _ in range(1500)]
    trace = bench.path("r9-seq.trace")
    remove(trace)  # the last repetition's: a trace is never recorded over
    traces = traces_supported()
    with fresh_clone(bench, nbd.uri, ["--record-access", trace] if traces else [], "r9-lat") as clone:
        run(["dd", f"if={clone.image}", "of=/dev/null", "bs=1M", f"count={hot // MiB}", "iflag=direct",
             "status=none"])
        clone.flush()
        idle = p99(direct_read_latencies(clone.image, offsets))
        reader = threading.Thread(target=run, args=(["dd", f"if={clone.image}", "of=/dev/null", "bs=64k",
                                                      f"skip={hot // 65536}", f"count={SEQ_BYTES // 65536}",
                                                      "iflag=direct", "status=none"],))
        reader.start()
        busy = p99(direct_read_latencies(clone.image, offsets))
        reader.join()
    lat.figure("idle").add(idle * 1e6)
    lat.figure("during readahead").add(busy * 1e6)
    if not traces:
        bench.say(f"  p99: idle {idle * 1e6:,.0f} µs, beside a sequential reader {busy * 1e6:,.0f} µs")
        return
    # A clone with its first 32 MiB hydrated as above, then prefetching the trace.
    clone = bench.clone("r9-lat3", nbd.uri, ["--no-hydration"])
    try:
        with contextlib.ExitStack() as stack:
            subject.mount(stack, clone)
            run(["dd", f"if={clone.image}", "of=/dev/null", "bs=1M", f"count={hot // MiB}",
                 "iflag=direct", "status=none"])
            clone.flush()
        clone.options = ["--prefetch", trace]
        with contextlib.ExitStack() as stack:
            subject.mount(stack, clone)
            prefetching = p99(direct_read_latencies(clone.image, offsets))
            done = not clone.status()["status"]["prefetching"]
    finally:
        remove(clone.dst, clone.meta)
    lat.figure("during prefetch").add(prefetching * 1e6, prefetch_done_before_end=done)
    bench.say(f"  p99: idle {idle * 1e6:,.0f} µs, during readahead {busy * 1e6:,.0f} µs, "
              f"during prefetch {prefetching * 1e6:,.0f} µs{' (prefetch ended early)' if done else ''}")
