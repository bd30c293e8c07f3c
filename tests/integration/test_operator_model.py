"""Seeded random programs in which an operator works a live clone while its clients do I/O, checked
against a model of the image: `message` (every dm-clone message, `max_rate`, bad ones),
`status`, `wait --timeout`, `unmount` refused while the image is open, unmount and remount with
other options (`--no-hydration`, `--max-rate`, `--record-access` then `--prefetch` of that
trace, `--passthrough` once complete), SIGTERM and `unmount --lazy` while the clients still hold
the image open with writes in the kernel's cache, and `check --verify --src` while unmounted.
The source is a local file or (odd seeds) nbdkit behind a delay filter, so that hydration and
prefetches are in flight when the operator's commands land. Every read is checked against the
model; at the end DST alone, after `wait`, must be the model.

test_image_model.py runs the clients' side with a fixed order of remounts; this one draws the
operator's commands from the seed too. A failure names its seed and the last steps taken."""

import collections
import errno
import os
import random
import select
import signal

import pytest

from fuseclone.units import parse_size
from tests.engine.conftest import make_source_file
from tests.integration.conftest import daemon_pid, fuseclone, status_json
from tests.integration.test_image_model import REGION, ImageModel
from tests.sources.conftest import nbdkit  # noqa: F401  (the fixture)

MiB = 1 << 20
IMAGE = 16 * MiB + 3 * 4096  # not a whole number of 64 KiB regions
STOP_TIMEOUT = 60  # seconds a stopping daemon may take
BAD_MESSAGES = ["hydration_threshold 0", "hydration_batch_size -1", "hydration_threshold x",
                "hydration_batch_size 4294967296", "enable_hydration now", "resize 1",
                "max_rate fast"]


class Operator:
    """The operator's commands against one clone, and what `status` must say after them."""

    def __init__(self, rig, model: ImageModel, source: str):
        self.rig = rig
        self.model = model
        self.rng = model.rng
        self.source = source
        self.traces: list[str] = []  # traces recorded by mounts that have stopped
        self.recording: str | None = None
        self.mounted = False
        self.hydration = True  # what status must show as hydration_enabled
        self.tunables: dict[str, int] = {}  # messages persist in META: across remounts too
        self.max_rate = 0  # this mount's: --max-rate, then max_rate messages
        self.history: collections.deque[str] = collections.deque(maxlen=30)

    # ---- mounting ----------------------------------------------------------------------

    def mount(self, *options: str) -> None:
        self.history.append(f"mount {' '.join(options)}")
        self.rig.mount("--region-size", REGION, *options, src=self.source)
        self.mounted = True
        self.hydration = "--no-hydration" not in options
        rates = [options[i + 1] for i, option in enumerate(options) if option == "--max-rate"]
        self.max_rate = parse_size(rates[-1]) if rates else 0
        self.model.open(self.rig.image)
        self.check_status()

    def random_mount(self) -> None:
        options: list[str] = []
        kind = self.rng.choice(["plain", "no-hydration", "prefetch", "record", "passthrough"])
        if kind == "no-hydration":
            options.append("--no-hydration")
        elif kind == "prefetch" and self.traces:
            options += ["--prefetch", self.rng.choice(self.traces)]
        elif kind == "record":
            self.recording = str(self.rig.tmp / f"access{len(self.traces)}.trace")
            options += ["--record-access", self.recording]
        elif kind == "passthrough" and status_json(self.rig.meta)["complete"]:
            options.append("--passthrough")
        if self.rng.random() < 0.6:
            options += ["--max-rate", self.rng.choice(["256K", "1M", "8M"])]
        if self.rng.random() < 0.2:
            options += ["--write-cache", "0"]
        if self.rng.random() < 0.2:
            options.append("--no-copy-on-read")
        self.mount(*options)

    def stopped(self) -> None:
        """The mount is gone: its trace may be prefetched from now on."""
        self.mounted = False
        if self.recording:
            self.traces.append(self.recording)
            self.recording = None

    def unmount(self) -> None:
        if self.rng.random() < 0.3:
            self.model.check_all()
        self.model.close()
        fuseclone("unmount", self.rig.mnt)
        self.stopped()

    def verify_offline(self) -> None:
        result = fuseclone("check", self.rig.meta, "--src", self.source, "--dst", self.rig.dst,
                           "--verify", check=False)
        assert result.returncode == 0, result.stdout + result.stderr

    # ---- the operator's commands -------------------------------------------------------

    def message(self) -> None:
        kind = self.rng.choice(["enable_hydration", "disable_hydration", "hydration_threshold",
                                "hydration_batch_size", "max_rate", "bad"])
        if kind == "bad":
            text = self.rng.choice(BAD_MESSAGES)
            self.history.append(f"message {text}")
            result = fuseclone("message", self.rig.mnt, *text.split(), check=False)
            assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
            return
        if kind in ("hydration_threshold", "hydration_batch_size"):
            value = self.rng.choice([1, 2, 4, 16, 64, 1024])
            text = f"{kind} {value}"
            self.tunables[kind] = value
        elif kind == "max_rate":
            value = self.rng.choice(["0", "256K", "1M", "8M"])
            text = f"max_rate {value}"
            self.max_rate = parse_size(value)
        else:
            text = kind
            self.hydration = kind == "enable_hydration"
        self.history.append(f"message {text}")
        fuseclone("message", self.rig.mnt, *text.split())

    def check_status(self) -> dict:
        st = status_json(self.rig.mnt)
        assert st["live"] and st["metadata_mode"] == "rw" and st["metadata_error"] is None, st
        assert st["hydration_error"] is None and st["hydration_errors"] == 0, st
        assert st["hydration_enabled"] == self.hydration, st
        assert st["max_rate"] == self.max_rate, st
        for name, value in self.tunables.items():
            assert st[name] == value, (name, st)
        assert 0 <= st["hydrated_regions"] <= st["total_regions"], st
        assert st["complete"] == (st["hydrated_regions"] == st["total_regions"]), st
        return st

    def status(self) -> None:
        self.history.append("status")
        self.check_status()
        assert fuseclone("status", self.rig.mnt).stdout

    def wait(self) -> None:
        timeout = self.rng.choice(["0", "0.2", "1"])
        self.history.append(f"wait --timeout {timeout}")
        result = fuseclone("wait", self.rig.mnt, "--timeout", timeout, check=False)
        complete = self.check_status()["complete"]
        if result.returncode == 0:
            assert complete, "wait exited 0 before the clone was complete"
        else:
            assert result.returncode == 1 and "timed out" in result.stderr, result.stderr

    def unmount_while_open(self) -> None:
        """Refused like umount(8): the clients keep working."""
        self.history.append("unmount (image open)")
        result = fuseclone("unmount", self.rig.mnt, check=False)
        assert result.returncode == 1 and "in use" in result.stderr, result.stderr

    def remount(self) -> None:
        self.history.append("unmount")
        self.unmount()
        if self.rng.random() < 0.4:
            self.history.append("check --verify")
            self.verify_offline()
        self.random_mount()

    def stop_while_open(self) -> None:
        """SIGTERM, or `unmount --lazy`, while the clients hold the image open with writes the
        kernel still caches: the daemon takes them over before it stops."""
        pid = daemon_pid(self.rig.mnt)
        pidfd = os.pidfd_open(pid)
        try:
            if self.rng.random() < 0.5:
                self.history.append("SIGTERM")
                os.kill(pid, signal.SIGTERM)
            else:
                self.history.append("unmount --lazy (image open)")
                fuseclone("unmount", "--lazy", self.rig.mnt)
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            assert poller.poll(STOP_TIMEOUT * 1000), f"daemon {pid} still runs"
        finally:
            os.close(pidfd)
        self.close_orphaned_fds()
        self.stopped()
        self.random_mount()

    def close_orphaned_fds(self) -> None:
        """The daemon is gone: a close's flush has no one to reach (what it held was handed over
        before the daemon stopped, or the model's final check says otherwise)."""
        for fd in (self.model.fd, self.model.direct_fd):
            try:
                os.close(fd)
            except OSError as exc:
                assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED), exc
        self.model.fd = self.model.direct_fd = -1

    def step(self) -> None:
        op = self.rng.choices(
            ["message", "status", "wait", "unmount_while_open", "remount", "stop_while_open"],
            weights=[6, 3, 2, 1, 3, 2])[0]
        getattr(self, op)()
        self.model.read()  # the image reads as the model says right after the command


def run_program(rig, seed: int, steps: int, source: str) -> None:
    rng = random.Random(seed)
    model = ImageModel(rig.src, rng)
    operator = Operator(rig, model, source)
    try:
        operator.mount("--max-rate", "1M")
        for _ in range(steps):
            if rng.random() < 0.08:
                operator.step()
            else:
                operator.history.append(model.step())
        operator.unmount()
        operator.history.append("final mount, wait")
        operator.mount()
        fuseclone("wait", rig.mnt, "--timeout", "120")
        model.check_all()
        operator.unmount()
        with open(rig.dst, "rb") as f:
            assert f.read(IMAGE + 1) == bytes(model.data), "DST alone differs from the model"
        operator.verify_offline()
    except BaseException as exc:
        exc.add_note(f"seed {seed}; last steps: {'; '.join(operator.history)}")
        raise
    finally:
        model.close()


def source_for(rig, seed: int, nbdkit) -> str:  # noqa: F811
    """rig.src, read directly (even seeds) or through nbdkit with 1 ms per read (odd seeds)."""
    make_source_file(rig.src, IMAGE, seed=seed, chunk=64 * 1024, zero_every=4, hole_every=6)
    if seed % 2 == 0:
        return rig.src
    return nbdkit("--filter=delay", "file", rig.src, "rdelay=1ms").url()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_operator_commands_amid_client_io_match_the_model(rig, nbdkit, seed):  # noqa: F811
    run_program(rig, seed, 120, source_for(rig, seed, nbdkit))


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(100, 106))
def test_long_operator_programs_match_the_model(rig, nbdkit, seed):  # noqa: F811
    run_program(rig, seed, 1500, source_for(rig, seed, nbdkit))
