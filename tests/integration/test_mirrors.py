"""Sources that come and go, through the real CLI against real nbdkit servers: `--mirror`
failover (and back), mirrors of another image refused, and a resumed clone that mounts while its
source is down and hydrates once it answers (or stops, when it answers with another image); an
export that serves other data of the same size, told apart by its data sample."""

import errno
import mmap
import os
import time
from pathlib import Path

import pytest

from tests.engine.conftest import make_source_file
from tests.integration.conftest import MiB, fuseclone, sha256, status_json
from tests.sources.conftest import nbdkit  # noqa: F401  (a fixture)


@pytest.fixture
def nbd_file_server(nbdkit):
    """nbd_file_server(path, name) -> a started Nbdkit serving PATH on the Unix socket
    tmp_path/NAME.sock (a restart keeps the socket); every one is killed at teardown."""
    return lambda path, name: nbdkit("file", path, name=name)


def pread_direct(path, offset, length):
    """LENGTH bytes of PATH at OFFSET read with O_DIRECT: straight from the daemon, no
    readahead into regions the test did not ask for."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, length)
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)


def source_bytes(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def wait_for(predicate, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def server_states(st):
    return [server["state"] for server in st["servers"]]


# ---- --mirror ---------------------------------------------------------------------------------


def test_hydration_fails_over_to_a_mirror_and_comes_back(rig, nbd_file_server):
    make_source_file(rig.src, 32 * MiB, seed=5)
    primary = nbd_file_server(rig.src, "primary")
    mirror = nbd_file_server(rig.src, "mirror")
    rig.mount("--mirror", mirror.url(), "--max-rate", "8M", src=primary.url())
    st = wait_for(lambda: (s := status_json(rig.mnt))["hydrated_regions"] > 0 and s,
                  "hydration to start")
    assert server_states(st) == ["serving", "standby"]
    primary.stop()  # mid-hydration: 32 MiB at 8 MB/s takes 4 s
    assert not status_json(rig.mnt)["complete"]
    fuseclone("wait", rig.mnt, "--timeout", "60")
    st = status_json(rig.mnt)
    assert st["complete"] and st["hydration_error"] is None
    assert server_states(st) == ["failing", "serving"]
    assert st["servers"][0]["error"]
    primary.start()
    wait_for(lambda: server_states(status_json(rig.mnt)) == ["serving", "standby"],
             "reads to come back to the primary")
    assert pread_direct(rig.image, 20 * MiB, MiB) == source_bytes(rig.src, 20 * MiB, MiB)
    fuseclone("unmount", rig.mnt)
    assert sha256(rig.dst) == sha256(rig.src)


def test_a_mirror_of_another_image_is_refused(rig, nbd_file_server):
    make_source_file(rig.src, 8 * MiB, seed=6)
    other = str(rig.tmp / "other.img")
    make_source_file(other, 4 * MiB, seed=6)
    primary = nbd_file_server(rig.src, "primary")
    mirror = nbd_file_server(other, "mirror")
    result = fuseclone("mount", primary.url(), rig.dst, rig.meta, rig.mnt, "--mirror", mirror.url(),
                       check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and mirror.url() in lines[0] and "bytes" in lines[0], lines
    assert not os.path.exists(rig.dst) and not os.path.exists(rig.meta)


# ---- a resumed clone whose source is down ------------------------------------------------------


@pytest.fixture
def half_hydrated(rig, nbd_file_server):
    """A clone of 16 MiB over NBD whose first MiB alone is hydrated, unmounted, its server
    stopped. Returns the stopped server."""
    make_source_file(rig.src, 16 * MiB, seed=7)
    server = nbd_file_server(rig.src, "src")
    rig.mount("--no-hydration", "--region-size", "64K", src=server.url())
    pread_direct(rig.image, 0, MiB)  # copy-on-read hydrates it
    wait_for(lambda: status_json(rig.mnt)["hydrated_regions"] == 16, "the copy-on-read stores")
    fuseclone("unmount", rig.mnt)
    server.stop()
    return server


def test_a_resumed_clone_mounts_while_its_source_is_down(rig, half_hydrated):
    server = half_hydrated
    rig.mount(src=server.url())
    st = status_json(rig.mnt)
    assert server_states(st) == ["unreachable"] and st["servers"][0]["error"]
    assert st["hydrated_regions"] == 16 and st["hydration_error"] is None
    assert pread_direct(rig.image, 0, MiB) == source_bytes(rig.src, 0, MiB)
    with pytest.raises(OSError) as raised:
        pread_direct(rig.image, 8 * MiB, 64 * 1024)
    assert raised.value.errno == errno.EIO
    server.start()
    fuseclone("wait", rig.mnt, "--timeout", "60")
    assert server_states(status_json(rig.mnt)) == ["serving"]
    fuseclone("unmount", rig.mnt)
    assert sha256(rig.dst) == sha256(rig.src)


def test_a_source_that_returns_with_another_image_stops_hydration(rig, half_hydrated,
                                                                  nbd_file_server):
    rig.mount(src=half_hydrated.url())
    other = str(rig.tmp / "other.img")
    make_source_file(other, 8 * MiB, seed=8)
    nbd_file_server(other, "src")  # the same socket, another export
    result = fuseclone("wait", rig.mnt, "--timeout", "60", check=False)
    assert result.returncode == 1 and "size" in result.stderr, result.stderr
    st = status_json(rig.mnt)
    assert "8388608" in st["hydration_error"] and server_states(st) == ["refused"]
    assert st["hydrated_regions"] == 16
    assert pread_direct(rig.image, 0, MiB) == source_bytes(rig.src, 0, MiB)
    with pytest.raises(OSError) as raised:
        pread_direct(rig.image, 8 * MiB, 64 * 1024)
    assert raised.value.errno == errno.EIO


def test_a_new_clone_needs_its_source(rig, tmp_path):
    url = f"nbd+unix:///?socket={tmp_path / 'nobody.sock'}"
    result = fuseclone("mount", url, rig.dst, rig.meta, rig.mnt, check=False)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not os.path.exists(rig.dst) and not os.path.exists(rig.meta)


# ---- the data sample: other data of the same size ---------------------------------------------


def same_size_other(rig, seed=9):
    """Another image of the source's size (different everywhere, its ends too)."""
    other = str(rig.tmp / "other.img")
    make_source_file(other, os.path.getsize(rig.src), seed=seed)
    return other


def try_mount(rig, *args):
    """`fuseclone mount ARGS... DST META MNT` that may fail; unmounted at teardown if it
    did not."""
    rig.stack.callback(rig._force_unmount, rig.mnt)
    return fuseclone("mount", *args, rig.dst, rig.meta, rig.mnt, check=False)


def refused_one_line(result, *words):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(word in lines[0] for word in words), lines


def test_a_resumed_clone_refuses_other_data_of_the_same_size(rig, half_hydrated,
                                                            nbd_file_server):
    server = nbd_file_server(same_size_other(rig), "src")  # the same socket
    meta_before, dst_before = Path(rig.meta).read_bytes(), sha256(rig.dst)
    result = try_mount(rig, server.url())
    refused_one_line(result, server.url(), "data differs from what the clone was made from")
    assert Path(rig.meta).read_bytes() == meta_before and sha256(rig.dst) == dst_before
    assert rig.mnt not in open("/proc/mounts").read()
    check = fuseclone("check", rig.meta, "--src", server.url(), check=False)
    assert check.returncode == 1 and "MISMATCH" in check.stdout, check.stdout


def test_the_same_data_on_a_new_socket_resumes(rig, half_hydrated, nbd_file_server):
    server = nbd_file_server(rig.src, "elsewhere")
    rig.mount(src=server.url())
    fuseclone("wait", rig.mnt, "--timeout", "60")
    fuseclone("unmount", rig.mnt)
    assert sha256(rig.dst) == sha256(rig.src)


def test_a_mirror_with_other_data_of_the_same_size_is_refused(rig, nbd_file_server):
    make_source_file(rig.src, 8 * MiB, seed=6)
    primary = nbd_file_server(rig.src, "primary")
    mirror = nbd_file_server(same_size_other(rig), "mirror")
    result = try_mount(rig, primary.url(), "--mirror", mirror.url())
    refused_one_line(result, mirror.url(), "its data differs from the source's")
    assert not os.path.exists(rig.dst) and not os.path.exists(rig.meta)


def test_a_mirror_of_a_resumed_clone_is_checked_against_the_recorded_sample(
        rig, half_hydrated, nbd_file_server):
    mirror = nbd_file_server(same_size_other(rig), "mirror")
    result = try_mount(rig, half_hydrated.url(), "--mirror", mirror.url())  # the primary is down
    refused_one_line(result, mirror.url(), "its data differs from the source's")


def test_a_metadata_file_without_a_sample_resumes_and_gains_it(rig, half_hydrated,
                                                              nbd_file_server):
    from fuseclone.metadata import Metadata
    from fuseclone.sources.base import SAMPLE_KEY

    with Metadata.open(rig.meta, writable=True) as meta:  # as a version before samples wrote it
        identity = meta.header.identity
        sample = identity["source"].pop(SAMPLE_KEY)
        meta.mark_open(identity)
        meta.mark_clean()
    assert SAMPLE_KEY not in Metadata.read_header(rig.meta).identity["source"]
    nbd_file_server(rig.src, "src")
    rig.mount(src=half_hydrated.url())
    fuseclone("unmount", rig.mnt)
    assert Metadata.read_header(rig.meta).identity["source"][SAMPLE_KEY] == sample


def test_a_source_that_returns_with_other_data_of_the_same_size_stops_hydration(
        rig, half_hydrated, nbd_file_server):
    rig.mount(src=half_hydrated.url())
    nbd_file_server(same_size_other(rig), "src")  # the same socket, the same size
    result = fuseclone("wait", rig.mnt, "--timeout", "60", check=False)
    assert result.returncode == 1 and "data differs" in result.stderr, result.stderr
    st = status_json(rig.mnt)
    assert "data differs from what the clone was made from" in st["hydration_error"]
    assert server_states(st) == ["refused"] and st["hydrated_regions"] == 16
    assert pread_direct(rig.image, 0, MiB) == source_bytes(rig.src, 0, MiB)
    with pytest.raises(OSError) as raised:
        pread_direct(rig.image, 8 * MiB, 64 * 1024)
    assert raised.value.errno == errno.EIO


def test_a_server_that_comes_back_with_other_data_mid_clone_fails_reads(rig, nbd_file_server):
    """The server restarted on another image of the same size while the clone hydrates:
    checked when its connections are dialled again; the mount reads nothing of it."""
    make_source_file(rig.src, 16 * MiB, seed=7)
    server = nbd_file_server(rig.src, "src")
    rig.mount("--max-rate", "2M", "--region-size", "64K", src=server.url())
    wait_for(lambda: status_json(rig.mnt)["hydrated_regions"] > 0, "hydration to start")
    server.stop()
    nbd_file_server(same_size_other(rig), "src")  # the same socket, the same size
    note = wait_for(lambda: (status_json(rig.mnt)["hydration_retry"] or "").count("other data")
                    and status_json(rig.mnt)["hydration_retry"], "the changed source in status")
    assert "the source changed since the clone began" in note, note
    with pytest.raises(OSError) as raised:
        pread_direct(rig.image, 15 * MiB, 64 * 1024)
    assert raised.value.errno == errno.EIO
    fuseclone("unmount", rig.mnt)
    region = 64 * 1024
    other = Path(rig.tmp / "other.img").read_bytes()
    dst = Path(rig.dst).read_bytes()
    taken = [i for i in range(0, len(other), region)
             if other[i:i + region] == dst[i:i + region] and any(other[i:i + region])]
    assert taken == []  # no region of the other image's data reached DST
