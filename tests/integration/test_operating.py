"""Operating clones as services: `list`, Prometheus metrics (the command and the HTTP endpoint),
systemd's notify protocol, and the dmsetup line's metadata usage."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fuseclone import control
from tests.integration.conftest import MiB, fuseclone, sh, status_json
from tests.integration.test_control import daemon_pid, second_clone

LIST_KEYS = {"mountpoint", "image", "source", "destination", "metadata", "hydrated_regions",
             "total_regions", "hydration_enabled", "state", "other_mount_namespace"}


def real(mountpoint):
    """MOUNTPOINT as the mount table has it, without a look at it (its daemon may be stopped)."""
    return os.path.join(os.path.realpath(os.path.dirname(mountpoint)), os.path.basename(mountpoint))


def list_json(*args, timeout=60):
    return {clone["mountpoint"]: clone for clone in json.loads(fuseclone("list", "--json", *args,
                                                                         timeout=timeout).stdout)}


def stop_daemon(rig):
    pid = daemon_pid(rig)
    os.kill(pid, signal.SIGSTOP)
    rig.stack.callback(os.kill, pid, signal.SIGCONT)  # before the unmount that needs it running
    return pid


# ---- list -------------------------------------------------------------------------------------


def test_list_shows_each_clone_with_its_state(rig, random_source):
    rig.mount("--no-hydration")
    other = second_clone(rig, "b")
    other.mount()
    fuseclone("wait", other.mnt, "--timeout", "60")
    clones = list_json()
    mine = clones[real(rig.mnt)]
    assert set(mine) == LIST_KEYS
    assert mine == {"mountpoint": real(rig.mnt), "image": rig.image, "source": rig.src,
                    "destination": rig.dst, "metadata": rig.meta, "hydrated_regions": 0,
                    "total_regions": 32 * MiB // 4096, "hydration_enabled": False, "state": "idle",
                    "other_mount_namespace": False}
    assert clones[real(other.mnt)]["state"] == "complete"
    fuseclone("message", rig.mnt, "enable_hydration")
    assert list_json()[real(rig.mnt)]["state"] in ("hydrating", "complete")
    table = fuseclone("list").stdout.splitlines()
    assert table[0].split() == ["MOUNTPOINT", "IMAGE", "SOURCE", "DST", "META", "PROGRESS", "RATE",
                                "STATE"]
    row = next(line for line in table if line.startswith(real(other.mnt) + " "))
    assert row.split()[1:5] == [other.image, other.src, other.dst, other.meta]
    assert "100.0%" in row and row.endswith("complete")


def test_list_does_not_wait_for_stopped_daemons_one_after_another(rig, random_source):
    """Two stopped daemons cost the deadline once, and say so; a killed one says it is gone."""
    rig.mount("--no-hydration")
    stopped = [second_clone(rig, name) for name in ("b", "c")]
    killed = second_clone(rig, "d")
    for clone in (*stopped, killed):
        clone.mount("--no-hydration")
    pids = [stop_daemon(clone) for clone in stopped]
    os.kill(daemon_pid(killed), signal.SIGKILL)
    started = time.monotonic()
    clones = list_json("--timeout", "4")
    elapsed = time.monotonic() - started
    assert elapsed < 7.5, f"list took {elapsed:.1f} s: the stopped daemons were asked in turn"
    for clone, pid in zip(stopped, pids):
        assert clones[real(clone.mnt)]["state"] == f"not answering (stopped? pid {pid})"
        assert clones[real(clone.mnt)]["hydrated_regions"] is None
    deadline = time.monotonic() + 30
    while not control.daemon_gone(killed.meta):  # the kernel closes its socket's listener
        assert time.monotonic() < deadline
        time.sleep(0.1)
    clones = list_json("--timeout", "4")
    assert clones[real(killed.mnt)]["state"].startswith("daemon gone")
    assert clones[real(rig.mnt)]["state"] == "idle"


# ---- metrics ----------------------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def samples_of(text, mountpoint):
    """{metric sample name: value} of one clone, from the exposition parsed by Prometheus'
    own client library; every metric must have its HELP and TYPE."""
    found, types = {}, {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, family.name
        types[family.name] = family.type
        for sample in family.samples:
            if sample.labels.get("mountpoint") == mountpoint:
                found[sample.name] = sample.value
    return found, types


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return answer.read().decode()


def test_metrics_endpoint_counts_user_io_and_hydration(rig, random_source):
    port = free_port()
    rig.mount("--no-hydration", "--metrics-listen", f"127.0.0.1:{port}", "--write-cache", "0")
    mountpoint = real(rig.mnt)
    before, types = samples_of(scrape(port), mountpoint)
    assert types["fuseclone_hydrated_regions"] == "gauge"
    assert types["fuseclone_source_read_bytes"] == "counter"  # the parser drops the _total
    assert before["fuseclone_regions"] == 32 * MiB // 4096
    assert before["fuseclone_region_size_bytes"] == 4096
    assert before["fuseclone_up"] == 1 and before["fuseclone_user_read_bytes_total"] == 0
    for skip in (0, 8):  # two reads apart: a sequential stream would get readahead beyond them
        sh("dd", f"if={rig.image}", "of=/dev/null", "bs=1M", "count=1", f"skip={skip}", "iflag=direct")
    sh("dd", "if=/dev/zero", f"of={rig.image}", "bs=64k", "count=4", "seek=100", "oflag=direct",
       "conv=notrunc")
    # The reads' copy-on-read stores finish in the background; whole-region writes at once.
    deadline = time.monotonic() + 30
    while (after := samples_of(scrape(port), mountpoint)[0])["fuseclone_hydrated_bytes_total"] < (
            2 * MiB + (256 << 10)):
        assert time.monotonic() < deadline, after
        time.sleep(0.1)
    assert after["fuseclone_hydrated_bytes_total"] == 2 * MiB + (256 << 10)
    assert after["fuseclone_hydrated_regions"] * 4096 == after["fuseclone_hydrated_bytes_total"]
    assert after["fuseclone_user_read_bytes_total"] == 2 * MiB
    assert after["fuseclone_user_write_bytes_total"] == 256 << 10
    assert after["fuseclone_source_read_bytes_total"] == 2 * MiB
    assert after["fuseclone_hydration_errors_total"] == 0
    assert after["fuseclone_written_commits_total"] == 0  # whole unhydrated regions wait for none
    # A write into regions the first read hydrated waits for its written bits' commit.
    sh("dd", "if=/dev/zero", f"of={rig.image}", "bs=4k", "count=1", "oflag=direct", "conv=notrunc")
    written = samples_of(scrape(port), mountpoint)[0]
    assert written["fuseclone_written_commits_total"] == 1
    assert written["fuseclone_written_wait_seconds_total"] > 0
    # `fuseclone metrics` says the same of this clone.
    printed, _ = samples_of(fuseclone("metrics").stdout, mountpoint)
    assert printed["fuseclone_user_read_bytes_total"] == 2 * MiB
    assert printed["fuseclone_regions"] == after["fuseclone_regions"]


def test_metrics_endpoint_shrugs_off_bad_clients(rig, random_source):
    port = free_port()
    rig.mount("--no-hydration", "--metrics-listen", f"127.0.0.1:{port}")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=30)
    assert error.value.code == 404
    for junk in (b"\x00\xff garbage\r\n\r\n", b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 5000, b""):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(65536)  # an error answer, or the connection closed
    assert "fuseclone_up" in scrape(port)
    assert status_json(rig.mnt)["live"] is True


def test_a_metrics_port_in_use_is_one_line_and_leaves_nothing(rig, random_source):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = fuseclone("mount", rig.src, rig.dst, rig.meta, rig.mnt, "--metrics-listen",
                           f"127.0.0.1:{port}", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"fuseclone: error: --metrics-listen 127.0.0.1:{port}: Address already in use"]
    assert real(rig.mnt) not in open("/proc/mounts").read()
    assert not os.path.exists(rig.meta) and not os.path.exists(rig.dst)
    bad = fuseclone("mount", rig.src, rig.dst, rig.meta, rig.mnt, "--metrics-listen", "9100",
                    check=False)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr


# ---- systemd notify ---------------------------------------------------------------------------


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path):
    """A datagram socket like systemd's, and the NOTIFY_SOCKET value that names it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = name = str(tmp_path / "notify.sock")
    else:
        name = f"fuseclone-test-{os.getpid()}-{time.monotonic_ns()}"
        address, name = "\0" + name, "@" + name
    sock.bind(address)
    sock.settimeout(60)
    with sock:
        yield sock, name


def receive_until(sock, wanted):
    """The first notification, as a {KEY: VALUE} dict, for which WANTED is true."""
    while True:
        text = sock.recv(4096).decode()
        message = dict(line.split("=", 1) for line in text.splitlines())
        if wanted(message):
            return message


def test_foreground_mount_speaks_systemd_notify(rig, random_source, notify_socket):
    sock, name = notify_socket
    env = dict(os.environ, NOTIFY_SOCKET=name)
    hook_saw = rig.tmp / "complete.txt"
    daemon = subprocess.Popen([sys.executable, "-m", "fuseclone", "mount", "--foreground",
                               "--no-hydration", rig.src, rig.dst, rig.meta, rig.mnt,
                               "--on-complete", f"sh -c 'echo \"$NOTIFY_SOCKET\" > {hook_saw}'"],
                              env=env, stderr=subprocess.PIPE, text=True)
    rig.stack.callback(daemon.wait, 60)
    rig.stack.callback(daemon.kill)
    rig.stack.callback(rig._force_unmount, rig.mnt)
    ready = receive_until(sock, lambda message: "READY" in message)
    assert ready["READY"] == "1"
    assert ready["STATUS"] == f"0.0% (0/{32 * MiB // 4096} regions), 0 B/s, idle"
    with open(rig.image, "rb") as image:  # ready means the image can be opened
        assert len(image.read(4096)) == 4096
    fuseclone("message", rig.mnt, "enable_hydration")
    receive_until(sock, lambda message: message.get("STATUS", "").startswith("100.0% ")
                  and message["STATUS"].endswith(", complete"))
    deadline = time.monotonic() + 30
    while not hook_saw.exists() or not hook_saw.read_text():
        assert time.monotonic() < deadline, "the --on-complete hook did not run"
        time.sleep(0.05)
    assert hook_saw.read_text() == "\n"  # the hook does not inherit NOTIFY_SOCKET
    daemon.send_signal(signal.SIGTERM)
    stopping = receive_until(sock, lambda message: "STOPPING" in message)
    assert stopping["STOPPING"] == "1"
    assert daemon.wait(60) == 0, daemon.stderr.read()


# ---- dmsetup ----------------------------------------------------------------------------------


def test_dmsetup_line_counts_metadata_blocks(rig, random_source):
    rig.mount("--no-hydration")
    fields = fuseclone("status", rig.mnt, "--dmsetup").stdout.split()
    used, total = map(int, fields[1].split("/"))
    # header A/B, then hydrated and written bitmap slots A/B: 8192 regions fit one block each
    assert fields[0] == "8" and total == 6 and 1 <= used < total
    fuseclone("message", rig.mnt, "enable_hydration")
    fuseclone("wait", rig.mnt, "--timeout", "60")
    fields = fuseclone("status", rig.mnt, "--dmsetup").stdout.split()
    assert int(fields[1].split("/")[0]) > used and fields[1].endswith("/6")
