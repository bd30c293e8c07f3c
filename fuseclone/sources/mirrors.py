"""One image on several servers (the primary source and its mirrors), behind one Source; and a
resumed clone's source that is not reachable yet.

`open_mirrored_source` opens every server through `open_source`, each in a task of its own that
holds it open, and serves reads from the first usable one in the order given, the primary first.
A read that fails on one (SourceReadError: a server error, a dropped connection, a timeout) is
tried on the next; the failed server is probed every PROBE_INTERVAL and serves again once it
answers, so reads come back to the primary.

A server that cannot be reached is dialled again in the background, with backoff. That is how a
resumed clone mounts while its source is down: its image size and identity come from META
(`RecordedSource`), reads fail (the engine answers EIO) until a server answers, and every server
that answers later is checked against META first; one that serves another image is refused for
good (`wait_usable` says why once no server is left). Mirrors must serve the primary's image:
its size, its ETag where both carry one, and its data sample (`Source.take_sample`: with
mirrors, every server's first and last 64 KiB are read, whatever its kind); a mirror refused
while opening is one clear line.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import trio

from ..errors import SourceError
from . import check_scheme, describe_spec, open_source, takes_http_headers
from .base import (SAMPLE_KEY, SAMPLED, Extent, ServerStatus, Source, SourceReadError,
                   differences, sample_differs)

log = logging.getLogger(__name__)

RECONNECT_INITIAL = 0.25  # seconds before dialling an unreachable server again, doubling...
RECONNECT_MAX = 4.0  # ...up to this
PROBE_INTERVAL = 2.0  # seconds between probes of a server whose reads failed
PROBE_BYTES = 4096

T = TypeVar("T")


@dataclass(frozen=True)
class RecordedSource:
    """The source as META recorded it: what a server that answers later must match."""

    size: int
    identity: dict


class _State(enum.Enum):
    UNREACHABLE = "unreachable"  # not open (yet): dialled again in the background
    UP = "up"
    FAILING = "failing"  # open, but its last read failed: probed until one succeeds
    REFUSED = "refused"  # it serves another image: never used


class _Server:
    def __init__(self, spec: str, role: str, header_file: str | None) -> None:
        self.spec = spec
        self.description = describe_spec(spec)  # the source's own, once it opened
        self.role = role
        self.header_file = header_file
        self.source: Source | None = None
        self.state = _State.UNREACHABLE
        self.error: str | None = None
        self.attempted = trio.Event()  # the first attempt to open it is over

    @property
    def usable(self) -> bool:
        return self.state in (_State.UP, _State.FAILING)


def mirror_mismatch(reference_size: int, reference: dict, mirror: Source) -> str | None:
    """Why `mirror` does not serve the image of `reference` (an identity of the primary, of
    `reference_size` bytes), or None when it does: the sizes must be equal, and so must the
    ETags where both carry one (an S3 or HTTP object). Other fields (a URL, a path, an mtime)
    name where the image lies, which is what differs between mirrors. Their data samples must
    be equal too, where both have one."""
    if mirror.size != reference_size:
        return f"it has {mirror.size} bytes, the source {reference_size}"
    identity = mirror.identity()
    etag, reference_etag = identity.get("etag"), reference.get("etag")
    if etag is not None and reference_etag is not None and etag != reference_etag:
        return f"its ETag is {etag}, the source's {reference_etag}"
    if sample_differs(reference, identity):
        return f"its data differs from the source's ({SAMPLED})"
    return None


@contextlib.asynccontextmanager
async def open_mirrored_source(primary: str, mirrors: Sequence[str] = (),
                               recorded: RecordedSource | None = None, *,
                               http_header_file: str | None = None
                               ) -> AsyncIterator[MirroredSource]:
    """The source `primary` and its `mirrors` for the duration of the block. Without `recorded`
    (a new clone) the primary must answer, or its SourceError is raised; with it, the block
    starts anyway. A mirror that answers with another image raises SourceError naming it. The
    servers' connections and the probes live in a nursery this opener owns.
    `http_header_file` goes to the primary, and to each mirror whose requests carry headers."""
    servers = [_Server(primary, "primary", http_header_file)]
    servers += [_Server(spec, "mirror", http_header_file if takes_http_headers(spec) else None)
                for spec in mirrors]
    for server in servers:
        check_scheme(server.spec, server.header_file)  # a typo is refused, not dialled forever
    source = MirroredSource(servers, recorded)
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            for server in servers:
                nursery.start_soon(source._keep_open, server)
            for server in servers:
                await server.attempted.wait()
            source._check_opened()
            nursery.start_soon(source._probe_failing)
            yield source
        except BaseException as exc:
            # Raised again below, outside the nursery, so that it propagates unchanged
            # instead of inside an ExceptionGroup.
            body_error = exc
        finally:
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error


class MirroredSource(Source):
    """Reads from the first usable of several servers of one image. Open with
    open_mirrored_source."""

    def __init__(self, servers: list[_Server], recorded: RecordedSource | None) -> None:
        self._servers = servers
        self._primary = servers[0]
        self._recorded = recorded
        self._opening = True
        self._changed = trio.lowlevel.ParkingLot()  # a server's state changed

    # ---- Source ---------------------------------------------------------------------------

    @property
    def description(self) -> str:  # type: ignore[override]
        return self._primary.description

    @property
    def size(self) -> int:
        if self._primary.source is not None:
            return self._primary.source.size
        assert self._recorded is not None, "opened without its primary or a recorded identity"
        return self._recorded.size

    @property
    def hydration_depth(self) -> int:  # type: ignore[override]
        opened = self._first_open()
        return Source.hydration_depth if opened is None else opened.hydration_depth

    @property
    def hydration_batch(self) -> int:  # type: ignore[override]
        opened = self._first_open()
        return Source.hydration_batch if opened is None else opened.hydration_batch

    def own_identity(self) -> dict[str, str | int]:
        """The primary's identity; until it answers, the recorded one (META keeps that)."""
        if self._primary.source is not None:
            return self._primary.source.identity()
        assert self._recorded is not None
        return self._recorded.identity

    def identity_matches(self, stored: dict) -> bool:
        """The primary's answer; until it answers, yes: it is checked when it does."""
        if self._primary.source is not None:
            return self._primary.source.identity_matches(stored)
        return True

    def same_identity(self, stored: dict, current: dict) -> bool:
        """The primary's kind's rule, once it answered."""
        if self._primary.source is not None:
            return self._primary.source.same_identity(stored, current)
        return stored == current

    def holds_no_data(self) -> bool:
        return self._primary.source is not None and self._primary.source.holds_no_data()

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        return await self._from_servers(lambda source: source.read(offset, length))

    async def read_for_copy(self, offset: int, length: int):
        return await self._from_servers(lambda source: source.read_for_copy(offset, length))

    async def extents(self, offset: int, length: int) -> list[Extent]:
        if not any(server.usable for server in self._servers):
            return [Extent(offset, length, zero=False)]  # nothing known
        return await self._from_servers(lambda source: source.extents(offset, length))

    def recycle(self, data: bytes | bytearray) -> None:
        # Buffers are plain memory of the size asked for: any server's pool may take them.
        serving = self._serving()
        if serving is not None and serving.source is not None:
            serving.source.recycle(data)

    async def wait_usable(self) -> str | None:
        while True:
            if any(server.usable for server in self._servers):
                return None
            if all(server.state is _State.REFUSED for server in self._servers):
                return "; ".join(f"{server.description}: {server.error}" for server in self._servers)
            await self._changed.park()

    def servers(self) -> list[ServerStatus]:
        serving = self._serving()
        return [ServerStatus(server.description, server.role, self._state_name(server, serving),
                             None if server is serving else server.error)
                for server in self._servers]

    # ---- reads ----------------------------------------------------------------------------

    async def _from_servers(self, call: Callable[[Source], Awaitable[T]]) -> T:
        """`call` on the first server that answers: those up in order, then the failing ones."""
        candidates = ([s for s in self._servers if s.state is _State.UP]
                      + [s for s in self._servers if s.state is _State.FAILING])
        if not candidates:
            raise SourceReadError(errno.EHOSTUNREACH, self._unusable_reason())
        error: SourceReadError | None = None
        for server in candidates:
            assert server.source is not None
            try:
                result = await call(server.source)
            except SourceReadError as exc:
                self._failed(server, exc)
                error = exc
                continue
            self._answered(server)
            return result
        assert error is not None
        raise error

    def _failed(self, server: _Server, exc: SourceReadError) -> None:
        server.error = str(exc)
        if server.state is _State.UP:
            server.state = _State.FAILING
            others = any(other.usable for other in self._servers if other is not server)
            log.warning("%s %s failed%s: %s", server.role, server.description,
                        ", reads go to the next server" if others else "", exc)
            self._changed.unpark_all()

    def _answered(self, server: _Server) -> None:
        if server.state is _State.FAILING:
            server.state = _State.UP
            server.error = None
            log.info("%s %s answers again", server.role, server.description)
            self._changed.unpark_all()

    def _serving(self) -> _Server | None:
        """The server reads go to first now."""
        for state in (_State.UP, _State.FAILING):
            for server in self._servers:
                if server.state is state:
                    return server
        return None

    @staticmethod
    def _state_name(server: _Server, serving: _Server | None) -> str:
        if server is serving:
            return "serving"
        if server.state is _State.UP:
            return "standby"
        return server.state.value

    def _unusable_reason(self) -> str:
        errors = "; ".join(f"{server.description}: {server.error}" for server in self._servers)
        return f"no server of the source answers ({errors})"

    def _first_open(self) -> Source | None:
        """Whose hydration defaults apply: the primary's, else the first open server's."""
        for server in self._servers:
            if server.source is not None:
                return server.source
        return None

    # ---- servers --------------------------------------------------------------------------

    async def _keep_open(self, server: _Server) -> None:
        """Open `server` and hold it open; while it cannot be reached, dial it again with
        backoff. A server that serves another image is closed and refused."""
        delay = RECONNECT_INITIAL
        while True:
            try:
                async with open_source(server.spec, http_header_file=server.header_file) as source:
                    mismatch = await self._mismatch(server, source)
                    if mismatch is not None:
                        self._refuse(server, mismatch)
                        return
                    self._attach(server, source)
                    await trio.sleep_forever()
            except SourceError as exc:
                if server.error != str(exc):
                    log.warning("%s %s cannot be reached (trying again): %s", server.role,
                                server.description, exc)
                server.error = str(exc)
                server.attempted.set()
            await trio.sleep(delay)
            delay = min(2 * delay, RECONNECT_MAX)

    async def _mismatch(self, server: _Server, source: Source) -> str | None:
        """Why `source` (just opened for `server`) may not serve, or None."""
        recorded = self._recorded
        if server is self._primary:
            if len(self._servers) > 1 and source.sample is None:
                await source.take_sample()  # what mirrors are compared with
            if recorded is None or self._opening:
                return None  # a new clone's, or open_clone checks it against META itself
            if source.size != recorded.size or not source.identity_matches(recorded.identity):
                return (f"it now serves another image: "
                        f"{differences(recorded.size, recorded.identity, source)}")
            return None
        reference = await self._reference()
        if reference is None:
            return "the source did not answer"  # a new clone: the mount fails for that
        if SAMPLE_KEY in reference.identity and source.sample is None:
            await source.take_sample()
        return mirror_mismatch(reference.size, reference.identity, source)

    async def _reference(self) -> RecordedSource | None:
        """What a mirror must match: META's record, or a new clone's primary once it opened
        (None when it did not). A record without a data sample (of a source with a version
        mark, cloned without mirrors) is replaced by the primary, sampled because there are
        mirrors, when it answers as the source recorded: a mirror is then compared by its
        data, not by its size alone. While the primary is away, the record is all there is."""
        recorded = self._recorded
        if recorded is not None and SAMPLE_KEY in recorded.identity:
            return recorded
        await self._primary.attempted.wait()
        primary = self._primary.source
        if primary is None:
            return recorded
        if recorded is not None and (primary.size != recorded.size
                                     or not primary.identity_matches(recorded.identity)):
            return recorded  # another image: refused as such, not as a mirror that differs
        return RecordedSource(primary.size, primary.identity())

    def _attach(self, server: _Server, source: Source) -> None:
        if server.error is not None:
            log.info("%s %s answers: serving from it again", server.role, server.description)
        server.source = source
        server.description = source.description
        server.state = _State.UP
        server.error = None
        server.attempted.set()
        self._changed.unpark_all()

    def _refuse(self, server: _Server, reason: str) -> None:
        server.state = _State.REFUSED
        server.error = reason
        if not self._opening:
            log.error("%s %s refused: %s", server.role, server.description, reason)
        server.attempted.set()
        self._changed.unpark_all()

    def _check_opened(self) -> None:
        """After every server's first attempt: refuse what must be, warn about the rest."""
        self._opening = False
        primary = self._primary
        if primary.state is not _State.UP:
            if self._recorded is None:
                raise SourceError(primary.error or f"{primary.description}: source cannot be reached")
            log.warning("the source cannot be reached: serving hydrated data, and hydrating "
                        "once it answers")
        for server in self._servers[1:]:
            if server.state is _State.REFUSED:
                raise SourceError(f"mirror {server.description} does not serve the source's image: "
                                  f"{server.error}")

    async def _probe_failing(self) -> None:
        """Every PROBE_INTERVAL, a small read from each failing server: one that answers
        serves again (reads go to the first server up, so they come back to the primary)."""
        while True:
            await trio.sleep(PROBE_INTERVAL)
            for server in [s for s in self._servers if s.state is _State.FAILING]:
                assert server.source is not None
                try:
                    await server.source.read(0, min(PROBE_BYTES, server.source.size))
                except SourceReadError as exc:
                    server.error = str(exc)
                    continue
                self._answered(server)

