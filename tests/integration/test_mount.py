"""The image through FUSE and a loop device, with real filesystems, fstrim and fio."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from fuseclone.metadata import Metadata
from tests.integration.conftest import MiB, fuseclone, sh, sha256, status_json


def test_clone_reads_like_the_source_and_hydrates(rig, random_source):
    image = rig.mount()
    assert image == rig.image
    assert os.path.getsize(image) == os.path.getsize(rig.src)
    assert sha256(image) == sha256(rig.src)  # served from the source while hydrating
    fuseclone("wait", rig.mnt, "--timeout", "60")
    st = status_json(rig.mnt)
    assert st["hydrated_regions"] == st["total_regions"] and st["live"]
    fuseclone("unmount", rig.mnt)
    assert not Metadata.in_use(rig.meta)  # unmount returns after the daemon let go of META
    assert sha256(rig.dst, os.path.getsize(rig.src)) == sha256(rig.src)
    with Metadata.open(rig.meta, writable=False) as meta:
        assert meta.header.clean and meta.complete


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_mkfs_write_remount_read_back(rig, random_source, fs):
    if fs == "xfs":
        os.truncate(rig.src, 320 * MiB)  # mkfs.xfs wants 300 MB; the rest of the source is a hole
    rig.mount("--no-hydration")
    loop = rig.losetup()
    sh(f"mkfs.{fs}", "-q", "-f" if fs == "xfs" else "-F", loop)
    where = rig.mount_fs(loop, str(rig.tmp / "fs"))
    payload = os.urandom(5 * MiB)
    with open(os.path.join(where, "payload"), "wb") as f:
        f.write(payload)
    sh("sync")
    sh("umount", where)
    sh("losetup", "-d", loop)
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    rig.mount()  # resume, hydration on
    loop = rig.losetup()
    where = rig.mount_fs(loop, str(rig.tmp / "fs"))
    with open(os.path.join(where, "payload"), "rb") as f:
        assert f.read() == payload
    sh("umount", where)
    sh("losetup", "-d", loop)
    fuseclone("wait", rig.mnt, "--timeout", "60")
    fuseclone("unmount", rig.mnt)
    # the destination alone now holds the filesystem
    sh(f"fsck.{fs}" if fs == "ext4" else "xfs_repair", "-n" if fs == "xfs" else "-fn", rig.dst)


def test_fstrim_marks_free_space_without_reading_it(rig, ext4_source):
    rig.mount("--no-hydration", "--no-copy-on-read")
    loop = rig.losetup()
    where = rig.mount_fs(loop, str(rig.tmp / "fs"))
    before = status_json(rig.mnt)
    out = sh("fstrim", "-v", where).stdout
    assert "trimmed" in out
    after = status_json(rig.mnt)
    trimmed_regions = after["hydrated_regions"] - before["hydrated_regions"]
    # 64 MiB with ~11.2 MiB of files: most of the image is free space, marked without copying
    assert trimmed_regions * 4096 > 40 * MiB, after
    assert after["source_bytes_read"] - before["source_bytes_read"] < 1 * MiB
    for name, digest in ext4_source.items():
        assert sha256(os.path.join(where, name)) == digest
    sh("umount", where)
    sh("losetup", "-d", loop)
    fuseclone("message", rig.mnt, "enable_hydration")
    fuseclone("wait", rig.mnt, "--timeout", "60")
    final = status_json(rig.mnt)
    # hydration copied only what fstrim left: far less than the image
    assert final["source_bytes_read"] < 30 * MiB, final
    fuseclone("unmount", rig.mnt)
    sh("fsck.ext4", "-fn", rig.dst)
    assert os.stat(rig.dst).st_blocks * 512 < 30 * MiB  # free space never landed in DST


def test_fio_verify_on_a_half_hydrated_clone(rig, random_source):
    if not os.path.exists("/usr/bin/fio"):
        pytest.skip("fio is not installed")
    rig.mount("--no-hydration")
    with open(rig.image, "rb") as f:  # hydrate the first half by reading it (copy-on-read)
        f.read(16 * MiB)
    st = status_json(rig.mnt)
    assert 0 < st["hydrated_regions"] < st["total_regions"]
    loop = rig.losetup()
    fuseclone("message", rig.mnt, "enable_hydration")
    sh("fio", "--name=verify", f"--filename={loop}", "--direct=1", "--ioengine=libaio",
       "--iodepth=16", "--rw=randwrite", "--bs=4k", "--size=32M", "--verify=crc32c",
       "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0", "--numjobs=1", "--randrepeat=1")
    sh("losetup", "-d", loop)
    fuseclone("wait", rig.mnt, "--timeout", "60")


def test_fio_verify_with_large_writes_on_a_hydrated_clone(rig, random_source):
    """Writes of 256 KiB and more to hydrated regions are copied by the FUSE session's job
    thread; smaller ones on the event loop. Mixed, at depth, they must land where they belong."""
    if not os.path.exists("/usr/bin/fio"):
        pytest.skip("fio is not installed")
    rig.mount()
    fuseclone("wait", rig.mnt, "--timeout", "60")
    loop = rig.losetup(None, "--direct-io=on")
    sh("fio", "--name=large", f"--filename={loop}", "--direct=1", "--ioengine=libaio",
       "--iodepth=16", "--rw=randwrite", "--bsrange=4k-1M", "--size=32M", "--verify=crc32c",
       "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0", "--randrepeat=1")
    with open(loop, "rb") as f:
        image = f.read()
    sh("losetup", "-d", loop)
    fuseclone("unmount", rig.mnt)
    with open(rig.dst, "rb") as f:
        assert f.read(len(image)) == image


def test_concurrent_readers_and_writers(rig, random_source):
    rig.mount()
    procs = []
    for i in range(4):  # writers on disjoint 4 MiB stripes, readers over the rest
        procs.append(subprocess.Popen([
            "dd", "if=/dev/urandom", f"of={rig.image}", "bs=64K", "count=64",
            f"seek={i * 64}", "conv=notrunc,fsync", "status=none"]))
        procs.append(subprocess.Popen([
            "dd", f"if={rig.image}", "of=/dev/null", "bs=1M", "skip=16", "status=none"]))
    for p in procs:
        assert p.wait(timeout=120) == 0
    with open(rig.image, "rb") as img, open(rig.src, "rb") as src:
        img.seek(16 * MiB)
        src.seek(16 * MiB)
        assert img.read() == src.read()  # the untouched half still equals the source


def test_sigterm_mid_hydration_leaves_a_resumable_clone(rig, random_source):
    proc = subprocess.Popen([sys.executable, "-m", "fuseclone", "mount", "--foreground",
                             "--max-rate", "8M", rig.src, rig.dst, rig.meta, rig.mnt],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while os.path.realpath(rig.mnt) not in open("/proc/mounts").read():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)
        with open(rig.image, "r+b") as f:
            f.seek(20 * MiB + 123)
            f.write(b"kept across SIGTERM")
            os.fsync(f.fileno())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rig.wait_unmounted()
    with Metadata.open(rig.meta, writable=False) as meta:
        assert meta.header.clean and 0 < meta.hydrated_count < meta.nr_regions
    rig.mount()
    with open(rig.image, "rb") as f:
        f.seek(20 * MiB + 123)
        assert f.read(19) == b"kept across SIGTERM"
    fuseclone("wait", rig.mnt, "--timeout", "60")
    fuseclone("unmount", rig.mnt)
    expected = bytearray(open(rig.src, "rb").read())
    expected[20 * MiB + 123 : 20 * MiB + 142] = b"kept across SIGTERM"
    with open(rig.dst, "rb") as f:
        assert f.read(len(expected)) == bytes(expected)


def test_regular_file_mountpoint_is_the_image(rig, random_source):
    target = str(rig.tmp / "clone.img")
    open(target, "w").close()
    out = fuseclone("mount", rig.src, rig.dst, rig.meta, target).stdout.strip()
    rig.stack.callback(lambda: fuseclone("unmount", target, check=False))
    assert out == target
    assert os.path.getsize(target) == os.path.getsize(rig.src)
    with open(target, "rb") as f:
        assert f.read(4096) == open(rig.src, "rb").read(4096)
    fuseclone("unmount", target)


def _processes_naming(path):
    """The pids whose command line names PATH."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and path.encode() in open(f"/proc/{entry}/cmdline", "rb").read():
                found.append(int(entry))
        except OSError:
            continue
    return found


def _interruptible_as_from_a_terminal():
    """A shell's background job (`pytest ... &`) starts with SIGINT ignored, and Python then
    installs no KeyboardInterrupt handler: give the command the disposition a terminal's
    foreground job has, which is what Ctrl-C reaches."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("stop", ["ctrl-c", "kill"])
def test_a_mount_command_stopped_while_the_source_is_slow_leaves_nothing(rig, stop):
    """Ctrl-C (or SIGKILL) of `mount` while the HTTP server has not answered its HEAD yet: the
    daemon went on once the server answered, created DST and META, mounted, and died of the
    closed ready pipe (a traceback), leaving DST and META behind a command that said it
    stopped. Now nothing is created: no DST, META, mount or daemon."""
    from tests.sources_http.test_http import ScriptedServer

    server = ScriptedServer()
    server.head = "gated"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rig.stack.callback(server.server_close)
    rig.stack.callback(server.shutdown)
    rig.stack.callback(server.gate.set)
    url = f"http://127.0.0.1:{server.server_address[1]}/image.raw"
    command = subprocess.Popen([sys.executable, "-m", "fuseclone", "mount", url, rig.dst,
                                rig.meta, rig.mnt], stderr=subprocess.PIPE, text=True,
                               preexec_fn=_interruptible_as_from_a_terminal)
    rig.stack.callback(rig._force_unmount, rig.mnt)
    assert server.at_gate.wait(30), "no HEAD came"
    command.send_signal(signal.SIGINT if stop == "ctrl-c" else signal.SIGKILL)
    assert command.wait(timeout=30) != 0
    if stop == "ctrl-c":
        assert command.stderr.read().strip() == "fuseclone: error: interrupted: not mounted"
    server.gate.set()  # the server answers now
    deadline = time.monotonic() + 30
    while _processes_naming(rig.meta):
        assert time.monotonic() < deadline, "the mount's daemon still runs"
        time.sleep(0.05)
    assert not os.path.exists(rig.dst) and not os.path.exists(rig.meta)
    assert os.path.realpath(rig.mnt) not in open("/proc/mounts").read()
