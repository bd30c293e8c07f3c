"""SPEC invariant 10: no client can hurt a live clone. Whatever arrives on the control socket
gets an error answer or nothing, the daemon never exits because of it, and a hung daemon never
hangs the CLI for another clone."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fuseclone import control
from tests.engine.conftest import make_source_file
from tests.integration.conftest import MiB, Rig, fuseclone, sh, status_json
from tests.integration.test_stopping import wait_gone

U32_MAX = 2**32 - 1


def connect(meta):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(control.socket_path(meta))
    return sock


def raw_request(meta, line: bytes):
    """Send LINE as it is; the decoded answer, or None when the daemon closed without one."""
    with connect(meta) as sock:
        sock.sendall(line + b"\n")
        return read_answer(sock)


def read_answer(sock):
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return json.loads(data) if data else None


def assert_alive(rig):
    """The daemon answers status and the image still reads what the source holds."""
    reply = control.request(rig.meta, {"op": "status"})
    assert reply is not None and reply["ok"] and reply["status"]["live"], reply
    with open(rig.image, "rb") as f, open(rig.src, "rb") as src:
        assert f.read(65536) == src.read(65536)


def mounted(path):
    """Whether PATH is in the mount table (no stat of PATH: its daemon may be stopped)."""
    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    return f" {real} " in open("/proc/mounts").read()


def daemon_pid(rig):
    return control.request(rig.meta, {"op": "status"})["pid"]


def test_clients_gone_before_their_answer_do_not_hurt_the_mount(rig, random_source):
    rig.mount("--no-hydration")
    for request in (b'{"op": "wait", "timeout": 60}', b'{"op": "status"}'):
        for _ in range(3):
            with connect(rig.meta) as sock:
                sock.sendall(request + b"\n")
    fuseclone("message", rig.mnt, "enable_hydration")
    fuseclone("wait", rig.mnt, "--timeout", "60")  # the gone waiters' answers are due now
    time.sleep(0.5)
    assert_alive(rig)


BAD_REQUESTS = [
    b"null", b"[]", b'"x"', b"1", b"true", b"{}", b"[" * 100_000, b"{" * 100_000,
    b'{"op": 1}', b'{"op": "nope"}', b'{"op": ["status"]}', b'{"op": "status", "extra": 1}',
    b'{"op": "unmount", "lazy": "no"}', b'{"op": "unmount", "lazy": 1}',
    b'{"op": "wait", "timeout": "5"}', b'{"op": "wait", "timeout": true}',
    b'{"op": "wait", "timeout": -1}', b'{"op": "wait", "timeout": 1e999}',
    b'{"op": "wait", "timeout": NaN}', b'{"op": "wait", "timeout": null}',
    b'{"op": "message"}', b'{"op": "message", "text": 7}', b'{"op": "message", "text": null}',
    b'{"op": "message", "text": "hydration_threshold 4294967296"}',
    b'{"op": "message", "text": "hydration_batch_size 99999999999999999999"}',
    b'{"op": "message", "text": "hydration_threshold -1"}',
    b"\xff\xfe\x00garbage", b"not json at all", b'{"op": "status"', b"1" * 5000,
]


def test_bad_requests_get_an_error_answer_and_change_nothing(rig, random_source):
    rig.mount("--no-hydration")
    before = status_json(rig.mnt)
    for line in BAD_REQUESTS:
        reply = raw_request(rig.meta, line)
        assert reply is not None and reply["ok"] is False and reply["error"], (line[:40], reply)
        assert_alive(rig)
    after = status_json(rig.mnt)
    for key in ("hydration_threshold", "hydration_batch_size", "hydration_enabled", "features"):
        assert after[key] == before[key]
    assert mounted(rig.mnt)


def test_an_oversized_or_slow_request_is_dropped(rig, random_source):
    rig.mount("--no-hydration")
    try:
        reply = raw_request(rig.meta, b'{"op": "message", "text": "' + b"x" * (2 * MiB) + b'"}')
    except (BrokenPipeError, ConnectionResetError):
        reply = None  # closed on the sender after the bound
    assert reply is None or reply["ok"] is False
    with connect(rig.meta) as sock:  # half a line, then silence: the daemon does not wait forever
        sock.sendall(b'{"op": "sta')
        assert_alive(rig)
    assert_alive(rig)


def test_hydration_limits_beyond_what_meta_stores_are_one_clear_line(rig, random_source):
    r = fuseclone("mount", rig.src, rig.dst, rig.meta, rig.mnt, "--hydration-threshold", str(U32_MAX + 1),
                  check=False)
    assert_one_line(r, f"from 1 to {U32_MAX}")
    assert not os.path.exists(rig.dst) and not os.path.exists(rig.meta)
    rig.mount("--no-hydration", "--hydration-batch-size", str(U32_MAX))
    for name in ("hydration_threshold", "hydration_batch_size"):
        r = fuseclone("message", rig.mnt, name, str(U32_MAX + 1), check=False)
        assert_one_line(r, f"from 1 to {U32_MAX}")
    st = status_json(rig.mnt)
    assert st["hydration_batch_size"] == U32_MAX and st["hydration_threshold"] != U32_MAX + 1
    assert_alive(rig)


def assert_one_line(result, fragment):
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fuseclone: error: "), result.stderr
    assert fragment in lines[0], lines[0]


def test_lazy_must_be_true_or_false(rig, random_source):
    rig.mount("--no-hydration")
    reply = raw_request(rig.meta, b'{"op": "unmount", "lazy": "no"}')
    assert reply["ok"] is False and "lazy" in reply["error"]
    time.sleep(0.3)
    assert mounted(rig.mnt)


def test_a_crowd_of_clients_all_get_answers(rig, random_source):
    rig.mount("--no-hydration")
    clients = 64
    start = threading.Barrier(clients)
    replies, errors = [], []

    def client():
        try:
            start.wait()
            replies.append(control.request(rig.meta, {"op": "status"}, timeout=60))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(replies) == clients and all(r["ok"] for r in replies)


def test_pending_waits_leave_status_message_and_unmount_answered(rig, random_source):
    """`wait` requests last until the clone is complete: a crowd of them (scripts waiting on a
    clone that is not hydrating) used to take every one of the socket's slots, and `status`,
    `message` and `unmount` of that clone then hung in the backlog. Waits beyond their own
    cap get an error answer at once."""
    rig.mount("--no-hydration")
    waiting = []
    try:
        for _ in range(control.MAX_WAITS + 8):
            sock = connect(rig.meta)
            waiting.append(sock)
            sock.sendall(b'{"op": "wait", "timeout": 600}\n')
        time.sleep(1)  # the daemon reads them all
        assert status_json(rig.mnt)["live"] is True
        fuseclone("message", rig.mnt, "hydration_threshold", "4")
        assert status_json(rig.mnt)["hydration_threshold"] == 4
        r = fuseclone("wait", rig.mnt, "--timeout", "1", check=False)
        assert_one_line(r, "waits are pending on this mount already")
        fuseclone("unmount", rig.mnt)
        answers = [read_answer(sock) for sock in waiting]
    finally:
        for sock in waiting:
            sock.close()
    refused = [a for a in answers if a is not None]  # the rest: closed by the unmount
    assert len(refused) == max(0, len(waiting) - control.MAX_WAITS)
    assert all(not a["ok"] and "waits" in a["error"] for a in refused), refused[:1]


def test_every_name_of_a_live_meta_reaches_its_mount(rig, random_source):
    rig.mount("--no-hydration")
    link = str(rig.tmp / "hard-link.meta")
    os.link(rig.meta, link)
    st = status_json(link)
    assert st["live"] is True
    symlink = str(rig.tmp / "sym.meta")
    os.symlink(rig.meta, symlink)
    assert status_json(symlink)["live"] is True
    assert control.log_path(link) == control.log_path(rig.meta) == st["log_file"]


# ---- a hung daemon --------------------------------------------------------------------------


def second_clone(rig, name):
    (rig.tmp / name).mkdir()
    other = Rig(rig.tmp / name, rig.stack)
    make_source_file(other.src, 8 * MiB, seed=5)
    return other


def test_a_stopped_daemon_hangs_no_command(rig, random_source):
    """After kill -STOP of one daemon: its status and unmount say so in one line within their
    deadline, `unmount --lazy` detaches it, and other clones mount, answer and unmount."""
    other = second_clone(rig, "b")
    other.mount("--no-hydration")
    rig.mount("--no-hydration")  # nothing has looked inside this one's mountpoint yet
    pid = daemon_pid(rig)
    os.kill(pid, signal.SIGSTOP)
    rig.stack.callback(os.kill, pid, signal.SIGCONT)  # first thing on the way out
    try:
        r = fuseclone("status", rig.mnt, check=False, timeout=60)
        assert_one_line(r, f"does not answer (its daemon, pid {pid}, is stopped: kill -CONT {pid})")
        assert status_json(other.mnt)["live"] is True  # timeout: 120 s by default
        third = second_clone(rig, "c")
        third.mount("--no-hydration")
        fuseclone("unmount", third.mnt, timeout=60)
        fuseclone("unmount", other.mnt, timeout=60)
        r = fuseclone("unmount", rig.mnt, "--timeout", "2", check=False, timeout=60)
        assert_one_line(r, f"pid {pid}")
        assert mounted(rig.mnt)
        started = time.monotonic()
        r = fuseclone("unmount", rig.mnt, "--lazy", timeout=60)  # the default --timeout is 60 s
        assert "detached" in r.stderr
        assert time.monotonic() - started < control.REQUEST_TIMEOUT + 10  # not the whole 60 s
        assert not mounted(rig.mnt)
    finally:
        os.kill(pid, signal.SIGCONT)
    # It notices, and ends. Its socket goes before its last commit lets go of META, when an
    # offline status would still find META in use: wait for the process.
    wait_gone(pid)
    assert status_json(rig.meta)["live"] is False


def test_a_request_whose_client_gave_up_is_not_acted_on(rig, random_source):
    rig.mount("--no-hydration")
    pid = daemon_pid(rig)
    os.kill(pid, signal.SIGSTOP)
    rig.stack.callback(os.kill, pid, signal.SIGCONT)
    try:
        with connect(rig.meta) as sock:  # accepted by the kernel, then given up on
            sock.sendall(b'{"op": "message", "text": "enable_hydration"}\n')
    finally:
        os.kill(pid, signal.SIGCONT)
    time.sleep(0.5)
    assert status_json(rig.mnt)["hydration_enabled"] is False


# ---- fuzz -----------------------------------------------------------------------------------


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**31, max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
known_ops = st.sampled_from(["status", "message", "wait", "unmount", "nope"])
field_values = json_values | st.sampled_from(
    ["enable_hydration", "disable_hydration", "hydration_threshold 1", "hydration_batch_size 7",
     f"hydration_threshold {U32_MAX + 1}", "hydration_batch_size 0", 0, 0.01, -0.5, 1e308])
shaped_requests = st.fixed_dictionaries(
    {"op": known_ops},
    optional={"text": field_values, "timeout": field_values, "lazy": field_values, "x": field_values})


def encode(value) -> bytes:
    return json.dumps(value).encode()


def harmless(request) -> bool:
    """Requests the fuzz test must not send as they are: a real unmount, or a long wait."""
    if not isinstance(request, dict):
        return True
    if request.get("op") == "unmount" and set(request) <= {"op", "lazy"} \
            and request.get("lazy", False) in (True, False):
        return False
    timeout = request.get("timeout", 60)
    return not (request.get("op") == "wait" and set(request) <= {"op", "timeout"}
                and type(timeout) in (int, float) and not timeout < 0)


lines = st.one_of(
    json_values.filter(harmless).map(encode),
    shaped_requests.filter(harmless).map(encode),
    st.binary(max_size=200).filter(lambda b: b"\n" not in b),
    st.integers(min_value=1, max_value=50_000).map(lambda n: b"[" * n),
    st.integers(min_value=1, max_value=10_000).map(lambda n: b'{"a":' * n),
    st.integers(min_value=300, max_value=5000).map(lambda n: b"9" * n),
)


@pytest.fixture(scope="module")
def live_clone(tmp_path_factory):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    import contextlib

    with contextlib.ExitStack() as stack:
        rig = Rig(tmp_path_factory.mktemp("fuzz"), stack)
        make_source_file(rig.src, 8 * MiB, seed=3)
        rig.mount("--no-hydration")
        yield rig
        log = status_json(rig.mnt)["log_file"]
        assert "Traceback" not in open(log).read(), f"the fuzz test found a bug: see {log}"


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(line=lines, cut=st.booleans())
def test_fuzz_the_control_socket(live_clone, line, cut):
    rig = live_clone
    with connect(rig.meta) as sock:
        if cut:  # part of a line, then gone
            sock.sendall(line[: len(line) // 2])
        else:
            sock.sendall(line + b"\n")
            answer = read_answer(sock)
            assert answer is not None and isinstance(answer["ok"], bool), line[:60]
    assert_alive(rig)


def test_a_daemon_waiting_on_a_frozen_filesystem_is_named_as_such(tmp_path):
    """A process blocked in the kernel by a frozen filesystem (as a daemon whose DST or META
    lies on it) is described as waiting there, not as stopped."""
    from fuseclone.control import why_not_answering

    image, where = tmp_path / "fs.img", tmp_path / "fs"
    where.mkdir()
    sh("truncate", "-s", "32M", image)
    sh("mkfs.ext4", "-q", image)
    sh("mount", "-o", "loop", image, where)
    writer = None
    try:
        sh("fsfreeze", "-f", where)
        try:
            writer = subprocess.Popen([sys.executable, "-c",
                                       f"open({str(where / 'f')!r}, 'w').write('x')"])
            deadline = time.monotonic() + 10
            while "waits inside the kernel" not in why_not_answering(writer.pid):
                assert time.monotonic() < deadline, why_not_answering(writer.pid)
                time.sleep(0.05)
            assert "frozen" in why_not_answering(writer.pid)
        finally:
            sh("fsfreeze", "-u", where)
        assert writer.wait(timeout=10) == 0
        assert "is busy or hung" in why_not_answering(os.getpid())
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
        sh("umount", where)


def test_unmount_names_a_last_commit_held_by_a_frozen_filesystem(rig, random_source):
    """DST and META on a frozen filesystem: the unmount itself is done at once, and the mount's
    last commit waits for the thaw. `unmount` said "still mounted", which /proc/mounts denied."""
    frozen = rig.ext4()
    rig.dst, rig.meta = os.path.join(frozen, "dst.img"), os.path.join(frozen, "clone.meta")
    rig.mount("--max-rate", "2M")  # copies go on: the last commit has bits to write
    pid = daemon_pid(rig)
    sh("fsfreeze", "-f", frozen)
    try:
        result = fuseclone("unmount", rig.mnt, "--timeout", "2", check=False)
        assert not mounted(rig.mnt)
    finally:
        sh("fsfreeze", "-u", frozen)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "unmounted, but the mount has not let go of" in result.stderr, result.stderr
    assert f"pid {pid}, waits inside the kernel" in result.stderr and "frozen" in result.stderr
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, "the daemon did not finish after the thaw"
        time.sleep(0.05)
    fuseclone("check", rig.meta, "--src", rig.src, "--dst", rig.dst, "--verify")


READ_PAST_THE_PAGE_CACHE = """
import mmap, os, sys
buffer = mmap.mmap(-1, 65536)
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
for offset in range(0, 8 << 20, 65536):
    assert os.preadv(fd, [buffer], offset) == 65536
"""


def test_a_message_while_metas_filesystem_is_frozen_holds_up_no_user_io(rig, random_source):
    """A message is recorded in META's header. Written and fdatasynced on the daemon's event
    loop, it held every request of the mount (reads of hydrated data, status) until META's
    filesystem was thawed (fsfreeze, as for a snapshot of it): one command stopped the
    clone's users. The header waits in a worker thread; the settings apply at once."""
    frozen = rig.ext4()
    rig.meta = os.path.join(frozen, "clone.meta")
    rig.mount()
    fuseclone("wait", rig.mnt, "--timeout", "60")
    pid = daemon_pid(rig)
    sh("fsfreeze", "-f", frozen)
    rig.stack.callback(lambda: sh("fsfreeze", "-u", frozen, check=False))
    message = subprocess.Popen(
        [sys.executable, "-m", "fuseclone", "message", rig.mnt, "disable_hydration"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while "waits inside the kernel" not in control.why_not_answering(pid):
            assert time.monotonic() < deadline, control.why_not_answering(pid)
            time.sleep(0.05)
        sh(sys.executable, "-c", READ_PAST_THE_PAGE_CACHE, rig.image, timeout=10)
        assert status_json(rig.mnt)["hydration_enabled"] is False
    finally:
        sh("fsfreeze", "-u", frozen)
        _, err = message.communicate(timeout=30)
    assert message.returncode == 0, err
    fuseclone("unmount", rig.mnt)


def test_a_huge_max_rate_message_does_not_end_a_hydrating_mount(rig, random_source):
    """`max_rate` took any number of digits: the next copy's throttle made a float of it
    (OverflowError), and the hydrator's failure ended the daemon. Refused in one line now."""
    rig.mount("--max-rate", "1M")  # hydration goes on, paced
    pid = daemon_pid(rig)
    result = fuseclone("message", rig.mnt, "max_rate", "9" * 400, check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    fuseclone("message", rig.mnt, "max_rate", "2M")
    assert daemon_pid(rig) == pid
    status = status_json(rig.mnt)
    assert status["max_rate"] == 2 * MiB and status["metadata_mode"] == "rw"
    assert "Traceback" not in open(status["log_file"]).read()
    fuseclone("unmount", rig.mnt)
