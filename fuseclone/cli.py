"""The `fuseclone` command: mount, status, message, wait, unmount, list, metrics, check, diff,
demo."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import sys
import time
from typing import NoReturn

import click

from . import control, startup_files
from .blockio import open_regular_file
from .errors import (FusecloneError, MetadataFailedError, MetadataInUseError, describe,
                     ended_in_fail_mode, user_error)
from .sources import describe_spec, is_remote, with_absolute_paths
from .status import Status
from .units import parse_size

class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeType()


class SecondsType(click.ParamType):
    """A --timeout: a finite number of seconds, 0 or more (nan never expired, and inf or nan
    reached socket.settimeout as a traceback)."""
    name = "SECONDS"

    def convert(self, value, param, ctx):
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = math.nan
        if not 0 <= seconds < math.inf:
            self.fail(f"{value!r} is not a number of seconds (0 or more)", param, ctx)
        return seconds


SECONDS = SecondsType()


def fail(message: str) -> NoReturn:
    click.echo(f"fuseclone: error: {message}", err=True)
    sys.exit(1)


class FriendlyGroup(click.Group):
    """Turns FusecloneError, and a file this user may not use, into one line on stderr and exit
    status 1."""

    def invoke(self, ctx):
        _escape_what_the_terminal_cannot_show()
        try:
            return super().invoke(ctx)
        except FusecloneError as exc:
            fail(str(exc))
        except PermissionError as exc:
            fail(f"permission denied: {exc.filename}" if exc.filename else describe(exc))
        except FileNotFoundError as exc:
            if exc.filename is None and _working_directory() is None:  # getcwd's ENOENT
                fail("the current directory was removed: give absolute paths, or cd elsewhere")
            raise


def _escape_what_the_terminal_cannot_show() -> None:
    """A path or a bar character the output's encoding lacks (PYTHONIOENCODING=ascii, an
    ASCII locale) is written escaped (`\\xe9`), not ended in a UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _working_directory() -> str | None:
    """This process's directory; None once it was removed."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        return None


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=lambda ctx, _param, value: _print_version(ctx) if value else None,
              help="Show the release (version, and the git commit it was installed from) and exit.")
def main() -> None:
    """dm-clone in userspace: use a clone of a slow source at once while it hydrates."""
    _keep_standard_descriptors_open()


def _print_version(ctx: click.Context) -> None:
    from .release import release  # runs git: only for --version

    click.echo(f"fuseclone, version {release()}")
    ctx.exit()


def _keep_standard_descriptors_open() -> None:
    """Open /dev/null on each of 0, 1 and 2 the caller closed (`<&- >&- 2>&-`). Otherwise
    the next files opened take those numbers: the background mount's ready pipe, which its
    child's redirection to /dev/null then shut (the command waited for the mount to end), or
    in a foreground mount whatever the log or the --on-complete command writes to its standard
    streams would land in the file that holds the number."""
    for fd, (name, mode) in enumerate((("stdin", "r"), ("stdout", "w"), ("stderr", "w"))):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: FD, as the lower are open
            os.set_inheritable(fd, True)  # a standard stream of the commands we run, too
        if getattr(sys, name) is None:  # closed when Python started
            setattr(sys, name, open(fd, mode, closefd=False))


# ---- mount ------------------------------------------------------------------------------------


@main.command()
@click.argument("src")
@click.argument("dst")
@click.argument("meta")
@click.argument("mountpoint")
@click.option("--mirror", "mirrors", multiple=True, metavar="URL", help="Another server of the same image (repeatable; any source kind): reads fail over to it and come back to SRC when it answers again. Its size (and ETag) must match SRC's.")
@click.option("--region-size", type=SIZE, help="Region size, a power of two 4K..1G (new clones; default 4K).")
@click.option("--overwrite-dst", is_flag=True,
              help="Let a new clone overwrite a DST that holds data (a file with data in it, a "
                   "device with a filesystem, partition table or other signature, or non-zero "
                   "bytes where sampled): refused without it.")
@click.option("--no-hydration", is_flag=True, help="Start with background hydration disabled.")
@click.option("--no-discard-passdown", is_flag=True, help="Zero discarded ranges in DST instead of punching holes.")
@click.option("--hydration-threshold", type=int, metavar="N", help="At most this many regions being copied at once (default 16 MiB worth from a file, 64 MiB from HTTP, 128 MiB from NBD, less for huge bitmaps); below it, hydration keeps about 0.2 s of copies queued at the source.")
@click.option("--hydration-batch-size", type=int, metavar="N", help="At most this many contiguous regions per copy (default 4 MiB worth, 8 MiB from NBD).")
@click.option("--max-rate", type=SIZE, default=0, metavar="RATE", help="Limit hydration to RATE bytes/s (e.g. 50M).")
@click.option("--copy-on-read/--no-copy-on-read", default=True, help="Hydrate regions as they are read (default on).")
@click.option("--write-cache", type=SIZE, default="1G", show_default=True,
              help="Written data the kernel may cache before writers wait for the daemon; 0 for "
                   "write-through. fsync still reaches DST. Write-through on a regular-file mountpoint.")
@click.option("--passthrough", is_flag=True,
              help="Once the clone is complete at mount, let the kernel read and write DST "
                   "directly (FUSE passthrough: root, a regular-file DST, Linux 6.9+). That mount "
                   "has no write cache, and its first writable open marks the whole image "
                   "written for `diff`.")
@click.option("--record-access", metavar="TRACE", type=click.Path(dir_okay=False),
              help="Write the regions users read from the source to TRACE, in first-read order (an access trace for --prefetch).")
@click.option("--prefetch", metavar="TRACE", type=click.Path(dir_okay=False),
              help="Hydrate the regions of TRACE (recorded with --record-access from the same source) first, at full depth while users wait for them (one small copy at a time while they only read other hydrated data), even with --no-hydration.")
@click.option("--allow-other", is_flag=True,
              help="Let users other than the mounting one reach the image at all; DST's owner and "
                   "mode still decide who may open it.")
@click.option("--http-header-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Send the headers in FILE (`Name: value` lines, e.g. `Authorization: Bearer ...`) with every request to an http(s):// or s3:// source; re-read when the server answers 401/403, so a rotated token is picked up.")
@click.option("--name", default="image", show_default=True, metavar="NAME", help="File name of the image in a directory mountpoint.")
@click.option("--foreground", "-f", is_flag=True, help="Stay attached until unmounted or signalled.")
@click.option("--on-complete", metavar="CMD",
              help="Run CMD when hydration completes, and again at every mount of a clone "
                   "complete already (one cut short by a crash or a stop runs again): make it "
                   "safe to repeat. FUSECLONE_DESTINATION and FUSECLONE_METADATA are set.")
@click.option("--log-file", type=click.Path(dir_okay=False), help="Log here (background default: <identity of META>.log in the runtime directory, /run/fuseclone for root; shown by status).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True,
              help="The least severe messages the daemon logs.")
@click.option("--metrics-listen", metavar="HOST:PORT", callback=lambda ctx, param, value: _listen_address(value),
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (:PORT for every address).")
def mount(src, dst, meta, mountpoint, mirrors, region_size, overwrite_dst, no_hydration,
          no_discard_passdown, hydration_threshold, hydration_batch_size, max_rate, copy_on_read, write_cache,
          passthrough, record_access, prefetch, allow_other, http_header_file, name, foreground, on_complete,
          log_file, log_level, metrics_listen) -> None:
    """Serve a clone of SRC (path, nbd[s]://, nbd[s]+unix://, http(s)://, s3://) as an image at MOUNTPOINT,
    hydrating into DST and tracking progress in META."""
    from .cmdline import mask_url_queries
    from .daemon import MountOptions
    from .engine import Settings, check_hydration_setting
    from .limits import ensure_open_files

    mask_url_queries()  # a pre-signed URL's signature, which `ps` would show for the mount's life
    ensure_open_files()
    for option, value in (("--hydration-threshold", hydration_threshold),
                          ("--hydration-batch-size", hydration_batch_size)):
        if value is not None:
            check_hydration_setting(option, value)
    settings = Settings(hydration=not no_hydration, discard_passdown=not no_discard_passdown,
                        copy_on_read=copy_on_read, hydration_threshold=hydration_threshold or 0,
                        hydration_batch_size=hydration_batch_size or 0, max_rate=max_rate)
    # Absolute, so that status, list and metrics name them usefully from any directory, and
    # so that the daemon need not stay in this one (it keeps no directory busy).
    src = with_absolute_paths(src) if is_remote(src) else os.path.abspath(_callers_file(src))
    mirrors = tuple(with_absolute_paths(m) if is_remote(m) else _absolute(_callers_file(m))
                    for m in mirrors)
    dst, meta, mountpoint, record_access, prefetch, log_file, http_header_file = (
        path and _absolute(_callers_file(path))
        for path in (dst, meta, mountpoint, record_access, prefetch, log_file, http_header_file))
    opts = MountOptions(source=src, destination=os.path.abspath(dst), metadata=meta,
                        mountpoint=mountpoint,
                        region_size=region_size, settings=settings, allow_other=allow_other,
                        name=name, on_complete=on_complete, write_cache=write_cache,
                        http_header_file=http_header_file and os.path.abspath(http_header_file),
                        metrics_listen=metrics_listen, notify=foreground,
                        mirrors=mirrors, record_access=record_access, prefetch=prefetch,
                        log_file=log_file, passthrough=passthrough,
                        workdir=_working_directory(), overwrite_dst=overwrite_dst)
    if foreground:
        _mount_foreground(opts, log_file, log_level, None)
    else:
        _refuse_background_as_namespace_init()
        _mount_background(opts, log_file, log_level)


def _refuse_background_as_namespace_init() -> None:
    """A background mount's daemon outlives this command, except where this command is process
    1 of a PID namespace: when it exits, the kernel kills every other process of the namespace,
    the daemon with it, and the clone would be left without its last commit (mounted and dead,
    or gone with its mount namespace)."""
    if os.getpid() == 1:
        fail("this command is process 1 of its PID namespace (`unshare --pid --fork`, a "
             "container's entrypoint): its exit would kill the mount's daemon; mount with "
             "--foreground, or from a process that stays")


_OWN_DESCRIPTORS = re.compile(r"^/(proc/(self|thread-self|\d+)/|dev/(fd/|stdin$|stdout$|stderr$))")


def _callers_file(path: str) -> str:
    """PATH as the daemon must see it. /proc/self/fd/N, /dev/fd/N and /dev/stdin name this
    command's descriptors, which the daemon (a child that closes them) does not share: it
    would open whatever it holds as N itself (its source, say, as DST). Such a path is resolved
    here to the file it names; every other one is left as the user spelled it."""
    if _OWN_DESCRIPTORS.match(os.path.abspath(path)):
        return os.path.realpath(path)
    return path


def _absolute(path: str) -> str:
    """PATH from this directory, its '..' left for the kernel to resolve (through symlinks,
    as the relative path would have been)."""
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def _listen_address(value: str | None) -> tuple[str | None, int] | None:
    if value is None:
        return None
    from .metrics import parse_listen_address

    try:
        return parse_listen_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _mount_foreground(opts, log_file, log_level, ready_fd, default_log: bool = False) -> None:
    startup_files.finish()  # its readers, before the daemon's own threads
    import trio

    from .daemon import check_paths, run_mount

    told = False

    def on_ready(image: str) -> None:
        nonlocal told
        if default_log:  # named by META's identity now that META exists
            _log_to_renamed_file(control.adopt_log(opts.metadata, log_file))
        if ready_fd is not None:
            try:
                os.write(ready_fd, os.fsencode(f"ready {image}\n"))
            except BrokenPipeError:  # nobody would know of this mount: it must not stay
                raise FusecloneError("the mount command went away before the image was ready "
                                     "(interrupted, or killed): not mounted") from None
            os.close(ready_fd)
            told = True
        else:
            _tell(f"fuseclone: serving {image}")
        startup_files.record()  # what this mount loaded, for the next one to read ahead

    try:
        if opts.log_file is not None:
            # Appending log lines to SRC, DST or META would damage them: refused before the
            # log is opened (run_mount checks the rest again, with the log in place).
            check_paths(opts)
        _setup_logging(log_file, log_level)
        trio.run(run_mount, opts, on_ready)
    except BaseException as exc:
        error = user_error(exc)
        if error is None:
            raise
        if ready_fd is not None and not told:
            try:
                os.write(ready_fd, os.fsencode(f"error {error}\n"))
            except BrokenPipeError:  # the mount command is gone: the log is left to say it
                logging.getLogger(__name__).error("%s", error)
        raise error from None


def _tell(notice: str) -> None:
    """A foreground mount's notice on stderr. Its reader may be gone (`2>&1 | head -1`, a
    closed terminal): the notice is lost then, but the mount must serve on."""
    try:
        click.echo(notice, err=True)
    except OSError as exc:
        logging.getLogger(__name__).debug("stderr: %s (%s)", describe(exc), notice)


def _mount_background(opts, log_file: str | None, log_level: str) -> None:
    """Serve the mount from a detached child, and return once it says the image is ready (or
    print the one-line error it reports).

    The child is a fork of this process, not a new interpreter: no thread exists yet, so the
    fork is safe, and it saves a second Python start-up and import (~0.2 s of time to first use).
    """
    read_end, write_end = os.pipe()
    default_log = log_file is None
    if default_log:
        control.ensure_runtime_dir()
        log_file = control.rotate_log(opts.metadata)
    startup_files.finish()  # its readers: the fork must find no other thread
    child = os.fork()
    if child == 0:
        os.close(read_end)
        os._exit(_serve_detached(opts, log_file, log_level, write_end, default_log))
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as ready:
            line = os.fsdecode(ready.readline()).strip()
    except KeyboardInterrupt:
        # Ctrl-C while the mount gets ready (a source slow to answer): it must not go on behind
        # a command that gave up, and create DST and META and mount. The child takes the
        # SIGINT as a foreground mount does: it stops, removing what it created.
        os.kill(child, signal.SIGINT)
        os.waitpid(child, 0)
        fail("interrupted: not mounted")
    if line.startswith("ready "):
        click.echo(f"{line[6:]}")
        _exit_now(0)
    if line.startswith("error "):
        os.waitpid(child, 0)
        fail(line[6:])
    _, status = os.waitpid(child, 0)
    fail(f"the mount process exited ({os.waitstatus_to_exitcode(status)}) before the image was "
         f"ready; see {log_file}")


def _exit_now(status: int) -> NoReturn:
    """Exit without the interpreter's teardown: this process has nothing left to clean up, and
    tearing down trio and the other imports took 30-60 ms of the mount command's time."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _serve_detached(opts, log_file: str, log_level: str, ready_fd: int, default_log: bool) -> int:
    """The forked child: a session of its own, no terminal, then the mount; its exit status."""
    os.setsid()
    # Out of the caller's directory, which the daemon would keep busy (an `umount` of its
    # filesystem refused) for the mount's life: every path it uses is absolute by now.
    _absolute_environment()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    # Like a daemon should: a descriptor inherited from the caller (a `flock LOCK fuseclone
    # mount` lock, a pipe someone waits on for EOF) must not live as long as the mount.
    os.closerange(3, ready_fd)
    os.closerange(ready_fd + 1, os.sysconf("SC_OPEN_MAX"))
    try:
        _mount_foreground(opts, log_file, log_level, ready_fd, default_log)
    except FusecloneError:
        return 1  # already reported through ready_fd
    except KeyboardInterrupt:  # the mount command's Ctrl-C, passed on before the image was ready
        logging.getLogger(__name__).error("the mount command was interrupted: not mounted")
        return 1
    except BaseException:
        logging.getLogger(__name__).exception("the mount failed")
        return 1
    return 0


# Files the libraries read later, whenever they (re)connect or refresh credentials
PATH_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                  "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CA_BUNDLE")


def _absolute_environment() -> None:
    """The PATH_VARIABLES given relative to the caller's directory, made absolute."""
    for name in PATH_VARIABLES:
        value = os.environ.get(name)
        if value and not os.path.isabs(value):
            os.environ[name] = os.path.join(os.getcwd(), value)


class _LogFile(logging.FileHandler):
    """A FileHandler that opens its file like the other files a mount opens by path after its
    checks (blockio.open_regular_file): a FIFO put there since would block the mount for ever.
    A character device (/dev/null) is a log too."""

    def _open(self):
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        # 0644 at most: created 0666 under umask 000, any user could write into the log
        fd = open_regular_file(self.baseFilename, flags, 0o644, char_device_ok=True)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


def _setup_logging(log_file: str | None, level: str) -> None:
    try:
        handler = _LogFile(log_file) if log_file else logging.StreamHandler()
    except OSError as exc:
        raise FusecloneError(f"cannot write the log file {log_file}: {exc.strerror}") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level.upper())


def _log_to_renamed_file(path: str) -> None:
    """The log file was renamed to PATH: the open handler writes on, and names it (status)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.baseFilename = path


# ---- status / message / wait / unmount -------------------------------------------------------


WAIT_SLICE = 60.0  # seconds per "wait" request: a mount that hangs is noticed this soon


def refuse_another_users_mount(target: str) -> None:
    """A mount answers only the user who made it and root (its control socket is that user's,
    in their runtime directory): say so, rather than what an unreachable socket or a locked
    META would make us say."""
    from .fuse.mount import fuse_mounts, resolve_outside_mounts

    if os.geteuid() == 0:
        return
    mounts = fuse_mounts()
    mountpoints = {mount.mountpoint for mount in mounts}
    real = resolve_outside_mounts(target, mountpoints)
    # A META is known by its identity (any name of it: a hard link too); a mountpoint by the
    # mount table alone, since a stat of it would wait for its daemon.
    target_file = None if real in mountpoints else _file_identity(real)
    for mount in mounts:
        if not mount.source.startswith(control.FSNAME_PREFIX) or mount.uid in (None, os.geteuid()):
            continue
        meta = mount.source[len(control.FSNAME_PREFIX):]
        if real == mount.mountpoint or (target_file is not None
                                        and target_file == _file_identity(meta)):
            who = "root" if mount.uid == 0 else f"its user, uid {mount.uid}"
            raise FusecloneError(f"permission denied: the mount of {meta} belongs to another "
                                 f"user (run as {who})")


def _file_identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of PATH, or None when it cannot be seen."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def read_status(target: str) -> Status:
    """Live status from the mount of TARGET, or offline status from its META."""
    refuse_another_users_mount(target)
    reach = control.reach(target)
    reply = reach.request({"op": "status"})
    if reply is not None:
        return Status.from_reply(reply)
    return offline_status(reach.meta)


def _status_while_stopping(reach: control.Reach) -> Status:
    """Live status of the mount REACH leads to, or, once it closed or is closing, META's
    offline status after the mount lets go of it."""
    try:
        reply = reach.request({"op": "status"})
    except control.NotAnswering:
        raise
    except FusecloneError:  # the mount closed the connection: it is stopping
        reply = None
    if reply is None:
        return _offline_status_once_released(reach.meta)
    return Status.from_reply(reply)


def offline_status(meta_path: str) -> Status:
    from .metadata import Metadata, feature_names

    with Metadata.open(meta_path, writable=False) as meta:
        h = meta.header
        ident = h.identity
        used_blocks, total_blocks = meta.block_usage()
        return Status(
            hydrated_regions=meta.hydrated_count, total_regions=h.nr_regions,
            hydrating_regions=0, region_size=h.region_size, image_size=h.source_size,
            features=feature_names(h.features), hydration_threshold=h.hydration_threshold,
            hydration_batch_size=h.hydration_batch_size,
            hydration_enabled=not ("no_hydration" in feature_names(h.features)),
            hydration_error=None, metadata_mode="ro", bytes_per_second=0.0, eta_seconds=None,
            source=describe_spec(str(ident.get("source", {}).get("path")
                                     or ident.get("source", {}).get("url", "?"))),
            destination=str(ident.get("destination", {}).get("path", "?")),
            metadata=meta_path, live=False, clean=h.clean, log_file=_existing(control.log_path(meta_path)),
            written_regions=meta.written_regions(), written_bytes=meta.written_bytes(),
            written_unknown=h.written_unknown, hydrated_image_bytes=meta.hydrated_bytes(),
            metadata_used_blocks=used_blocks,
            metadata_total_blocks=total_blocks, **_lost_writes_fields(meta_path, h.uuid))


def _lost_writes_fields(meta_path: str, clone: bytes) -> dict:
    """What the last mount of META (the clone whose uuid is CLONE) recorded of the cached
    writes it lost, as status fields."""
    lost = control.lost_writes(meta_path, clone)
    if lost is None:
        return {}
    return {"lost_write_bytes": lost.bytes, "lost_write_ranges": lost.ranges,
            "lost_writes": lost.summary}


def _existing(path: str) -> str | None:
    return path if os.path.exists(path) else None


@main.command()
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.option("--dmsetup", is_flag=True, help="Print dm-clone's status line.")
@click.option("--watch", "-w", is_flag=True, help="Update live until hydration is complete.")
def status(target, as_json, dmsetup, watch) -> None:
    """Show hydration progress of a mountpoint or a META file."""
    chosen = [name for name, on in (("--json", as_json), ("--dmsetup", dmsetup), ("--watch", watch)) if on]
    if len(chosen) > 1:  # one of them would be ignored
        raise FusecloneError(f"{', '.join(chosen[:-1])} and {chosen[-1]} do not go together: "
                             "choose one")
    if watch:
        from .progress import watch_status

        # META, not the mountpoint, is asked each time: once the mount goes away the
        # mountpoint leads nowhere, and META's offline status is the last one to draw.
        refuse_another_users_mount(target)
        reach = control.reach(target)
        watch_status(lambda: _status_while_stopping(reach))
        return
    st = read_status(target)
    if as_json:
        click.echo(st.to_json())
    elif dmsetup:
        click.echo(st.dmsetup_line())
    else:
        from .progress import render_status  # rich: only for the human-readable form

        render_status(st)


@main.command(context_settings={"ignore_unknown_options": True})  # `hydration_threshold -1` is a word
@click.argument("target")
@click.argument("words", nargs=-1, required=True)
def message(target, words) -> None:
    """Send a dm-clone message to a live mount: enable_hydration, disable_hydration,
    hydration_threshold N, hydration_batch_size N; and max_rate RATE (0: unlimited)."""
    refuse_another_users_mount(target)
    reply = control.reach(target).request({"op": "message", "text": " ".join(words)})
    if reply is None:
        fail(f"{target}: no live mount to send the message to")
    if not reply.get("ok"):
        fail(reply.get("error", "message refused"))


@main.command()
@click.argument("target")
@click.option("--timeout", type=SECONDS, help="Give up after this many seconds (exit 1).")
def wait(target, timeout) -> None:
    """Wait until hydration is complete (exit 0), or stops on errors or the timeout passes
    (exit 1)."""
    refuse_another_users_mount(target)
    reach = control.reach(target)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        remaining = WAIT_SLICE if deadline is None else max(0.0, deadline - time.monotonic())
        st = _wait_for_hydration(reach, min(remaining, WAIT_SLICE))
        if st.complete:
            return
        if not st.live:
            fail(f"{target}: not complete ({st.hydrated_regions}/{st.total_regions} regions) "
                 "and no mount is hydrating it")
        if st.metadata_error:
            raise MetadataFailedError(st.metadata_error)
        if st.hydration_error:
            fail(f"hydration stopped: {st.hydration_error}")
        if deadline is not None and time.monotonic() >= deadline:
            click.echo(f"fuseclone: timed out at {st.fraction:.1%} hydrated", err=True)
            sys.exit(1)


def _wait_for_hydration(reach: control.Reach, seconds: float) -> Status:
    """Status once the mount REACH leads to is complete, has stopped, or SECONDS passed (the
    mount answers at that moment: no polling). Offline status when no mount answers."""
    try:
        reply = reach.request({"op": "wait", "timeout": seconds}, timeout=seconds + 10)
    except control.NotAnswering:
        raise
    except FusecloneError:  # unmounted while waiting
        return _offline_status_once_released(reach.meta)
    if reply is not None:
        if not reply.get("ok"):  # too many waits pending, say
            raise FusecloneError(reply.get("error", "wait refused"))
        return Status.from_reply(reply)
    return offline_status(reach.meta)


def _offline_status_once_released(meta: str, timeout: float = 60) -> Status:
    """Offline status of a mount that is shutting down: it lets go of META after its last
    commit."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return offline_status(meta)
        except MetadataInUseError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


@main.command()
@click.argument("mountpoint")
@click.option("--timeout", type=SECONDS, default=60, show_default=True,
              help="Seconds the mount has to commit and unmount (exit 1 after).")
@click.option("--lazy", is_flag=True,
              help="Detach even while the image is open, like umount -l: the writes cached so far "
                   "are handed over first, later I/O of the holders fails.")
def unmount(mountpoint, timeout, lazy) -> None:
    """Commit and unmount. Refuses, like umount, while anything has the image open."""
    refuse_another_users_mount(mountpoint)
    mountpoint = _mountpoint_of(mountpoint)
    if control.cleanup_stale_mount(mountpoint):
        click.echo(f"fuseclone: cleaned a stale mount at {mountpoint}", err=True)
        return
    found = control.find_mount(mountpoint)
    if found is None:
        control.refuse_inside_a_mount(mountpoint, "unmount that mountpoint")
        fail(f"{mountpoint}: not a fuseclone mountpoint")
    meta, real = found
    if not lazy:
        _refuse_while_loop_devices_use(mountpoint, real, min(timeout, LOOP_DETACH_GRACE))
    # A lazy unmount is answered at once (the write-back and detach follow), so a daemon that
    # does not answer within the usual deadline is stopped or hung: detach it from here.
    answer_within = min(timeout, control.REQUEST_TIMEOUT) if lazy else timeout
    try:
        reach = control.reach(mountpoint)
        reply = _request_unmount(reach, real, lazy, answer_within)
        if reply is None:
            raise FusecloneError(f"{mountpoint}: the mount does not answer on its control socket")
    except FusecloneError as exc:  # no answer; nothing else raises
        if _cleaned_once_gone(mountpoint, closed=not isinstance(exc, control.NotAnswering)):
            fail(f"{mountpoint}: the mount's daemon ended while unmounting (killed?), and its "
                 f"stale mount was cleaned: {_MAY_BE_LOST}")
        if not lazy:
            fail(f"{exc}; `fuseclone unmount --lazy` detaches it anyway")
        _detach_unanswered(real, str(exc))
        return
    if reply.get("busy"):
        holders = ", ".join(f"{pid} ({name})" for pid, name in processes_using(mountpoint))
        fail(f"{mountpoint} is in use{' by ' + holders if holders else ''}: close the image first "
             f"(or detach it anyway with --lazy)")
    if not reply.get("ok"):
        fail(f"{mountpoint}: {reply.get('error', 'unmount failed')}")
    from .metadata import Metadata

    # Done when the daemon has let go of META: its last commit, and marking the metadata clean,
    # come after the unmount itself. A daemon reached by its device holds META under another
    # name than the fsname's (moved away; the fsname's path is another clone's META).
    if reach.socket is not None:
        meta = reply.get("metadata_path") or meta
    deadline = time.monotonic() + timeout
    sock = reach.socket or control.socket_path(meta)
    while control.meta_of_mountpoint(real) is not None or os.path.exists(sock) or Metadata.in_use(meta):
        if time.monotonic() > deadline:
            if control.meta_of_mountpoint(real) is None:  # its last commit is what waits
                fail(f"{mountpoint}: unmounted, but the mount has not let go of {meta} after "
                     f"{timeout:.0f} s ({control.why_not_answering(reply.get('pid'))})")
            fail(f"{mountpoint}: still mounted after {timeout:.0f} s")
        time.sleep(0.05)
    log_file = reply.get("log_file") or "its log"
    lost = control.lost_writes(meta, _clone_uuid(meta))
    lost_line = (None if lost is None else "the mount lost writes the kernel had acknowledged "
                 f"from its cache: {lost.summary}")
    if reply.get("metadata_mode") == "fail":
        # A daemon of a release before 2026-11-29 sends no metadata_error.
        why = ended_in_fail_mode(reply.get("metadata_error") or f"a failed write (see {log_file})")
        fail(f"{mountpoint}: unmounted, but {why}" + (f"; {lost_line}" if lost_line else ""))
    if reply.get("metadata_mode") == "rw" and not _marked_clean(meta):
        fail(f"{mountpoint}: unmounted, but the mount ended without its last commit (its daemon "
             f"was killed, or the commit failed: see {log_file}): {_MAY_BE_LOST}")
    if lost_line is not None:
        fail(f"{mountpoint}: unmounted, but {lost_line} (see {log_file})")
    _say_if_not_complete(mountpoint, reply)


def _say_if_not_complete(mountpoint: str, reply: dict) -> None:
    """An unmount ends a clone at any progress (mounting again resumes it), but its DST is no
    copy of the image to use alone until hydration is complete: said, lest a switch to DST
    (the walkthrough's last step) take the part for the whole."""
    hydrated, total = reply.get("hydrated_regions"), reply.get("total_regions")
    if isinstance(hydrated, int) and isinstance(total, int) and hydrated < total:
        click.echo(f"fuseclone: {mountpoint}: unmounted with hydration not complete ({hydrated}/"
                   f"{total} regions): DST is not a whole copy of the image yet; mount again to "
                   "resume", err=True)


def _mountpoint_of(target: str) -> str:
    """TARGET, a mountpoint; or, for a META file, where its live mount is (its daemon says)."""
    if control.find_mount(target) is not None:
        return target
    control.refuse_inside_a_mount(target, "unmount that mountpoint")
    if not os.path.isfile(target):
        return target  # what it is not is said next
    reply = control.request(target, {"op": "status"})
    where = reply.get("mountpoint") if isinstance(reply, dict) else None
    if not isinstance(where, str):
        fail(f"{target}: no live mount of this metadata file")
    return where


# What a daemon of a release before the unmount request's "mountpoint" (until 2026-11-28)
# answers to it: one mounted before the package was upgraded under it.
_REFUSED_BY_EARLIER_DAEMONS = 'unmount takes no field "mountpoint"'


def _request_unmount(reach: control.Reach, real: str, lazy: bool,
                     timeout: float) -> dict | None:
    """The unmount request to the mount REACH leads to, which must be the one at REAL (META's
    path may name another mount's META by now). A daemon of an earlier release takes no
    mountpoint to check: its status must name REAL, then it is asked without one."""
    meta = reach.meta
    reply = reach.request({"op": "unmount", "lazy": lazy, "mountpoint": real}, timeout=timeout)
    if reply is None or reply.get("error") != _REFUSED_BY_EARLIER_DAEMONS:
        return reply
    where = (reach.request({"op": "status"}, timeout=timeout) or {}).get("mountpoint")
    found = control.find_mount(where) if isinstance(where, str) else None
    if found is None or found[1] != real:
        return {"ok": False, "error": f"the mount of {meta} is not the one at {real} (META was "
                "moved, and another clone made at its path?)"}
    return reach.request({"op": "unmount", "lazy": lazy}, timeout=timeout)


DYING_GRACE = 1.0  # seconds a daemon that closed its connection unanswered may take to be gone


def _cleaned_once_gone(mountpoint: str, closed: bool) -> bool:
    """Whether the daemon of MOUNTPOINT was killed (its stale mount is then cleaned). One
    killed while it answered an unmount closes that connection before its listening socket
    (its descriptors close one after another), so a connection CLOSED unanswered is followed
    by a moment's look for its end."""
    deadline = time.monotonic() + (DYING_GRACE if closed else 0.0)
    while not control.cleanup_stale_mount(mountpoint):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


_MAY_BE_LOST = ("writes not flushed before the unmount may be lost; mount again to resume from "
                "META")


def _clone_uuid(meta: str) -> bytes | None:
    """The uuid of the clone META holds; None when its header cannot be read (another mount
    holds META by now, or it is gone)."""
    from .metadata import Metadata

    try:
        return Metadata.read_header(meta).uuid
    except (FusecloneError, OSError):
        return None


def _marked_clean(meta: str) -> bool:
    """Whether META says its last mount ended with its last commit (as far as one can tell: a
    META that another mount holds by now, or that is gone, counts as clean)."""
    from .metadata import Metadata

    try:
        return Metadata.read_header(meta).clean
    except (FusecloneError, OSError):
        return True


LOOP_DETACH_GRACE = 5.0  # seconds `unmount` waits for loop devices `losetup -d` left detaching


def _refuse_while_loop_devices_use(mountpoint: str, real: str, grace: float) -> None:
    """Refuse while a loop device has the image as its backing file. One that `losetup -d`
    only marked to detach at its last close, because something else had it open (a udev or
    blkid probe after a write, say), is waited for GRACE seconds: its user detached it."""
    deadline = time.monotonic() + grace
    told = False
    while loops := loop_devices_of(real):
        for loop in loops:
            if not _detaching(loop):
                fail(f"{loop} still uses the image at {mountpoint}: {_how_to_let_go(loop)}")
        if time.monotonic() >= deadline:
            openers = ", ".join(f"{pid} ({name})" for pid, name in _processes_with_open(loops[0]))
            fail(f"{loops[0]} still uses the image at {mountpoint}: it is detached once closed "
                 f"(losetup -d), but {openers or 'something'} still has it open: close it first")
        if not told:
            click.echo(f"fuseclone: waiting for {', '.join(loops)} to detach (losetup -d): "
                       "something still has it open", err=True)
            told = True
        time.sleep(0.05)


def _detaching(loop: str) -> bool:
    """Whether LOOP detaches by itself once its last opener closes it: marked so (`losetup -d`,
    or set up with autoclear) and not mounted (then the unmount must come first)."""
    from .fuse.mount import mountpoints_of

    try:
        with open(f"/sys/block/{os.path.basename(loop)}/loop/autoclear") as f:
            autoclear = f.read().strip() == "1"
    except OSError:  # detached meanwhile: the next look finds it gone
        return True
    return autoclear and not mountpoints_of(loop)


def _how_to_let_go(loop: str) -> str:
    """What frees LOOP: detaching it, after unmounting its filesystem (`losetup -d` of a mounted
    loop device only marks it to detach once unmounted)."""
    from .fuse.mount import mountpoints_of

    mounted = mountpoints_of(loop)
    if mounted:
        return f"it is mounted at {', '.join(mounted)}: umount it, then detach it (losetup -d {loop})"
    return f"detach it first (losetup -d {loop})"


def _detach_unanswered(real_mountpoint: str, why: str) -> None:
    """unmount --lazy of a mount whose daemon does not answer: detach it from here (unless
    another filesystem is mounted over it: the detach would reach that one)."""
    from .fuse.mount import check_clone_on_top, unmount as detach

    check_clone_on_top(real_mountpoint)
    try:
        detach(real_mountpoint, lazy=True)
    except OSError as exc:
        fail(f"{why}; detaching {real_mountpoint} failed: {exc.strerror}")
    click.echo(f"fuseclone: {why}; detached {real_mountpoint} lazily: the daemon lets go of its "
               "META once it runs again (or is killed)", err=True)


def processes_using(mountpoint: str) -> list[tuple[int, str]]:
    """(pid, command name) of the processes with a file or directory open under the mountpoint,
    as far as /proc lets this user see."""
    real = os.path.realpath(mountpoint)
    under = real.rstrip("/") + "/"
    return _processes_with_open(real, under)


def _processes_with_open(path: str, under: str | None = None) -> list[tuple[int, str]]:
    """(pid, command name) of the processes with PATH (or anything UNDER a directory) open or
    as their cwd, as far as /proc lets this user see."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            links = [os.readlink(f"/proc/{entry}/cwd")]
            links += [os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")]
            if any(link == path or (under and link.startswith(under)) for link in links):
                with open(f"/proc/{entry}/comm") as f:
                    found.append((int(entry), f.read().strip()))
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return found


def loop_devices_of(real_mountpoint: str) -> list[str]:
    """Loop devices whose backing file lives on this mount (its resolved path, as the mount
    table has it: a stat of the mountpoint would wait for a stopped daemon)."""
    from .identity import loop_backing_file

    real = real_mountpoint
    found = []
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return found
    for name in names:
        if not name.startswith("loop"):
            continue
        backing = loop_backing_file(f"/sys/block/{name}")
        if backing is None:
            continue
        if backing == real or backing.startswith(real.rstrip("/") + "/"):
            found.append(f"/dev/{name}")
    return found


# ---- list / metrics -----------------------------------------------------------------------------


LIST_TIMEOUT = 3.0  # seconds every clone together has to answer `list` and `metrics`
LIST_COLUMNS = ("MOUNTPOINT", "IMAGE", "SOURCE", "DST", "META", "PROGRESS", "RATE", "STATE")


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.option("--timeout", type=SECONDS, default=LIST_TIMEOUT, show_default=True,
              help="Seconds the clones have to answer, all together.")
def list_clones(as_json, timeout) -> None:
    """List every live clone on this machine, like losetup -l: a daemon that does not answer
    (stopped, killed) shows as such."""
    from .clones import live_clones

    clones = live_clones(timeout)
    if as_json:
        click.echo(json.dumps([clone.to_json() for clone in clones], indent=2))
        return
    rows = [LIST_COLUMNS] + [_list_row(clone) for clone in clones]
    widths = [max(len(row[i]) for row in rows) for i in range(len(LIST_COLUMNS) - 1)]
    for row in rows:
        click.echo("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[-1]]))


def _list_row(clone) -> tuple[str, ...]:
    from .status import human_bytes

    doc, st = clone.to_json(), clone.status
    progress = f"{st.fraction:.1%}" if st else "-"
    rate = f"{human_bytes(st.bytes_per_second)}/s" if st and st.live else "-"
    mountpoint = doc["mountpoint"]
    if clone.other_namespace:  # where `nsenter -t PID -m fuseclone unmount` reaches it
        mountpoint += f" (mount namespace of pid {st.pid})"
    return (mountpoint, doc["image"] or "-", doc["source"] or "-",
            doc["destination"] or "-", doc["metadata"], progress, rate, doc["state"])


@main.command()
@click.option("--timeout", type=SECONDS, default=LIST_TIMEOUT, show_default=True,
              help="Seconds the clones have to answer, all together.")
def metrics(timeout) -> None:
    """Print Prometheus metrics of every live clone (text format, e.g. for node_exporter's
    textfile collector); `mount --metrics-listen` serves one clone's over HTTP."""
    from .clones import live_clones
    from .metrics import Sample, exposition

    # Another user's clones are left out: they are not down, only out of this user's reach.
    clones = [clone for clone in live_clones(timeout) if not clone.another_users]
    click.echo(exposition(Sample(c.mountpoint, c.metadata, c.status) for c in clones), nl=False)


# ---- check ------------------------------------------------------------------------------------

_NOT_A_META_INSIDE = "a clone's mount holds its image alone, never a META"


def _refuse_a_live_meta(meta: str, command: str) -> NoReturn:
    fail(f"{meta} is in use by a live mount: unmount it first ({command} reads META offline; "
         "`fuseclone status` shows a live one)")


@main.command()
@click.argument("meta")
@click.option("--src", metavar="SRC", help="Check META against this source.")
@click.option("--dst", metavar="DST", help="Check META against this destination.")
@click.option("--verify", is_flag=True, help="Compare with SRC every region of DST that is hydrated and was never written by users (exit 1 if one differs).")
def check(meta, src, dst, verify) -> None:
    """Validate a metadata file (like thin_check); optionally verify DST against SRC."""
    from .checker import run_check

    if verify and not (src and dst):
        fail("--verify needs --src and --dst")
    control.refuse_inside_a_mount(meta, _NOT_A_META_INSIDE)
    try:
        ok = run_check(meta, src, dst, verify, echo=click.echo)
    except MetadataInUseError:
        _refuse_a_live_meta(meta, "check")
    if not ok:
        sys.exit(1)


@main.command()
@click.argument("meta")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def diff(meta, as_json) -> None:
    """List the parts of the image users wrote, discarded or zeroed (changed-block tracking,
    in chunks of the written granularity): what an incremental backup must copy."""
    from .metadata import Metadata

    control.refuse_inside_a_mount(meta, _NOT_A_META_INSIDE)
    try:
        opened = Metadata.open(meta, writable=False)
    except MetadataInUseError:
        _refuse_a_live_meta(meta, "diff")
    with opened:
        doc = {"granularity": opened.written_geometry.region_size,
               "image_size": opened.geometry.image_size,
               "extents": [{"offset": o, "length": n} for o, n in opened.written_extents],
               "written_bytes": opened.written_bytes(),
               "written_unknown": opened.header.written_unknown}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    for extent in doc["extents"]:
        click.echo(f"{extent['offset']:>16} {extent['length']:>16}")
    click.echo(f"{doc['written_bytes']} bytes written in {len(doc['extents'])} extents "
               f"(granularity {doc['granularity']}, image {doc['image_size']} bytes)")
    if doc["written_unknown"]:
        click.echo("note: this metadata predates changed-block tracking (format 1, or upgraded "
                   "from it): writes made before then are not listed")


@main.command()
@click.option("--size", type=SIZE, default="256M", show_default=True, help="Size of the sample image.")
@click.option("--rate", type=SIZE, default="64M", show_default=True, help="Bandwidth of the slow source, bytes/s.")
@click.option("--latency-ms", type=float, default=2.0, show_default=True, help="Added latency of each source read.")
@click.option("--keep", is_flag=True, help="Keep the work directory for a look afterwards.")
def demo(size, rate, latency_ms, keep) -> None:
    """Clone a sample ext4 image from a deliberately slow source, use it at once, watch it hydrate."""
    from .demo import MIN_SIZE, run_demo

    # Before anything is made: mkfs.ext4 and nbdkit refused these with a traceback
    if size < MIN_SIZE:
        raise FusecloneError(f"--size must be at least {MIN_SIZE >> 20}M, the sample's files need it")
    if rate <= 0:
        raise FusecloneError("--rate must be more than 0 bytes/s")
    if not 0 <= latency_ms < math.inf:
        raise FusecloneError(f"--latency-ms must be 0 or more, not {latency_ms:g}")
    sys.exit(run_demo(size=size, rate=rate, latency_ms=latency_ms, keep=keep))


if __name__ == "__main__":
    main()
