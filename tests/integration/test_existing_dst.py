"""A new clone overwrites all of DST, so a DST that already holds data (SRC and DST swapped,
another disk's file, a previous copy) is refused unless `--overwrite-dst` is given: one line,
exit 1, nothing created, DST untouched. A DST without data (sparse, truncated, fallocated; a
block device without a signature) is taken, and a resumed clone's DST is never looked at."""

import http.server
import os
import socket
import struct
import subprocess
import sys
import threading

import pytest

from fuseclone.trace import read_trace
from tests.integration.conftest import MiB, fuseclone, sh, sha256
from tests.integration.test_identity import make_file

SIZE = 4 * MiB


def write_at(path, offset, data):
    with open(path, "r+b" if os.path.exists(path) else "wb") as f:
        f.seek(offset)
        f.write(data)


def mounted(mnt):
    return f" {os.path.realpath(mnt)} " in open("/proc/mounts").read()


def refused(rig, src, dst, *options):
    """Mount SRC into DST, which must be refused, leaving DST as it was, creating no META and
    mounting nothing; the error line."""
    before = sha256(dst), os.stat(dst).st_mtime_ns
    rig.stack.callback(rig._force_unmount, rig.mnt)
    result = fuseclone("mount", src, dst, rig.meta, rig.mnt, *options, check=False)
    assert result.returncode == 1, f"mount was accepted: {result.stdout}{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--overwrite-dst" in lines[0], result.stderr
    assert (sha256(dst), os.stat(dst).st_mtime_ns) == before
    assert not os.path.exists(rig.meta)
    assert not mounted(rig.mnt)
    return lines[0]


def clone_completes(rig, *options, expected=None):
    """Mount rig.src into rig.dst, wait for the clone to complete, unmount: DST holds EXPECTED
    (SRC's data by default)."""
    rig.mount(*options)
    fuseclone("wait", rig.mnt, "--timeout", "60")
    fuseclone("unmount", rig.mnt)
    assert sha256(rig.dst, SIZE) == (expected or sha256(rig.src))


@pytest.fixture
def source(rig):
    write_at(rig.src, 0, os.urandom(SIZE))
    return rig.src


def test_source_and_destination_swapped_are_refused(rig):
    """The user's source given as DST, the empty file meant as DST given as SRC: a new clone
    overwrote the source with the empty file's zeros, exit 0."""
    real, empty = str(rig.tmp / "a.img"), str(rig.tmp / "c.img")
    write_at(real, 0, os.urandom(SIZE))
    make_file(empty, SIZE)
    line = refused(rig, empty, real)
    assert line == (f"fuseclone: error: {real}: the destination holds data (first at offset 0) "
                    f"and the source {empty} holds no data: are SRC and DST swapped? A new clone "
                    "would overwrite the destination. To overwrite it, add --overwrite-dst")


def test_a_destination_holding_data_is_refused(rig, source):
    make_file(rig.dst, SIZE)
    write_at(rig.dst, 3 * MiB, b"a previous copy")
    line = refused(rig, source, rig.dst)
    assert line == (f"fuseclone: error: {rig.dst}: the destination holds data (first at offset "
                    f"{3 * MiB}): a new clone would overwrite it (are SRC and DST swapped?). To "
                    "overwrite it, add --overwrite-dst")


def test_overwrite_dst_overwrites_it(rig, source):
    write_at(rig.dst, 0, os.urandom(SIZE + MiB))
    clone_completes(rig, "--overwrite-dst")


def test_a_resumed_clone_is_not_looked_at(rig, source):
    rig.mount("--no-hydration")
    write_at(rig.image, MiB, b"written through the image")
    fuseclone("unmount", rig.mnt)
    write_at(rig.src + ".expected", 0, open(rig.src, "rb").read())
    write_at(rig.src + ".expected", MiB, b"written through the image")
    # DST holds data now, and META exists: no option needed
    clone_completes(rig, expected=sha256(rig.src + ".expected"))


def xfs(rig):
    image = rig.tmp / "xfs.img"
    sh("truncate", "-s", "320M", image)
    sh("mkfs.xfs", "-q", image)
    return rig.mount_fs(image, str(rig.tmp / "xfs"), "-o", "loop")


@pytest.mark.parametrize("filesystem", ["ext4", "xfs"])
@pytest.mark.parametrize("made_by", ["truncate", "fallocate", "fallocate-and-holes"])
def test_a_destination_without_data_is_taken(rig, source, filesystem, made_by):
    """Sparse, truncated and fallocated files (unwritten extents) hold no data."""
    rig.dst = os.path.join(rig.ext4() if filesystem == "ext4" else xfs(rig), "dst.img")
    make_file(rig.dst, SIZE)
    if made_by == "fallocate":
        sh("fallocate", "-l", SIZE, rig.dst)
    elif made_by == "fallocate-and-holes":
        sh("fallocate", "-o", MiB, "-l", MiB, rig.dst)
    clone_completes(rig)


# ---- block devices ------------------------------------------------------------------------


def dos_partition_table(path):
    """A DOS (MBR) partition table with one Linux partition, as fdisk writes it."""
    entry = struct.pack("<B3sB3sII", 0, b"\0\x21\0", 0x83, b"\0\0\0", 2048, 4096)
    write_at(path, 446, entry)
    write_at(path, 510, b"\x55\xaa")


SIGNATURES = {
    "ext4": (lambda path: sh("mkfs.ext4", "-q", "-F", path), "a filesystem (ext4)"),
    "swap": (lambda path: sh("mkswap", path), "a signature (swap)"),
    "dos": (dos_partition_table, "a partition table (dos)"),
}


@pytest.mark.parametrize("kind", SIGNATURES)
def test_a_block_device_with_a_signature_is_refused(rig, source, kind):
    backing = str(rig.tmp / "disk.img")
    make_file(backing, SIZE)
    make, what = SIGNATURES[kind]
    make(backing)
    loop = rig.losetup(backing)
    line = refused(rig, source, loop)
    assert f"{loop}: the destination holds {what}: a new clone would overwrite it" in line


def test_a_loop_device_over_a_file_holding_data_is_refused(rig, source):
    """No signature, but the file beneath holds data in the device's span; data before it
    (an offset past a header) does not count."""
    backing = str(rig.tmp / "disk.img")
    write_at(backing, 0, os.urandom(MiB))
    make_file(backing, MiB + SIZE)
    rig.dst = rig.losetup(backing, "--offset", str(MiB))
    clone_completes(rig)
    os.unlink(rig.meta)

    backing = str(rig.tmp / "disk2.img")
    make_file(backing, SIZE)
    write_at(backing, 2 * MiB, b"no signature, but data")
    loop = rig.losetup(backing)
    line = refused(rig, source, loop)
    assert (f"{loop}: the destination holds data (first at offset {2 * MiB}, in its backing "
            f"file {backing})") in line


@pytest.mark.parametrize("where", [0, 3 * MiB, SIZE - 4096])
def test_a_block_device_holding_data_without_a_signature_is_refused(rig, source, where):
    """A device that is no loop device over a file (a disk, a partition; here a loop device
    over another one) holding data in no format libblkid knows (plain dm-crypt, a raw
    database, what `wipefs` leaves): a new clone would overwrite it all, as it would the same
    bytes in a file, which are refused. Its first and last MiB are read (and samples between)."""
    backing = str(rig.tmp / "disk.img")
    make_file(backing, SIZE)
    write_at(backing, where, b"no signature, but data" * 186)
    beneath = rig.losetup(backing)
    loop = rig.losetup(beneath)
    line = refused(rig, source, loop)
    assert f"{loop}: the destination holds data (at offset {where}" in line


def test_a_zeroed_block_device_beneath_another_is_taken(rig, source):
    backing = str(rig.tmp / "disk.img")
    make_file(backing, SIZE)
    rig.dst = rig.losetup(rig.losetup(backing))
    clone_completes(rig)


def test_a_zeroed_block_device_is_taken(rig, source):
    backing = str(rig.tmp / "disk.img")
    make_file(backing, SIZE)
    rig.dst = rig.losetup(backing)
    clone_completes(rig)


# ---- another live clone's image -------------------------------------------------------------


def test_a_live_clones_image_is_refused_as_a_destination(rig, source):
    """Its data is that clone's: refused as a file holding data, and through a loop device."""
    rig.mount()
    fuseclone("wait", rig.mnt, "--timeout", "60")
    before = sha256(rig.image)
    second = rig.tmp / "second"
    second.mkdir()
    for dst in (rig.image, rig.losetup(rig.image)):
        result = fuseclone("mount", rig.src, dst, str(rig.tmp / "second.meta"), second,
                           check=False)
        rig.stack.callback(rig._force_unmount, str(second))
        assert result.returncode == 1 and "holds data" in result.stderr, result.stderr
        assert not mounted(second)
    assert sha256(rig.image) == before


# ---- the access trace a mount records ---------------------------------------------------------


def test_an_access_trace_is_not_recorded_over_a_file_holding_other_data(rig, source):
    """--record-access empties its file: a mistyped path emptied the user's file."""
    precious = str(rig.tmp / "notes.txt")
    write_at(precious, 0, b"the user's own file\n")
    rig.stack.callback(rig._force_unmount, rig.mnt)
    result = fuseclone("mount", source, rig.dst, rig.meta, rig.mnt, "--record-access", precious,
                       check=False)
    assert result.returncode == 1 and result.stderr.strip() == (
        f"fuseclone: error: {precious}: holds data (first at offset 0) that is not an access "
        "trace: recording one there would overwrite it; name another file, or remove it")
    assert open(precious, "rb").read() == b"the user's own file\n"
    assert not os.path.exists(rig.meta) and not os.path.exists(rig.dst)
    assert not mounted(rig.mnt)



def test_an_earlier_access_trace_is_not_recorded_over(rig, source):
    """A second mount recording to the same trace emptied it: a remount of a clone records
    only what it still reads from the source (nothing, here), so the user's trace of the first
    mount was lost. Refused in one line, the trace as it was; an empty file is taken."""
    trace = str(rig.tmp / "vm.trace")
    write_at(trace, 0, b"")
    rig.mount("--record-access", trace, "--no-hydration")  # the read goes to the source
    with open(rig.image, "rb") as image:
        image.read(MiB)
    fuseclone("unmount", rig.mnt)
    recorded = open(trace).read()
    assert read_trace(trace).records and read_trace(trace).complete, recorded
    result = fuseclone("mount", source, rig.dst, rig.meta, rig.mnt, "--record-access", trace,
                       check=False)
    assert result.returncode == 1 and result.stderr.strip() == (
        f"fuseclone: error: {trace}: holds an access trace already: recording would overwrite "
        "it; name another file, or remove it first")
    assert open(trace).read() == recorded
    assert not mounted(rig.mnt)


class _GatedImageHandler(http.server.BaseHTTPRequestHandler):
    """A web server for `server.data` whose first HEAD answers only once `server.release` is
    set (the others at once)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        if not self.server.asked.is_set():
            self.server.asked.set()
            self.server.release.wait(60)
        self._headers(200, len(self.server.data))

    def do_GET(self):
        first, last = (int(x) for x in self.headers["Range"].split("=")[1].split("-"))
        last = min(last, len(self.server.data) - 1)
        self._headers(206, last - first + 1, f"bytes {first}-{last}/{len(self.server.data)}")
        self.wfile.write(self.server.data[first:last + 1])

    def _headers(self, status, length, content_range=None):
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", '"v1"')
        if content_range:
            self.send_header("Content-Range", content_range)
        self.end_headers()


def test_a_failed_mount_removes_only_what_it_created(rig):
    """A mount decided at its start whether it would create META, DST and its trace, and
    removed them when it failed: one whose source was slow to answer found none of them then;
    meanwhile another mount created the clone, the user wrote to it, and it recorded a trace.
    The slow mount resumed that clone, refused to record over that trace, then removed the
    trace, META and DST: the user's writes and trace were lost."""
    trace = str(rig.tmp / "vm.trace")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GatedImageHandler)
    server.data, server.asked, server.release = os.urandom(SIZE), threading.Event(), threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rig.stack.callback(server.shutdown)
    rig.stack.callback(server.release.set)
    url = f"http://127.0.0.1:{server.server_address[1]}/image.raw"
    rig.stack.callback(rig._force_unmount, rig.mnt)
    slow = subprocess.Popen(
        [sys.executable, "-m", "fuseclone", "mount", url, rig.dst, rig.meta, rig.mnt,
         "--record-access", trace],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rig.stack.callback(slow.kill)
    assert server.asked.wait(60), "the slow mount never asked its source"
    rig.mount("--record-access", trace, "--no-hydration", src=url)
    with open(rig.image, "r+b") as image:
        image.read(MiB)
        image.write(b"the user's writes")
    fuseclone("unmount", rig.mnt)
    recorded = open(trace).read()
    server.release.set()
    _, stderr = slow.communicate(timeout=120)
    assert slow.returncode == 1 and "holds an access trace already" in stderr, stderr
    assert open(trace).read() == recorded
    assert not mounted(rig.mnt)
    rig.mount("--no-hydration", src=url)
    with open(rig.image, "rb") as image:
        assert image.read(MiB + 17) == server.data[:MiB] + b"the user's writes"


def test_a_failed_mount_leaves_an_empty_trace_empty(rig, source):
    """An empty file is taken as the trace; a mount that failed after it began recording (its
    metrics port in use) left its header and `end` line there, and the next mount refused the
    file as holding a trace already."""
    trace = str(rig.tmp / "vm.trace")
    write_at(trace, 0, b"")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 47400))
        busy.listen()
        rig.stack.callback(rig._force_unmount, rig.mnt)
        result = fuseclone("mount", source, rig.dst, rig.meta, rig.mnt, "--record-access", trace,
                           "--metrics-listen", "127.0.0.1:47400", check=False)
    assert result.returncode == 1, result.stderr
    assert open(trace, "rb").read() == b""
    rig.mount("--record-access", trace)


def test_a_destination_file_beneath_a_mounted_loop_device_is_refused(rig, source):
    """Overwriting it (--overwrite-dst) writes under a live filesystem's feet, as it would
    through a block device DST that is mounted, which the kernel refuses (EBUSY to its
    exclusive open); mkfs -F refuses such a file too. Attached and unused, it is taken."""
    sh("truncate", "-s", str(SIZE), rig.dst)
    sh("mkfs.ext4", "-q", rig.dst)
    loop = rig.losetup(rig.dst)
    rig.mount_fs(loop, str(rig.tmp / "fs"))
    before = sha256(rig.dst)
    rig.stack.callback(rig._force_unmount, rig.mnt)
    result = fuseclone("mount", source, rig.dst, rig.meta, rig.mnt, "--overwrite-dst",
                       check=False)
    assert result.returncode == 1, f"mount was accepted: {result.stdout}"
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"it is the backing file of {loop}, which is mounted or held" in result.stderr
    assert sha256(rig.dst) == before and not os.path.exists(rig.meta)
    sh("umount", str(rig.tmp / "fs"))
    clone_completes(rig, "--overwrite-dst")


def test_a_clone_is_not_resumed_into_a_destination_mounted_meanwhile(rig):
    """Its DST, mounted by itself between two mounts of the clone (`mount -o loop`): the
    resumed clone would write beneath that filesystem."""
    sh("mkfs.ext4", "-q", "-F", rig.src, str(SIZE // 1024))
    rig.mount()
    fuseclone("wait", rig.mnt, "--timeout", "60")
    fuseclone("unmount", rig.mnt)
    rig.mount_fs(rig.dst, str(rig.tmp / "fs"), "-o", "loop,ro,noload")
    result = fuseclone("mount", rig.src, rig.dst, rig.meta, rig.mnt, check=False)
    assert result.returncode == 1, result.stdout
    assert "which is mounted or held" in result.stderr and result.stderr.count("\n") == 1
    assert not mounted(rig.mnt)
