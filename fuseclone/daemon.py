"""One live mount: source + clone engine + FUSE filesystem + control socket, in one nursery.

Lifecycle: check the mountpoint, open the source, open (or create) the clone, mount, report
ready, then serve until unmounted, told to stop over the control socket, or signalled
(SIGINT/SIGTERM). Leaving always commits the metadata and marks it clean. If anything fails
before the mount is up, files this run created (META, a new DST) are removed again.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shlex
import signal
import stat
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable

import trio

from . import claims, control, heap, identity
from .clone import open_clone, recorded_source, running
from .control_server import serve_control
from .engine import CloneEngine, Settings
from .errors import FusecloneError, describe, ended_in_fail_mode
from .hydrator import PREFETCH_BURST_PAUSE
from .identity import check_distinct
from .metadata import Metadata, format_1_identity
from .status import Status
from .threads import in_thread
from .trace import AccessTrace, TraceRecorder, check_trace_source, read_trace

if TYPE_CHECKING:
    from .fuse.fs import LostWrites

log = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL = 0.0002  # seconds
MAX_WAIT = 3600.0  # seconds a "wait" request may block
DEFAULT_WRITE_CACHE = 1 << 30
WRITE_BACK_TIMEOUT = 30.0  # seconds a stop waits for the kernel to hand over cached writes...
SOURCE_STALLED = 1.0  # ...while a request to the source has waited this long (see _write_back)


@dataclass
class MountOptions:
    source: str
    destination: str
    metadata: str
    mountpoint: str
    region_size: int | None = None
    settings: Settings = field(default_factory=Settings)
    allow_other: bool = False
    name: str = "image"
    on_complete: str | None = None
    write_cache: int = DEFAULT_WRITE_CACHE  # 0: write-through
    record_access: str | None = None  # write an access trace here (trace.py)
    prefetch: str | None = None  # hydrate the regions of this access trace first
    http_header_file: str | None = None  # headers (secrets) for an http(s):// or s3:// source
    metrics_listen: tuple[str | None, int] | None = None  # (host, port) serving GET /metrics
    notify: bool = False  # speak systemd's notify protocol if $NOTIFY_SOCKET is set
    mirrors: tuple[str, ...] = ()  # other servers of the source's image (--mirror)
    log_file: str | None = None  # --log-file: opened by the CLI, after check_paths
    passthrough: bool = False  # a clone complete at mount: FUSE passthrough to DST (--passthrough)
    workdir: str | None = None  # where the mount command ran: --on-complete runs there
    overwrite_dst: bool = False  # a new clone may overwrite a DST that holds data


def check_mountpoint(path: str) -> None:
    """Refuse a missing or busy mountpoint before anything is created; clean a stale mount of
    a killed fuseclone. A fuseclone mount there is found in the mount table before PATH is
    looked at: its daemon may be stopped, and a stat would wait for it."""
    control.cleanup_stale_mount(path)
    busy = FusecloneError(f"{path}: mountpoint is busy (something is already mounted there)")
    if control.meta_of_mountpoint(path) is not None:
        raise busy
    _refuse_covering_a_live_clone(path)
    if not os.path.exists(path):
        raise FusecloneError(f"{path}: mountpoint does not exist")
    if not (os.path.isdir(path) or os.path.isfile(path)):
        raise FusecloneError(f"{path}: mountpoint must be a directory or a regular file")
    if os.path.ismount(path):
        raise busy
    if os.path.isfile(path):  # covered by the mount: another clone could no longer reach it
        claims.refuse_if_held("mountpoint", path)


def _refuse_covering_a_live_clone(path: str) -> None:
    """A mount covers what lies at or beneath its mountpoint. A live clone's image covered
    keeps its loop devices, but that clone could not be unmounted ("in use"); its META or
    mountpoint covered could be reached no more (its status, its unmount: "does not
    answer"). All three are found in the mount table, and compared without a look inside any
    mount (before PATH itself is looked at: it may be inside one)."""
    from .fuse.mount import resolve_outside_mounts

    mounted = control.mounts()
    mountpoints = {mountpoint for _, mountpoint in mounted}
    real = resolve_outside_mounts(path, mountpoints)
    for meta, mountpoint in mounted:
        if real.startswith(mountpoint.rstrip("/") + "/"):
            raise FusecloneError(f"{path}: a mount there would cover the image {real} of a "
                                 "live clone")
        for what, hidden in (("metadata", meta), ("mountpoint", mountpoint)):
            if resolve_outside_mounts(hidden, mountpoints).startswith(real.rstrip("/") + "/"):
                raise FusecloneError(f"{path}: a mount there would hide the {what} {hidden} "
                                     "of a live clone")


def check_paths(opts: MountOptions) -> None:
    """Refuse a busy mountpoint, and paths that are not different things: SRC (and each
    mirror), DST, META, the mountpoint, and the files the mount writes (trace, log); and an
    image name that is no file name."""
    from .fuse.fs import check_image_name

    check_image_name(opts.name)
    if opts.on_complete is not None:
        on_complete_argv(opts.on_complete)
    check_mountpoint(opts.mountpoint)
    for source_path in (opts.source, *opts.mirrors):
        check_distinct(source=source_path, destination=opts.destination, metadata=opts.metadata,
                       mountpoint=opts.mountpoint, access_trace=opts.record_access,
                       log_file=opts.log_file, prefetch=opts.prefetch,
                       header_file=opts.http_header_file)
    # The trace is truncated and the log appended to: neither may be another live clone's file.
    for role, path in (("access trace", opts.record_access), ("log file", opts.log_file)):
        if path is not None:
            claims.refuse_unless_file(role, path, char_device_ok=role == "log file")
            claims.refuse_if_held(role, path)
    # Their own claims refuse a live clone's log (it is held) as merely in use: say whose it is.
    for role, path in (("destination", opts.destination), ("metadata", opts.metadata)):
        claims.refuse_a_live_log(role, path)
    _refuse_files_of_format_1_clones(opts)


def _refuse_files_of_format_1_clones(opts: MountOptions) -> None:
    """A daemon of a format-1 release (mounted before the package was upgraded) claims neither
    its SRC nor its DST: found as a live mount whose META is still format 1 (this release
    upgrades every META it mounts), whose header names them. The files this mount writes must
    be neither, nor on them (identity.conflict: the same file or device, or one backing the
    other)."""
    written = [identity.describe(role, path) for role, path in (
        ("destination", opts.destination), ("metadata", opts.metadata),
        ("access trace", opts.record_access), ("log file", opts.log_file)) if path is not None]
    for meta, mountpoint in control.mounts():
        recorded = format_1_identity(meta) or {}
        for what in ("source", "destination"):
            theirs = recorded.get(what)
            path = theirs.get("path") if isinstance(theirs, dict) else None
            if not isinstance(path, str) or not os.path.exists(path):
                continue  # a file renamed or removed since: no name of it can be given now
            their_file = identity.describe(what, path)
            for mine in written:
                if identity.conflict(their_file, mine):
                    raise FusecloneError(
                        f"{mine.path}: the {what} of the live clone at {mountpoint} (mounted by "
                        f"an earlier fuseclone release) cannot be this mount's {mine.role}")


def check_passthrough(opts: MountOptions) -> None:
    """Refuse --passthrough where the kernel would: it registers only regular files as backing
    files, and only for CAP_SYS_ADMIN."""
    if not opts.passthrough:
        return
    if os.geteuid() != 0:
        raise FusecloneError("--passthrough needs root: the kernel lets only CAP_SYS_ADMIN "
                             "register the destination as a backing file")
    try:
        mode = os.stat(opts.destination).st_mode
    except FileNotFoundError:
        return  # a new clone: not complete at this mount, so served without passthrough
    if stat.S_ISBLK(mode):
        raise FusecloneError(f"{opts.destination}: --passthrough needs a destination that is a "
                             "regular file (the kernel passes FUSE I/O through to files only)")


def image_path(mountpoint: str, name: str) -> str:
    """Where the image appears: the mountpoint itself when it is a file, else a file in it."""
    return mountpoint if os.path.isfile(mountpoint) else os.path.join(mountpoint, name)


async def run_mount(opts: MountOptions, on_ready: Callable[[str], None] = lambda path: None) -> None:
    """Serve one mount until it ends. `on_ready(image_path)` is called once the image can be
    opened. User errors raise FusecloneError before anything changed on disk."""
    # Imported before the source opens: once it does, hydration competes for the GIL and
    # importing the FUSE layer then took ~70 ms longer.
    from .fuse import fs, session  # noqa: F401
    from .fuse.fs import LostWrites
    from .fuse.mount import become_io_flusher
    from .sources.mirrors import open_mirrored_source

    # Worker threads (source reads, zero detection, DST writes) hold the GIL for up to the switch
    # interval when the event loop wants it back; at CPython's default 5 ms that interval became
    # the p99 latency of user reads during hydration.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    become_io_flusher()  # before any worker thread starts: they inherit it
    heap.use_one_arena()  # before any worker thread starts, too
    check_paths(opts)
    check_passthrough(opts)
    # Decided before mounting: once mounted, a stat of the mountpoint from this process would
    # wait for an answer only this process can give.
    image = image_path(opts.mountpoint, opts.name)
    prefetch = _read_prefetch_trace(opts)
    real_mountpoint = os.path.realpath(opts.mountpoint)  # as the mount table will have it
    notifier = _systemd_notifier(opts)
    # A resumed clone mounts even while its source is down: META knows the image's size.
    recorded = recorded_source(opts.metadata)
    async with open_mirrored_source(opts.source, opts.mirrors, recorded,
                                    http_header_file=opts.http_header_file) as source:
        if prefetch is not None:
            check_trace_source(prefetch, opts.prefetch, source)
        engine = open_clone(source, opts.destination, opts.metadata,
                            region_size=opts.region_size, settings=opts.settings,
                            other_bitmaps=TraceRecorder.BITMAPS if opts.record_access else 0,
                            overwrite_dst=opts.overwrite_dst)
        if prefetch is not None:
            burst, rest = prefetch.first_burst_and_rest(engine.geometry, PREFETCH_BURST_PAUSE)
            engine.prefetch(burst + rest, first_burst=len(burst))
        mounted = False
        lost = LostWrites()
        try:
            # Held inside META's hold, like the log: `fuseclone unmount` returns once META is
            # let go, and the trace must be complete (its `end` line) and free by then.
            async with running(engine, hold_hydration=True), \
                    _recording_access(engine, opts.record_access, lambda: mounted), \
                    _holding_the_log():
                try:
                    async with trio.open_nursery() as nursery:
                        status = await _start_serving(nursery, engine, opts, image,
                                                      real_mountpoint, lost)
                        on_ready(image)  # may fail (the mount command gone): then not mounted
                        mounted = True
                        if notifier is not None:
                            notifier.ready(status().progress_line())
                            nursery.start_soon(notifier.report_progress,
                                               lambda: status().progress_line())
                        # Usable first, then hydrating: copies competing for the GIL made the
                        # mount itself ~40-90 ms slower.
                        engine.release_hydration()
                    _leave_lost_writes_report(engine.meta, lost)
                finally:
                    if notifier is not None and mounted:
                        notifier.stopping()  # before the last commit, which may take a while
        finally:
            if notifier is not None:
                notifier.close()
            if not mounted:
                # Only what open_clone made: META and DST another mount created meanwhile (the
                # source may take long to answer) are a clone this mount resumed.
                _remove_created(opts, engine.created_meta, engine.created_dst)
    # The daemon's exit status says how it ended too (a foreground mount, a service).
    troubles = _what_the_end_lost(engine.meta, lost)
    if troubles:
        log.error("%s", troubles)
        raise FusecloneError(troubles)


def _what_the_end_lost(meta: Metadata, lost: LostWrites) -> str | None:
    """Why a mount that has ended must not exit 0: its metadata in fail mode (no last commit),
    cached writes lost. None when it ended well."""
    troubles = []
    if meta.failure is not None:
        troubles.append(f"this mount ended without its last commit: {ended_in_fail_mode(meta.failure)}")
    if lost:
        troubles.append(_lost_writes_line(lost.summary()))
    return "; ".join(troubles) or None


def _leave_lost_writes_report(meta: Metadata, lost: LostWrites) -> None:
    """For `unmount`, which reads it once META is let go: so before the last commit."""
    try:
        control.record_lost_writes(meta.path, meta.header.uuid, lost.bytes, lost.ranges,
                                   lost.summary() if lost else None)
    except OSError as exc:
        log.error("cannot leave the report of lost writes for `unmount`: %s", describe(exc))


def _lost_writes_line(summary: str) -> str:
    """What the mount's end says of the cached writes it lost."""
    return f"this mount lost writes the kernel had acknowledged from its cache: {summary}"


def _read_prefetch_trace(opts: MountOptions) -> AccessTrace | None:
    """The --prefetch trace, read before anything is created (a corrupt one is refused)."""
    if opts.record_access is not None:
        parent = os.path.dirname(os.path.abspath(opts.record_access))
        if not os.path.isdir(parent):
            why = "is not a directory" if os.path.exists(parent) else "does not exist"
            raise FusecloneError(f"{opts.record_access}: cannot record an access trace there "
                                 f"({parent} {why})")
    if opts.prefetch is None:
        return None
    return read_trace(opts.prefetch)  # not the --record-access trace: check_paths refused that


@asynccontextmanager
async def _holding_the_log() -> AsyncIterator[None]:
    """Hold the file this mount logs to (claims.py), if it logs to a regular file, while the
    mount runs: a later mount naming it as its DST, META or trace would empty or overwrite it,
    or get this mount's log lines appended to its own file. Held only while META is this
    mount's: a second mount of META appends its refusal to the same default log, and a mount
    of META right after this one ends must not find the log still held."""
    handler = _log_handler()
    if handler is None or not stat.S_ISREG(os.fstat(handler.stream.fileno()).st_mode):
        yield
        return
    fd, path = handler.stream.fileno(), handler.baseFilename
    try:
        claims.hold(fd, path, exclusive=True, required=False)  # a regular file: nothing beneath
    except claims.HeldError:
        claims.refuse_if_held("log file", path)  # says whose log it is
        raise
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


@asynccontextmanager
async def _recording_access(engine: CloneEngine, path: str | None,
                            mounted: Callable[[], bool]) -> AsyncIterator[None]:
    """Record the access trace at PATH (if any) while the mount runs; it is complete (ends
    with its `end` line) once the mount stopped. If it never was `mounted`, the file is left
    as it was (`TraceRecorder.discard`)."""
    if path is None:
        yield
        return
    recorder = TraceRecorder(path, engine.source.identity(), engine.geometry, trio.current_time)
    engine.recorder = recorder
    try:
        yield
    finally:
        engine.recorder = None
        if mounted():
            recorder.close()
        else:
            recorder.discard()


def _systemd_notifier(opts: MountOptions):
    if not opts.notify:
        return None
    from .notify import SystemdNotifier

    return SystemdNotifier.from_environment()


async def _start_serving(nursery: trio.Nursery, engine: CloneEngine, opts: MountOptions,
                         image: str, real_mountpoint: str,
                         lost: LostWrites) -> Callable[[], Status]:
    """Start the control socket, the signal handler, the FUSE session (mounted when this
    returns) and the metrics endpoint in NURSERY; returns the mount's status function."""
    from .fuse.fs import ImageFilesystem
    from .fuse.mount import MountEntry, device_of, places_kept_after_unmount, places_of

    stop = nursery.cancel_scope
    mount_id: int | None = None  # the FUSE mount's, in mountinfo, once it is mounted
    device: str | None = None  # its "major:minor", shared by bind mounts of it
    # The kernel keeps the size of a cached-write file to itself, and a regular-file mountpoint's
    # root inode starts at size 0: it has to stay write-through.
    image_at_root = image == opts.mountpoint
    passthrough = _use_passthrough(engine, opts)
    # The kernel negotiates passthrough only without the writeback cache.
    write_cache = 0 if image_at_root or passthrough else opts.write_cache
    fs = ImageFilesystem(engine, name=opts.name, image_at_root=image_at_root,
                         write_cache=write_cache > 0, lost_writes=lost)

    def status() -> Status:
        st = engine.status()
        st.log_file = _log_file()
        st.user_read_bytes = fs.user_read_bytes
        st.user_write_bytes = fs.user_write_bytes
        st.lost_write_bytes = lost.bytes
        st.lost_write_ranges = lost.ranges
        st.lost_writes = lost.summary() if lost else None
        st.reads_on_ring = fs.reads_on_ring
        st.passthrough = fs.backing_id is not None
        st.pid = os.getpid()
        st.mountpoint, st.image = here()
        st.device = device
        return st

    def places() -> list[MountEntry]:
        """Where this clone is mounted in our namespace now, its own mount first while it is
        there (bind mounts of it too; never a stat of our mount)."""
        return places_of(device, mount_id) if device is not None else []

    def here() -> tuple[str, str]:
        """The mountpoint and the image as they are reached now: a directory above them renamed
        since the mount moved them, or, once the mount itself is gone, a bind mount of it that
        still serves (the mount table says where)."""
        found = places()
        now = found[0].mountpoint if found else None
        if now is None or now == real_mountpoint:
            return opts.mountpoint, image
        return now, now if image_at_root else os.path.join(now, opts.name)

    def image_now() -> str:
        return here()[1]

    def status_reply() -> dict:
        st = status()
        # pid, mountpoint and image at the top level too: commands of earlier releases read them there
        return {"ok": True, "status": st, "pid": st.pid, "mountpoint": st.mountpoint,
                "image": st.image}

    async def handle(req: dict) -> dict:
        """A request control.parse_request accepted: every field there and valid."""
        op = req["op"]
        if op == "status":
            return status_reply()
        if op == "message":
            try:
                engine.message(req["text"])
                await engine.record_settings()
            except (ValueError, FusecloneError) as exc:  # a bad message, or fail mode
                return {"ok": False, "error": str(exc)}
            return {"ok": True}
        if op == "wait":
            with trio.move_on_after(min(req["timeout"], MAX_WAIT)):
                await engine.wait_until_settled()
            return status_reply()
        if op == "unmount":
            mountpoint = here()[0]
            real_now = real_mountpoint if mountpoint == opts.mountpoint else mountpoint
            found = places()
            asked = next((place for place in found if place.mountpoint == req["mountpoint"]),
                         None)
            if req["mountpoint"] not in (None, real_now) and asked is None:
                return {"ok": False, "error": f"the mount of {opts.metadata} is at "
                        f"{real_now}, not {req['mountpoint']} (META was moved, and another "
                        f"clone made at its path?): `umount -l {req['mountpoint']}` detaches it"}
            if asked is not None and asked.mountpoint != real_now:  # a bind mount of ours
                mountpoint = real_now = asked.mountpoint
            if req["lazy"]:  # what a SIGTERM does
                nursery.start_soon(_write_back_then_stop, image_now, engine.source_waited,
                                   lost, stop)
                reply = {"ok": True}
            else:
                place = asked.mount_id if asked is not None else mount_id
                elsewhere = await in_thread(places_kept_after_unmount, place)
                if elsewhere:
                    return {"ok": False, "error": _still_mounted_elsewhere(elsewhere)}
                reply = await _unmount_unless_in_use(mountpoint, real_now, place, stop)
            # In rw mode the last commit marks META clean; the CLI looks once META is let go
            # (in fail mode it stays unmarked on purpose: the CLI says why, from metadata_error).
            # `pid`: what `unmount` names when the last commit lingers (a frozen filesystem).
            # `metadata_path`: META's name now, where the CLI looks once it is let go; the
            # progress: a clone not complete is said to be.
            return {**reply, "pid": os.getpid(), "metadata_mode": engine.meta.mode.value,
                    "metadata_error": engine.meta.failure, "log_file": _log_file(),
                    "metadata_path": engine.meta.current_name(),
                    "hydrated_regions": engine.meta.hydrated_count,
                    "total_regions": engine.meta.nr_regions}
        raise AssertionError(f"control.REQUESTS has {op!r}, the mount does not")

    await nursery.start(serve_control, opts.metadata, handle, engine.meta.path_names_another_clone)
    if opts.metrics_listen is not None:
        await nursery.start(_serve_metrics, opts, real_mountpoint, status)
    nursery.start_soon(_signals, image_now, engine.source_waited, lost, stop)
    mount_id = await nursery.start(_serve_then_stop, fs, opts, write_cache,
                                   engine.dst.fd if passthrough else None, stop)
    device = device_of(mount_id) if mount_id is not None else None
    if opts.on_complete:
        nursery.start_soon(_on_complete, engine, opts.on_complete, image_now, write_cache,
                           opts.workdir)
    return status


async def _serve_metrics(opts: MountOptions, real_mountpoint: str, status: Callable[[], Status],
                         task_status=trio.TASK_STATUS_IGNORED) -> None:
    """GET /metrics on --metrics-listen, labelled like `fuseclone metrics` labels this mount."""
    from .metrics import Sample, exposition, serve_metrics

    host, port = opts.metrics_listen
    labels = {"mountpoint": real_mountpoint, "metadata": os.path.abspath(opts.metadata)}
    await serve_metrics(host, port, lambda: exposition([Sample(**labels, status=status())]),
                        task_status=task_status)


def _use_passthrough(engine: CloneEngine, opts: MountOptions) -> bool:
    """--passthrough serves a clone that is complete at mount (nothing left to copy on read)
    by FUSE passthrough. It is decided at INIT, for the whole mount, and excludes the
    writeback cache: a clone still hydrating keeps the write cache, and passthrough waits for
    its next mount."""
    if not opts.passthrough:
        return False
    if not engine.meta.complete:
        log.info("--passthrough: the clone is still hydrating; this mount is served by the "
                 "daemon (with the write cache), mounts after hydration completes by passthrough")
        return False
    dst_size = engine.dst.attributes().st_size
    if not engine.dst.is_block_device and dst_size > engine.size:
        # The kernel reads DST up to DST's end, not the image's: a reader to EOF would get
        # what lies past the image. Not cut back: those bytes may be someone's.
        log.warning("--passthrough: %s is %d bytes, longer than the image (%d bytes), and the "
                    "kernel would read past the image's end from it; this mount is served by "
                    "the daemon (a passthrough write past the end whose mount was killed leaves "
                    "DST so: truncate it to %d bytes if what lies past the image is not wanted)",
                    engine.dst.path, dst_size, engine.size, engine.size)
        return False
    return True


async def _serve_then_stop(fs, opts: MountOptions, write_cache: int, passthrough_fd: int | None,
                           stop: trio.CancelScope, task_status=trio.TASK_STATUS_IGNORED) -> None:
    from .fuse.session import serve

    await serve(fs, opts.mountpoint, fsname=control.FSNAME_PREFIX + os.path.abspath(opts.metadata),
                allow_other=opts.allow_other, write_cache=write_cache,
                passthrough_fd=passthrough_fd, task_status=task_status)
    log.info("%s was unmounted", opts.mountpoint)
    stop.cancel()  # unmounted from outside: shut the rest down


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM,
                # the terminal of a foreground mount closed: by default it would kill the
                # daemon without a commit or an unmount, and lose the writes the kernel caches
                signal.SIGHUP,
                # the soft CPU-time limit reached (ulimit -S -t, systemd's LimitCPU=): the same
                # loss by default, and SIGKILL at the hard limit. Sent again every second, so a
                # repeat is no request to hurry.
                signal.SIGXCPU)


async def _signals(image: Callable[[], str], source_waited: Callable[[], float],
                   lost: LostWrites, stop: trio.CancelScope) -> None:
    """The first SIGINT/SIGTERM/SIGHUP/SIGXCPU stops after the kernel's cached writes are
    handed over; a second one (not SIGXCPU) while that waits (a slow source, say) stops at
    once."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            async for signum in signals:
                name = signal.Signals(signum).name
                if nursery.child_tasks and signum == signal.SIGXCPU:
                    continue
                if nursery.child_tasks:
                    log.warning("received %s again: stopping without waiting for cached writes", name)
                    stop.cancel()
                    return
                log.info("received %s: committing and unmounting", name)
                nursery.start_soon(_write_back_then_stop, image, source_waited, lost, stop)


def _still_mounted_elsewhere(places: list[str]) -> str:
    """Why an unmount is refused while the clone is mounted at other PLACES too: unmounting one
    place leaves the session (and the daemon) serving the others, so the unmount would never
    end; a lazy one ends the session for all, whose users then get ENOTCONN."""
    return (f"the clone is also mounted at {', '.join(places)} (a bind mount, or a copy another "
            "mount namespace took): unmount it there first, or stop the clone everywhere with "
            "`fuseclone unmount --lazy`")


async def _unmount_unless_in_use(mountpoint: str, real_mountpoint: str, mount_id: int | None,
                                 stop: trio.CancelScope) -> dict:
    """The control socket's unmount, refused like umount(8)'s while something has the image
    open: a lazy detach would drop whatever that holder writes into the kernel's cache later;
    refused too while another filesystem is mounted over the clone (it is not ours to unmount).
    The unmount runs in a thread while this loop still serves, because the kernel hands over
    the image's cached writes during it; the session then ends by itself."""
    from .fuse.mount import CoveredError, check_clone_on_top, unmount

    try:
        check_clone_on_top(real_mountpoint, mount_id)
        await in_thread(unmount, mountpoint)
    except CoveredError as exc:
        return {"ok": False, "error": exc.reason}
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            log.info("unmount refused: %s is in use", mountpoint)
            return {"ok": False, "busy": True, "error": f"{mountpoint} is in use"}
        if exc.errno != errno.EINVAL:  # EINVAL: unmounted from outside meanwhile
            log.error("%s", exc)
            return {"ok": False, "error": str(exc)}
        stop.cancel()
    return {"ok": True}


async def _write_back_then_stop(image: Callable[[], str], source_waited: Callable[[], float],
                                lost: LostWrites, stop: trio.CancelScope) -> None:
    """Stop serving, but first take over the writes the kernel still caches, and those that
    filesystems on loop devices of the image still cache: once the session ends they could not
    be handed over, and a file still open at the unmount (a lazy detach) would lose them. With
    --write-cache 0 the kernel caches none of the image's own, but the filesystems above it
    may."""
    if not await _write_back(image(), source_waited, stacked=True):
        lost.give_up(f"the stop gave up on them after {WRITE_BACK_TIMEOUT:.0f} s waiting for the "
                     "source")
    stop.cancel()


async def _write_back(image: str, source_waited: Callable[[], float],
                      stacked: bool = False) -> bool:
    """Have the kernel hand over the image's cached writes (STACKED: and, first, those of the
    filesystems and devices on loop devices of the image): an fsync of the image, in a thread
    because this event loop has to answer the writes and the FSYNC it causes. Given up after
    WRITE_BACK_TIMEOUT only while a request to the source has waited SOURCE_STALLED (a cached
    write into part of an unhydrated region waits for its copy): a stop must not hang on a
    source that does not answer. Writes held up by DST's or META's filesystem (frozen, a slow
    disk) are waited for, however long: the stop's last commit waits for that filesystem
    anyway, and going on without them only lost the writes of a file still open (the lazy
    detach that follows drops them). False when it went on without them."""
    async with trio.open_nursery() as nursery:
        handed_over = trio.Event()
        nursery.start_soon(_fsync_image, image, stacked, handed_over)
        said_so = False
        while True:
            with trio.move_on_after(WRITE_BACK_TIMEOUT):
                await handed_over.wait()
                return True
            if source_waited() >= SOURCE_STALLED:
                log.warning("the kernel's cached writes of %s took over %.0f s, waiting for the "
                            "source: going on without them", image, WRITE_BACK_TIMEOUT)
                nursery.cancel_scope.cancel()
                return False
            if not said_so:
                log.warning("the kernel's cached writes of %s take over %.0f s, and not for the "
                            "source: waiting for them (is the filesystem of DST or META frozen, "
                            "or its disk slow?)", image, WRITE_BACK_TIMEOUT)
                said_so = True


async def _fsync_image(image: str, stacked: bool, handed_over: trio.Event) -> None:
    try:
        await in_thread(_fsync_file, image, stacked, abandon_on_cancel=True)
    except FileNotFoundError:
        pass  # stopped before the image was mounted: nothing was cached
    except OSError as exc:
        log.warning("writing back the kernel's cached writes of %s: %s", image, exc)
    handed_over.set()


def _fsync_file(path: str, stacked: bool) -> None:
    from .stacked import write_back_stacked

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if stacked:
            write_back_stacked(fd)
        os.fsync(fd)
    finally:
        os.close(fd)


def on_complete_argv(command: str) -> list[str]:
    """The --on-complete command split like a shell would; refused (one line) at mount, not
    found out when hydration completes."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise FusecloneError(f"--on-complete {command!r}: {exc}") from None
    if not argv:
        raise FusecloneError("--on-complete: the command is empty")
    return argv


async def _on_complete(engine: CloneEngine, command: str, image: Callable[[], str],
                       write_cache: int, workdir: str | None) -> None:
    await engine.complete.wait()
    if write_cache:
        # the command gets DST: with every write made so far
        await _write_back(image(), engine.source_waited)
    log.info("hydration complete: running %s", command)
    env = dict(os.environ, FUSECLONE_DESTINATION=engine.dst.path, FUSECLONE_METADATA=engine.meta.path)
    try:
        process = await trio.lowlevel.open_process(on_complete_argv(command), env=env,
                                                   cwd=workdir)
    except OSError as exc:  # the user's command, not the mount, failed: the mount serves on
        log.error("--on-complete command could not run: %s", describe(exc))
        return
    try:
        returncode = await process.wait()
    except trio.Cancelled:
        # Not killed: a switch-over to DST unmounts this very clone (`fuseclone unmount` in
        # CMD, which waits for this mount to let go of META) and must not be cut short by it.
        log.warning("the --on-complete command (pid %d) still runs as the mount stops: left to "
                    "finish on its own", process.pid)
        raise
    if returncode:
        log.warning("--on-complete command exited with %d", returncode)


def _remove_created(opts: MountOptions, new_meta: bool, new_dst: bool) -> None:
    for created, path in ((new_meta, opts.metadata), (new_dst, opts.destination)):
        if created and os.path.exists(path):
            log.info("removing %s, created by this failed mount", path)
            os.unlink(path)


def _log_file() -> str | None:
    """The file this process logs to, if it logs to one (status shows it)."""
    handler = _log_handler()
    return handler.baseFilename if handler is not None else None


def _log_handler() -> logging.FileHandler | None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler
    return None
