"""Seeded random programs through a real mount, checked read by read against a model of the
image: buffered and O_DIRECT reads and writes, sequential streams (readahead), discards and
zeroing (fallocate), fsyncs and hydration messages, while hydration runs rate-limited, across
remounts that change the options (an access trace recorded, then prefetched; write-through;
hydration off; the complete clone with --passthrough). At the end DST alone must be the model.

The engine's model test (tests/engine/test_engine_model.py) covers the engine; this one adds
the kernel's page cache and writeback cache, the FUSE layer and the CLI between them."""

import ctypes
import errno
import mmap
import os
import random

import pytest

from fuseclone.blockio import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
from fuseclone.libc import libc
from tests.engine.conftest import make_source_file
from tests.integration.conftest import fuseclone, status_json

MiB = 1 << 20
IMAGE = 64 * MiB + 5 * 4096  # not a whole number of 64 KiB regions
REGION = "64K"


class ImageModel:
    """The image as users must see it, and the operations that change it."""

    def __init__(self, src: str, rng: random.Random):
        with open(src, "rb") as f:
            self.data = bytearray(f.read())
        self.size = len(self.data)
        self.rng = rng
        self.fd = self.direct_fd = -1

    def open(self, image: str) -> None:
        self.fd = os.open(image, os.O_RDWR)
        self.direct_fd = os.open(image, os.O_RDWR | os.O_DIRECT)

    def close(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = -1

    def _range(self, max_len: int, align: int = 1) -> tuple[int, int]:
        off = self.rng.randrange(0, self.size // align) * align
        length = self.rng.randrange(1, max(2, min(max_len, self.size - off) // align + 1)) * align
        return off, min(length, self.size - off)

    def _expect(self, got: bytes, off: int, what: str) -> None:
        want = bytes(self.data[off : off + len(got)])
        if got != want:
            bad = next(i for i in range(len(got)) if got[i] != want[i])
            raise AssertionError(f"{what} at {off}+{len(got)}: first differing byte at "
                                 f"{off + bad} (got {got[bad]}, model {want[bad]})")

    # ---- operations --------------------------------------------------------------------

    def read(self) -> None:
        off, n = self._range(300_000)
        self._expect(os.pread(self.fd, n, off), off, "buffered read")

    def stream(self) -> None:
        off, n = self._range(2 * MiB)
        size = self.rng.choice([4096, 65536, 131072])
        for start in range(off, off + n, size):
            self._expect(os.pread(self.fd, min(size, off + n - start), start), start, "stream read")

    def direct_read(self) -> None:
        off, n = self._range(256 * 1024, align=4096)
        with mmap.mmap(-1, n) as buf:
            got = os.preadv(self.direct_fd, [buf], off)
            self._expect(bytes(buf[:got]), off, "O_DIRECT read")
            assert got == n

    def write(self) -> None:
        off, n = self._range(200_000)
        data = self.rng.randbytes(n)
        assert os.pwrite(self.fd, data, off) == n
        self.data[off : off + n] = data

    def direct_write(self) -> None:
        off, n = self._range(256 * 1024, align=4096)
        data = self.rng.randbytes(n)
        with mmap.mmap(-1, n) as buf:
            buf[:] = data
            assert os.pwritev(self.direct_fd, [buf], off) == n
        self.data[off : off + n] = data

    def discard(self) -> None:
        self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)

    def zero(self) -> None:
        self._fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)

    def _fallocate(self, mode: int) -> None:
        off, n = self._range(1 * MiB)
        if libc.fallocate(self.fd, mode, off, n) != 0:
            err = ctypes.get_errno()
            assert err == errno.EOPNOTSUPP, os.strerror(err)  # a mode DST's filesystem lacks
            return
        self.data[off : off + n] = bytes(n)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def step(self) -> str:
        op = self.rng.choices(
            ["read", "stream", "direct_read", "write", "direct_write", "discard", "zero", "fsync"],
            weights=[6, 2, 4, 5, 4, 2, 2, 2])[0]
        getattr(self, op)()
        return op

    def check_all(self) -> None:
        for off in range(0, self.size, 4 * MiB):
            self._expect(os.pread(self.fd, min(4 * MiB, self.size - off), off), off, "final read")


def mount(rig, *options):
    rig.mount("--region-size", REGION, *options)


def run_mount(rig, model: ImageModel, steps: int, messages: bool) -> None:
    model.open(rig.image)
    try:
        for _ in range(steps):
            model.step()
            if messages and model.rng.random() < 0.03:
                message = model.rng.choice(["disable_hydration", "enable_hydration",
                                            "hydration_threshold 4", "hydration_threshold 64",
                                            "hydration_batch_size 1", "hydration_batch_size 16"])
                fuseclone("message", rig.mnt, *message.split())
        model.check_all()
    finally:
        model.close()
    fuseclone("unmount", rig.mnt)


def run_program(rig, seed: int, steps: int) -> None:
    make_source_file(rig.src, IMAGE, seed=seed, chunk=64 * 1024, zero_every=4, hole_every=6)
    rng = random.Random(seed)
    model = ImageModel(rig.src, rng)
    trace = str(rig.tmp / "access.trace")
    rate = ["--max-rate", "1M"]  # hydration keeps running beside the program's I/O

    # Each mount leaves the clone further hydrated: copy-on-read off while the trace is recorded
    # (the source's reads are not stored); then, in an order the seed picks (the first of them
    # mostly completes the clone), copy-on-read on (readahead follows streams), and the trace
    # prefetched with background hydration off.
    mount(rig, *rate, "--record-access", trace, "--no-copy-on-read")
    run_mount(rig, model, steps, messages=True)
    following = [(*rate, "--write-cache", "0"), ("--prefetch", trace, "--no-hydration")]
    for options in following if seed % 2 else reversed(following):
        mount(rig, *options)
        run_mount(rig, model, steps // 2, messages="--no-hydration" not in options)
    mount(rig)
    fuseclone("wait", rig.mnt, "--timeout", "60")
    run_mount(rig, model, steps // 2, messages=False)

    assert status_json(rig.meta)["complete"]
    with open(rig.dst, "rb") as f:
        assert f.read(IMAGE) == bytes(model.data), "DST alone differs from the model"
    mount(rig, "--passthrough")  # complete: the kernel reads and writes DST itself, if it can
    run_mount(rig, model, steps // 2, messages=False)
    with open(rig.dst, "rb") as f:
        assert f.read(IMAGE) == bytes(model.data), "DST differs from the model after --passthrough"


@pytest.mark.parametrize("seed", [1, 2])
def test_random_programs_through_the_mount_match_the_model(rig, seed):
    run_program(rig, seed, steps=150)


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(100, 112))
def test_long_random_programs_through_the_mount_match_the_model(rig, seed):
    run_program(rig, seed, steps=1500)
