"""A copy of region R held at a real nbdkit (a shell plugin that waits on a FIFO) while a
user writes or punches R through a real mount, flushes, and the daemon is SIGKILLed: after a
remount the flushed operation is there (invariant 3) and the rest is the source's data. The
held read then returns, or fails: a user operation that needs nothing from the source must not
fail with it. The engine-level matrix of every operation at every point of a copy is
tests/engine/test_copy_races.py; this checks the same promises through the kernel."""

import errno
import mmap
import os
import signal
import threading
import time

import pytest

from fuseclone import control
from tests.engine.conftest import make_source_file
from tests.integration.conftest import daemon_pid, fuseclone
from tests.integration.fuse_crash_writer import punch
from tests.sources.conftest import NBDKIT, Nbdkit

MiB = 1 << 20
REGION = 64 << 10
R = 4 * MiB  # past the data sample's first and last 64 KiB

SCRIPT = r"""#!/bin/bash
src={src} dir={dir} lo={lo} hi={hi}
touches_r() {{ [ "$off" -lt "$hi" ] && [ $((off + count)) -gt "$lo" ]; }}
case "$1" in
  thread_model) echo parallel ;;
  get_size) stat -L -c %s "$src" ;;
  pread)
    count=$3 off=$4
    if touches_r && mkdir "$dir/held" 2>/dev/null; then
      echo > "$dir/arrived"             # a FIFO: until the test sees the read
      cat "$dir/release" > /dev/null    # a FIFO: until the test lets it go
    fi
    if touches_r && [ -e "$dir/failing" ]; then echo "EIO injected" >&2; exit 1; fi
    dd if="$src" iflag=skip_bytes,count_bytes skip="$off" count="$count" bs=64K status=none ;;
  *) exit 2 ;;
esac
"""


class HeldServer:
    """nbdkit serving SRC; its first read touching R waits until `release()`."""

    def __init__(self, tmp_path, src, stack):
        self.dir = tmp_path / "held"
        self.dir.mkdir()
        for fifo in ("arrived", "release"):
            os.mkfifo(self.dir / fifo)
        script = tmp_path / "held.sh"
        script.write_text(SCRIPT.format(src=src, dir=self.dir, lo=R, hi=R + REGION))
        script.chmod(0o755)
        self.nbdkit = Nbdkit(tmp_path, ["sh", script], name="held").start()
        stack.callback(self.nbdkit.stop)
        stack.callback(self._unblock)

    def url(self):
        return self.nbdkit.url()

    def restart(self):
        """A new nbdkit on the same socket: 1.32's aborts now and then (`raw_send_socket:
        Assertion sock >= 0`) when a client killed with reads in flight on a parallel plugin
        leaves; the remount would find no server (and rightly get EIO for unhydrated reads)."""
        self.nbdkit.stop()
        self.nbdkit.start()

    def fail_reads_of_r(self, failing: bool):
        if failing:
            (self.dir / "failing").touch()
        else:
            (self.dir / "failing").unlink(missing_ok=True)

    def wait_arrived(self, timeout=30):
        """Until the held read is at the server (it writes the FIFO once we open it)."""
        in_thread(lambda: open(self.dir / "arrived", "rb").read(), timeout, "no read of R came")

    def release(self):
        in_thread(lambda: open(self.dir / "release", "wb").close(), 30, "the held read is gone")

    def _unblock(self):
        """On the way out (a failed test): a script still held gets its FIFOs' other ends."""
        for name, mode in (("arrived", os.O_RDONLY), ("release", os.O_WRONLY)):
            try:
                os.close(os.open(self.dir / name, mode | os.O_NONBLOCK))
            except OSError:
                pass


def in_thread(fn, timeout, message):
    """Run FN in a thread; its result, or fail the test after TIMEOUT seconds."""
    box = {}
    thread = threading.Thread(target=lambda: box.update(result=fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), message
    return box.get("result")


class UserOp(threading.Thread):
    """One user operation on the image in a thread of its own, then an fsync; `error`: its
    errno if it failed."""

    def __init__(self, image, kind):
        super().__init__(daemon=True)
        self.kind, self.error, self.close_error = kind, None, None
        # Opened here: the thread is to wait in the kernel for its operation, not its OPEN.
        self.fd = os.open(image, os.O_RDWR | os.O_DIRECT)

    def run(self):
        self.tid = threading.get_native_id()
        fd = self.fd
        try:
            if self.kind == "write_whole":
                os.pwrite(fd, aligned(b"W" * REGION), R)
            elif self.kind == "write_next":
                os.pwrite(fd, aligned(b"N" * REGION), R + REGION)
            elif self.kind == "write_partial":
                os.pwrite(fd, aligned(b"P" * 4096), R + 8192)
            elif self.kind == "punch":
                punch(fd, R, REGION)
            elif self.kind == "read":
                os.preadv(fd, [mmap.mmap(-1, 4096)], R + 4096)
            os.fsync(fd)
        except OSError as exc:
            self.error = exc.errno
        finally:
            try:
                os.close(fd)
            except OSError as exc:  # ENOTCONN: its FLUSH after `unmount --lazy` detached the mount
                self.close_error = exc.errno

    def wait_blocked(self, timeout=30):
        """Until the thread waits in the kernel for the daemon's answer to its WRITE or
        FALLOCATE (not to a request the kernel sends first: GETATTR, GETXATTR)."""
        deadline = time.monotonic() + timeout
        while True:
            if self._waits_for_its_request():
                return
            assert self.is_alive(), f"{self.kind} finished without waiting (error {self.error})"
            assert time.monotonic() < deadline, f"{self.kind} never waited for the daemon"
            time.sleep(0.01)

    def _waits_for_its_request(self) -> bool:
        try:
            with open(f"/proc/self/task/{self.tid}/stack") as f:
                frames = [line.split()[-1].split("+")[0] for line in f]
        except (AttributeError, FileNotFoundError):  # not started yet, or done
            return False
        if "__fuse_simple_request" not in frames:
            return False
        caller = frames[frames.index("__fuse_simple_request") + 1]
        return caller in ("fuse_direct_io", "fuse_send_write", "fuse_file_fallocate")

    def expected(self, source: bytes) -> bytes:
        """R's data after this operation (or R's source data if it failed)."""
        data = bytearray(source)
        if self.error is None and self.kind == "write_whole":
            data[:] = b"W" * REGION
        elif self.error is None and self.kind == "write_partial":
            data[8192:8192 + 4096] = b"P" * 4096
        elif self.error is None and self.kind == "punch":
            data[:] = bytes(REGION)
        return bytes(data)


def aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    return buf


@pytest.mark.skipif(NBDKIT is None, reason="needs nbdkit")
@pytest.mark.parametrize("failing", [False, True], ids=["read_returns", "read_fails"])
@pytest.mark.parametrize("op", ["write_whole", "write_partial", "punch"])
@pytest.mark.parametrize("copy", ["copy_on_read", "hydration"])
def test_a_user_operation_during_a_held_copy_survives_a_kill(rig, tmp_path, copy, op, failing):
    make_source_file(rig.src, 8 * MiB, seed=5, zero_every=0, hole_every=0)
    with open(rig.src, "rb") as f:
        source = f.read()
    server = HeldServer(tmp_path, rig.src, rig.stack)
    log = str(tmp_path / "daemon.log")
    options = ["--region-size", "64K", "--hydration-batch-size", "1", "--log-file", log]
    rig.mount(*options, *(["--no-hydration"] if copy == "copy_on_read" else []), src=server.url())
    # R's written bit is durable before the hold (the MiB around a write is marked): the
    # user's operation then goes straight to waiting for the copy.
    first = UserOp(rig.image, "write_next")
    first.run()
    assert first.error is None
    server.fail_reads_of_r(failing)
    if copy == "copy_on_read":
        reader = UserOp(rig.image, "read")
        reader.start()
    server.wait_arrived()
    user = UserOp(rig.image, op)
    user.start()
    user.wait_blocked()  # the write waits for the copy (a partial one: for R's source data)
    server.release()
    user.join(30)
    assert not user.is_alive()
    needs_source = op == "write_partial"
    assert user.error in ((None, errno.EIO) if failing and needs_source else (None,)), \
        f"{op} failed with errno {user.error}"
    if copy == "copy_on_read":
        reader.join(30)
        assert reader.error == (errno.EIO if failing else None)

    os.kill(daemon_pid(rig.mnt), signal.SIGKILL)
    server.fail_reads_of_r(False)
    server.restart()
    fuseclone("unmount", rig.mnt)  # cleans the stale mount
    rig.mount("--no-hydration", "--log-file", log, src=server.url())
    with open(rig.image, "rb") as f:
        after = f.read()
    assert after[R:R + REGION] == user.expected(source[R:R + REGION]), f"R after {op}, killed"
    assert after[:R] == source[:R] and after[R + 2 * REGION:] == source[R + 2 * REGION:]
    assert after[R + REGION:R + 2 * REGION] == b"N" * REGION
    fuseclone("unmount", rig.mnt)


# (op, stop): two in the suite (3 s each), the rest in ./run soak
STOPS_IN_SUITE = {("write_partial", "sigterm"), ("write_whole", "unmount_lazy")}
STOP_CASES = [pytest.param(op, stop, marks=() if (op, stop) in STOPS_IN_SUITE else pytest.mark.soak)
              for op in ("write_whole", "write_partial")
              for stop in ("sigterm", "unmount_lazy", "disable_hydration_then_unmount")]


@pytest.mark.skipif(NBDKIT is None, reason="needs nbdkit")
@pytest.mark.parametrize("op,stop", STOP_CASES)
def test_a_stop_while_a_copy_is_held_loses_nothing_acknowledged(rig, tmp_path, op, stop):
    """A stop while a copy of R is held at the server, a user's write of R waiting for it: the
    daemon ends (no task or thread of it keeps it alive), the write is either answered and in
    the image, or failed; META checks out, and the next mount resumes and completes."""
    make_source_file(rig.src, 8 * MiB, seed=5, zero_every=0, hole_every=0)
    with open(rig.src, "rb") as f:
        source = f.read()
    server = HeldServer(tmp_path, rig.src, rig.stack)
    log = str(tmp_path / "daemon.log")
    rig.mount("--region-size", "64K", "--hydration-batch-size", "1", "--log-file", log,
              "--no-hydration", src=server.url())
    first = UserOp(rig.image, "write_next")  # R's written bit durable first, as above
    first.run()
    assert first.error is None
    reader = UserOp(rig.image, "read")  # copy-on-read of R, held at the server
    reader.start()
    server.wait_arrived()
    user = UserOp(rig.image, op)
    user.start()
    user.wait_blocked()
    pid = daemon_pid(rig.mnt)
    # The requests `fuseclone message` and `unmount --lazy` send, sent from here: a command
    # run now would not start before the copy is let go (its exec closes this process's opens
    # of the image, and a close waits in the kernel for the inode lock the write holds).
    meta = control.resolve_target(rig.mnt)
    if stop == "sigterm":
        os.kill(pid, signal.SIGTERM)
    else:
        if stop == "disable_hydration_then_unmount":
            assert control.request(meta, {"op": "message", "text": "disable_hydration"})["ok"]
        reply = control.request(meta, {"op": "unmount", "lazy": True,
                                       "mountpoint": os.path.realpath(rig.mnt)})
        assert reply["ok"], reply
    server.release()
    for thread in (user, reader):
        thread.join(30)
        assert not thread.is_alive()
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, "the daemon did not end"
        time.sleep(0.05)
    rig.wait_unmounted()
    server.restart()  # see restart(): a client gone with reads in flight may have killed it
    checked = fuseclone("check", rig.meta, "--src", server.url(), "--dst", rig.dst, "--verify",
                        check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rig.mount("--log-file", log, src=server.url())
    fuseclone("wait", rig.mnt, "--timeout", "60")
    with open(rig.image, "rb") as f:
        after = f.read()
    fuseclone("unmount", rig.mnt)
    got = after[R:R + REGION]
    wanted = {user.expected(source[R:R + REGION])}
    if user.error is not None:  # not acknowledged: it may have reached DST all the same
        user.error = None
        wanted.add(user.expected(source[R:R + REGION]))
    assert got in wanted, f"R after {op} and {stop} (user error {user.error})"
    assert after[:R] == source[:R] and after[R + 2 * REGION:] == source[R + 2 * REGION:]
    assert after[R + REGION:R + 2 * REGION] == b"N" * REGION
