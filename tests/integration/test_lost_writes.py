"""A cached write the kernel acknowledged whose write-back fails (a partial write to an unhydrated
region whose copy's source failed) is lost: the stop that comes to it (`unmount --lazy`,
SIGTERM, a plain `unmount` after its writer closed) must say so, never report success."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import MiB, daemon_pid, fuseclone, status_json
from tests.integration.test_operating import samples_of, scrape
from tests.integration.test_stopping import (HOLDER, foreground_mount_with_write_back_timeout,
                                             wait_for_line)

REGION = 64 << 10
LOST_AT = 20 * MiB + 8192  # a whole page inside an unhydrated 64 KiB region: needs the source


class FailedSource:
    """The local source cut to 0 bytes (every read of it fails), and put back as it was (data
    and mtime: the identity a resumed clone checks)."""

    def __init__(self, path):
        self.path = path
        self.data = open(path, "rb").read()
        self.st = os.stat(path)

    def fail(self):
        os.truncate(self.path, 0)

    def restore(self):
        with open(self.path, "r+b") as f:
            f.write(self.data)
        os.utime(self.path, ns=(self.st.st_atime_ns, self.st.st_mtime_ns))


def cached_page_write(image):
    """Write one page at LOST_AT through the kernel's write cache; returns the open descriptor
    (the page is still cached: nothing flushed it)."""
    fd = os.open(image, os.O_RDWR)
    os.pwrite(fd, b"X" * 4096, LOST_AT)
    return fd


LOST_LINE = f"4096 bytes whose write-back failed (offset {LOST_AT} +4096)"


def close_failing(fd):
    with contextlib.suppress(OSError):
        os.close(fd)


def mount(rig):
    rig.mount("--no-hydration", "--region-size", str(REGION))


def holder(rig, offset=LOST_AT):
    """A process of its own that writes a page at OFFSET and keeps the image open (a file the
    test process opened would be flushed by the close-on-exec of every command it runs)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, rig.image, str(offset)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rig.stack.callback(lambda: proc.poll() is None and proc.kill())
    proc.stdin.write((b"X" * 4096).hex() + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "written\n"
    return proc


def let_go(proc):
    proc.stdin.close()  # its close fails (ENOTCONN: detached lazily), which it ignores
    proc.wait(timeout=30)


def test_a_lazy_unmount_that_loses_cached_writes_says_so(rig, random_source):
    mount(rig)
    source = FailedSource(rig.src)
    writer = holder(rig)
    source.fail()
    result = fuseclone("unmount", "--lazy", rig.mnt, check=False)
    let_go(writer)
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.splitlines()
    assert "lost writes the kernel had acknowledged from its cache: " + LOST_LINE in line
    st = status_json(rig.meta)  # offline, after the mount
    assert st["lost_write_bytes"] == 4096
    assert f"offset {LOST_AT} +4096" in st["lost_writes"]
    fuseclone("check", rig.meta)

    # A later mount that loses nothing ends as any other, and status forgets the loss.
    source.restore()
    mount(rig)
    assert status_json(rig.mnt)["lost_write_bytes"] == 0
    with open(rig.image, "rb") as f:
        f.seek(LOST_AT)
        assert f.read(4096) == source.data[LOST_AT:LOST_AT + 4096]  # lost: the source's data
    fuseclone("unmount", "--lazy", rig.mnt)
    assert status_json(rig.meta)["lost_write_bytes"] == 0


def test_a_plain_unmount_after_a_writer_closed_on_a_failed_write_back_says_so(rig, random_source):
    mount(rig)
    source = FailedSource(rig.src)
    fd = cached_page_write(rig.image)
    source.fail()
    close_failing(fd)  # the close writes the page back, and fails: the writer hears of it...
    live = status_json(rig.mnt)
    assert live["lost_write_bytes"] == 4096
    result = fuseclone("unmount", rig.mnt, check=False)  # ...and so does the unmount
    assert result.returncode == 1, result.stderr
    assert LOST_LINE in result.stderr


METRICS_PORT = 45601  # this helper's range


def test_lost_cached_writes_are_in_the_metrics(rig, random_source):
    """Status showed them; `fuseclone metrics` and the --metrics-listen endpoint did not."""
    rig.mount("--no-hydration", "--region-size", str(REGION),
              "--metrics-listen", f"127.0.0.1:{METRICS_PORT}")
    source = FailedSource(rig.src)
    fd = os.open(rig.image, os.O_RDWR)
    for offset in (LOST_AT, LOST_AT + 4 * REGION):  # two ranges apart
        os.pwrite(fd, b"X" * 4096, offset)
    source.fail()
    close_failing(fd)
    mountpoint = os.path.realpath(rig.mnt)
    for text in (scrape(METRICS_PORT), fuseclone("metrics").stdout):
        found, types = samples_of(text, mountpoint)
        assert found.get("fuseclone_lost_write_bytes_total") == 8192, text
        assert found.get("fuseclone_lost_write_ranges") == 2, text
        assert types["fuseclone_lost_write_bytes"] == "counter"  # the family drops _total
        assert types["fuseclone_lost_write_ranges"] == "gauge"
    assert status_json(rig.mnt)["lost_write_ranges"] == 2
    assert fuseclone("unmount", rig.mnt, check=False).returncode == 1


def test_a_new_meta_in_a_deleted_ones_inode_shows_none_of_its_lost_writes(rig, random_source):
    """The report of lost writes is named by META's identity: a new clone's META that got the
    deleted one's inode showed, offline, the lost writes of the clone it replaced, until its
    first mount ended (here: it was killed)."""
    rig.meta = os.path.join(rig.ext4("metafs", "16M"), "clone.meta")  # inodes reused in order
    mount(rig)
    source = FailedSource(rig.src)
    fd = cached_page_write(rig.image)
    source.fail()
    close_failing(fd)
    assert fuseclone("unmount", rig.mnt, check=False).returncode == 1
    assert status_json(rig.meta)["lost_write_bytes"] == 4096
    source.restore()

    old_inode = os.stat(rig.meta).st_ino
    os.unlink(rig.meta)
    os.unlink(rig.dst)
    mount(rig)  # a new clone
    assert os.stat(rig.meta).st_ino == old_inode  # what the bug needs: the same identity
    os.kill(daemon_pid(rig.mnt), signal.SIGKILL)
    fuseclone("unmount", rig.mnt, check=False)  # cleans the stale mount
    st = status_json(rig.meta)  # offline
    assert (st["lost_write_bytes"], st["lost_write_ranges"], st["lost_writes"]) == (0, 0, None)


def test_a_sigterm_that_loses_cached_writes_ends_the_daemon_with_exit_status_1(rig,
                                                                              random_source):
    from fuseclone.fuse.mount import is_fuseclone_mount

    proc = subprocess.Popen([sys.executable, "-m", "fuseclone", "mount", "--foreground",
                             rig.src, rig.dst, rig.meta, rig.mnt, "--no-hydration",
                             "--region-size", str(REGION)], stderr=subprocess.PIPE, text=True)
    rig.stack.callback(rig._force_unmount, rig.mnt)
    source = FailedSource(rig.src)
    try:
        deadline = time.monotonic() + 30
        while not is_fuseclone_mount(rig.mnt):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        fd = cached_page_write(rig.image)
        try:
            source.fail()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 1
        finally:
            close_failing(fd)
        assert LOST_LINE in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_stop_that_gives_up_on_a_silent_source_says_writes_were_lost(rig, random_source):
    """The source stops answering (nbdkit stopped): a stop goes on without the cached writes
    that wait for it (after WRITE_BACK_TIMEOUT), which are lost, how many unknown."""
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed")
    sock = str(rig.tmp / "nbd.sock")
    server = subprocess.Popen(["nbdkit", "-f", "-r", "-U", sock, "file", rig.src],
                              stderr=subprocess.DEVNULL)
    rig.stack.callback(server.wait)
    rig.stack.callback(server.kill)
    rig.stack.callback(lambda: server.send_signal(signal.SIGCONT))
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        assert time.monotonic() < deadline, "nbdkit did not start"
        time.sleep(0.05)
    log = str(rig.tmp / "mount.log")
    proc = foreground_mount_with_write_back_timeout(
        rig, 0.5, log, "--no-hydration", "--region-size", str(REGION),
        src=f"nbd+unix:///?socket={sock}")
    writer = holder(rig)
    server.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    wait_for_line(log, "going on without them")
    assert proc.wait(timeout=30) == 1, open(log).read()
    let_go(writer)
    said = open(log).read()
    assert LOST_LINE in said  # the WRITE in flight, cut short
    assert "this mount lost writes the kernel had acknowledged from its cache" in said
    assert "how many is unknown" in said
    assert "how many is unknown" in status_json(rig.meta)["lost_writes"]
    server.send_signal(signal.SIGCONT)
