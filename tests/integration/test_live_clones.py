"""A second fuseclone mount can name no file of a live clone as something it writes (SPEC
invariants 4, 8 and 9, across clones): not its SRC, DST or META as a destination, access
trace, log file or mountpoint, under any name (a loop device included). Each mistake is one line,
exit 1, and the live clone's files are unchanged and it keeps serving."""

import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from tests.engine.conftest import make_source_file
from tests.integration.conftest import MiB, fuseclone, sh, sha256, status_json
from tests.integration.test_identity import mount_refused
from tests.sources_http.test_http import scripted  # noqa: F401


@pytest.fixture
def live(rig, random_source):
    """Clone A, mounted; its files' contents (checked unchanged after each test) and a second
    clone's paths in rig.b_*."""
    rig.mount("--no-hydration")
    with open(rig.image, "r+b") as image:  # A holds user data in DST and META
        image.write(b"A" * 4096)
        os.fsync(image.fileno())
    rig.b_src = str(rig.tmp / "b-src.img")
    make_source_file(rig.b_src, 32 * MiB, seed=12)
    rig.b_dst, rig.b_meta = str(rig.tmp / "b-dst.img"), str(rig.tmp / "b.meta")
    rig.b_mnt = str(rig.tmp / "mnt-b")
    os.mkdir(rig.b_mnt)
    kept = {path: sha256(path) for path in (rig.src, rig.dst)}
    meta_size = os.path.getsize(rig.meta)
    yield rig
    assert {path: sha256(path) for path in kept} == kept
    assert os.path.getsize(rig.meta) == meta_size
    with open(rig.image, "rb") as image:  # A still serves its data
        assert image.read(4096) == b"A" * 4096
    fuseclone("unmount", rig.mnt)


def refused(rig, *options, dst=None, mnt=None, src=None, expect):
    return mount_refused(rig, src or rig.b_src, dst or rig.b_dst, rig.b_meta, mnt or rig.b_mnt,
                         *options, expect=expect)


def test_a_loop_device_of_a_live_clones_destination(live):
    loop = live.losetup(live.dst)
    refused(live, dst=loop, expect=f"{loop}: destination is in use by another clone")


def test_a_live_clones_destination_on_a_loop_device_is_not_free_under_its_file(rig, random_source):
    with open(rig.dst, "wb") as f:
        f.truncate(os.path.getsize(rig.src))
    loop = rig.losetup(rig.dst)
    mnt_a = str(rig.tmp / "mnt-a")
    os.mkdir(mnt_a)
    rig.stack.callback(rig._force_unmount, mnt_a)
    fuseclone("mount", rig.src, loop, rig.meta, mnt_a, "--no-hydration")
    mnt_b = str(rig.tmp / "mnt-b")
    os.mkdir(mnt_b)
    mount_refused(rig, rig.src, rig.dst, str(rig.tmp / "b.meta"), mnt_b,
                  expect=f"{rig.dst}: destination is in use by another clone")
    fuseclone("unmount", mnt_a)


def test_a_live_clones_source_is_no_destination(live):
    refused(live, dst=live.src, expect=f"{live.src}: destination is in use by another clone")
    loop = live.losetup(live.src)
    refused(live, dst=loop, expect=f"{loop}: destination is in use by another clone")


@pytest.mark.parametrize("option", ["--record-access", "--log-file"])
def test_files_the_mount_writes_are_no_live_clones_file(live, option):
    for path in (live.src, live.dst, live.meta):
        refused(live, option, path, expect=f"{path} is in use by a live clone")
    loop = live.losetup(live.dst)
    refused(live, option, loop, expect="must be a regular file")


def test_two_live_clones_record_no_trace_together(live):
    """The second recording would truncate the first one's trace."""
    fuseclone("unmount", live.mnt)
    trace = str(live.tmp / "trace")
    live.mount("--no-hydration", "--record-access", trace)
    refused(live, "--record-access", trace, expect=f"{trace} is in use by a live clone")


@pytest.mark.parametrize("log", ["default", "--log-file"])
def test_a_live_clones_log_is_no_file_of_another_mount(live, log):
    """A live clone appends to its log for its whole life. Named as a later mount's trace, it
    was emptied; as its META (an empty log: nothing logged yet), it was formatted, and the
    live clone then appended its log lines into that clone's metadata."""
    if log == "--log-file":
        fuseclone("unmount", live.mnt)
        live.mount("--no-hydration", "--log-file", str(live.tmp / "a.log"), "--log-level", "error")
    path = status_json(live.mnt)["log_file"]
    before = open(path, "rb").read()
    for option in ("--record-access", "--log-file"):
        refused(live, option, path, expect=f"{path} is the log of the live clone at {live.mnt}")
    refused(live, dst=path, expect=f"the destination {path} is the log of the live clone at {live.mnt}")
    mount_refused(live, live.b_src, live.b_dst, path, live.b_mnt,
                  expect=f"the metadata {path} is the log of the live clone at {live.mnt}")
    refused(live, mnt=path, expect=f"the mountpoint {path} is the log of the live clone at {live.mnt}")
    refused(live, src=path, expect=f"the source {path} is the log of the live clone at {live.mnt}")
    assert open(path, "rb").read().startswith(before)


def test_a_live_clones_trace_is_no_log_file(live):
    """The reverse: a file a live clone writes (its trace here; its DST and META above)
    named as a later mount's log."""
    fuseclone("unmount", live.mnt)
    trace = str(live.tmp / "trace")
    live.mount("--no-hydration", "--record-access", trace)
    before = open(trace, "rb").read()
    for mode in ((), ("--foreground",)):
        refused(live, "--log-file", trace, *mode, expect=f"the log file {trace} is in use by a live clone")
    assert open(trace, "rb").read() == before


def test_a_file_mountpoint_is_no_live_clones_file(live):
    for path in (live.src, live.dst, live.meta):
        refused(live, mnt=path, expect=f"{path} is in use by a live clone")


def test_paths_that_name_no_file(rig, random_source):
    """META, SRC or a trace that is a device or a FIFO: one line at once, nothing written
    (META used to end in a traceback after trying to truncate it, a FIFO SRC or trace hung)."""
    other = str(rig.tmp / "other.img")
    make_source_file(other, 4 * MiB, seed=13)
    before = sha256(other)
    loop = rig.losetup(other)
    fifo = str(rig.tmp / "fifo")
    os.mkfifo(fifo)
    for meta in (loop, fifo, "/dev/null"):
        mount_refused(rig, rig.src, rig.dst, meta, rig.mnt, expect=f"{meta}: metadata must be a regular file")
    assert sha256(other) == before
    mount_refused(rig, fifo, rig.dst, rig.meta, rig.mnt,
                  expect=f"{fifo}: source must be a regular file or a block device")
    mount_refused(rig, rig.src, rig.dst, rig.meta, rig.mnt, "--record-access", fifo,
                  expect=f"the access trace {fifo} must be a regular file")


def test_a_trace_swapped_for_a_fifo_once_checked(rig, scripted):  # noqa: F811
    """The trace is opened once the source is open: a FIFO put in its place meanwhile (here,
    while the source's server answers its first request) blocked the daemon in open(2) for
    ever, and the mount command waiting for it with it."""
    server, url = scripted
    server.head = "gated"
    trace = str(rig.tmp / "trace")
    rig.stack.callback(rig._force_unmount, rig.mnt)
    mount = subprocess.Popen([sys.executable, "-m", "fuseclone", "mount", url, rig.dst, rig.meta,
                              rig.mnt, "--no-hydration", "--record-access", trace],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.at_gate.wait(60), "the mount never asked the source"
        os.mkfifo(trace)
        server.gate.set()
        _, stderr = mount.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        mount.kill()
        os.close(os.open(trace, os.O_RDWR))  # lets the daemon's open(2) return
        raise AssertionError("the mount hung opening a FIFO as its trace") from None
    assert mount.returncode == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and f"the access trace {trace}: not a regular file" in lines[0], stderr
    assert not os.path.exists(rig.dst) and not os.path.exists(rig.meta)
    assert stat.S_ISFIFO(os.stat(trace).st_mode)


def test_a_directory_mountpoint_hides_no_live_clone(live, tmp_path_factory):
    """Mounted over the directory that holds a live clone's META and mountpoint, `status` and
    `unmount` of that clone could reach it no more ("does not answer": try --lazy)."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    mount_refused(live, live.src, str(elsewhere / "dst.img"), str(elsewhere / "b.meta"),
                  str(live.tmp), expect=f"would hide the metadata {live.meta} of a live clone")


def test_a_mountpoint_is_not_a_live_clones_image(live):
    """Covered by a second mount, the image would keep its loop devices but its clone could
    not be unmounted ("in use") until that one is."""
    refused(live, mnt=live.image, expect=f"would cover the image {live.image} of a live clone")


# ---- one mount's own files: what it reads is not what it writes -----------------------------


def test_the_log_is_not_the_prefetch_trace(rig, random_source):
    """The log is opened (and appended to) before the trace is read."""
    trace = str(rig.tmp / "trace")
    rig.mount("--no-hydration", "--record-access", trace)
    with open(rig.image, "rb") as image:
        image.read(4096)
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    before = sha256(trace)
    for mode in ((), ("--foreground",)):
        mount_refused(rig, rig.src, rig.dst, rig.meta, rig.mnt, "--prefetch", trace,
                      "--log-file", trace, *mode, expect="the log file must be a file of its own")
    assert sha256(trace) == before


def test_a_path_through_the_callers_descriptors_names_the_callers_file(rig, random_source):
    """/proc/self/fd/N (/dev/fd/N) means the file the `fuseclone` command has open as N; the
    daemon, a child that closed the caller's descriptors, used to open its own N instead: SRC,
    opened read-write as DST."""
    before = sha256(rig.src)
    with open(rig.dst, "wb") as f:
        f.truncate(os.path.getsize(rig.src))
    fd = os.open(rig.dst, os.O_RDONLY)
    try:
        rig.stack.callback(rig._force_unmount, rig.mnt)
        sh(sys.executable, "-m", "fuseclone", "mount", rig.src, f"/proc/self/fd/{fd}", rig.meta,
           rig.mnt, "--no-hydration", pass_fds=(fd,))
    finally:
        os.close(fd)
    assert status_json(rig.mnt)["destination"] == rig.dst
    with open(rig.image, "r+b") as image:
        image.write(b"B" * 4096)
        os.fsync(image.fileno())
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    assert sha256(rig.src) == before
    with open(rig.dst, "rb") as f:
        assert f.read(4096) == b"B" * 4096


# ---- clients of the metrics endpoint ---------------------------------------------------------


def test_idle_metrics_clients_cost_the_mount_no_descriptors(rig, random_source):
    """--metrics-listen may face a network: connections that send nothing used to be accepted
    without bound, each a descriptor of the daemon, until it had none left for the source's
    connections or the image's write-back. Beyond the ones served at once they wait in the
    listen backlog."""
    from fuseclone.metrics import MAX_SCRAPERS
    from tests.integration.test_control import daemon_pid
    from tests.integration.test_operating import free_port, scrape

    port = free_port()
    rig.mount("--no-hydration", "--metrics-listen", f"127.0.0.1:{port}")
    pid = daemon_pid(rig)
    before = len(os.listdir(f"/proc/{pid}/fd"))
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_SCRAPERS + 200)]
    try:
        time.sleep(1)  # the daemon accepts what it will
        assert len(os.listdir(f"/proc/{pid}/fd")) <= before + MAX_SCRAPERS + 4
    finally:
        for sock in idle:
            sock.close()
    assert "fuseclone_up" in scrape(port)  # served again once the crowd is gone


def test_what_the_mount_reads_later_is_not_inside_the_mountpoint(rig, random_source):
    """A resumed clone whose SRC is missing at mount dials it again later, and the headers are
    re-read on 401/403: beneath the mountpoint, the daemon would look inside its own mount
    (and hang: it answers that lookup itself) instead of finding them."""
    inner_src = os.path.join(rig.mnt, "src.img")
    os.rename(rig.src, inner_src)
    rig.src = inner_src
    mount_refused(rig, inner_src, rig.dst, rig.meta, rig.mnt,
                  expect=f"source {inner_src} is inside the mountpoint {rig.mnt}")
    os.rename(inner_src, str(rig.tmp / "src.img"))
    rig.src = str(rig.tmp / "src.img")
    headers = os.path.join(rig.mnt, "headers")
    with open(headers, "w") as f:
        f.write("Authorization: Bearer x\n")
    mount_refused(rig, "http://127.0.0.1:9/image.raw", rig.dst, rig.meta, rig.mnt,
                  "--http-header-file", headers,
                  expect=f"header file {headers} is inside the mountpoint {rig.mnt}")


@pytest.mark.parametrize("name", ["a/b", "..", ""])
def test_an_image_name_that_is_no_file_name(rig, random_source, name):
    """Refused with one line before anything is created (it was a traceback once DST and META
    had been created and removed again)."""
    mount_refused(rig, rig.src, rig.dst, rig.meta, rig.mnt, "--name", name,
                  expect="must be a file name")


# ---- --on-complete: a mistake in the command must not end the mount hours later --------------


def test_an_on_complete_command_that_cannot_run_leaves_the_mount_up(rig, random_source):
    rig.mount("--on-complete", str(rig.tmp / "no-such-command"))
    fuseclone("wait", rig.mnt, "--timeout", "60")
    time.sleep(0.5)  # the command is started once hydration completes
    status = status_json(rig.mnt)
    assert status["live"] and status["hydrated_regions"] == status["total_regions"]
    assert "no-such-command" in open(status["log_file"]).read()


def test_an_on_complete_command_that_does_not_parse_is_one_line(rig, random_source):
    mount_refused(rig, rig.src, rig.dst, rig.meta, rig.mnt, "--on-complete", 'echo "unclosed',
                  expect="--on-complete")


def test_a_block_device_dst_waits_out_udevs_brief_shared_lock(rig, random_source):
    """udev holds a shared flock on a block device while it probes it (just after `losetup`,
    say): the claim's exclusive flock of the node waits that out instead of calling the device
    in use by another clone."""
    import fcntl
    import threading

    with open(rig.dst, "wb") as f:
        f.truncate(os.path.getsize(rig.src))
    loop = rig.losetup(rig.dst)
    probe = os.open(loop, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH)
    threading.Timer(0.3, os.close, (probe,)).start()
    rig.stack.callback(rig._force_unmount, rig.mnt)
    fuseclone("mount", rig.src, loop, rig.meta, rig.mnt, "--no-hydration")
    fuseclone("unmount", rig.mnt)
