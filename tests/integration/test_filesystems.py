"""What the filesystems DST and META live on, and images of extreme sizes, can do to a clone."""

import errno
import http.server
import mmap
import os
import stat
import threading
import time

import pytest

from fuseclone.metadata import BLOCK, Header, _file_blocks, written_granularity
from fuseclone.regions import Geometry
from tests.engine.conftest import make_source_file
from tests.integration.conftest import MiB, fuseclone, sh, status_json
from tests.integration.test_metadata_failure import fill, small_tmpfs
from tests.sources.conftest import nbdkit  # noqa: F401  (a fixture)

LARGEST_FILE = 2**63 - 1  # Linux's MAX_LFS_FILESIZE: nbdkit's and tmpfs's largest size


def test_an_image_whose_bitmaps_cannot_fit_in_memory_is_refused_with_one_line(rig, nbdkit):  # noqa: F811
    """2^63-1 bytes in 4 KiB regions is 2^51 regions: 256 TiB of bitmap. The mount died with a
    MemoryError traceback in its log ("see the log"); now it says why, before creating anything."""
    server = nbdkit("null", f"size={LARGEST_FILE}")
    room = small_tmpfs(rig, "room", "16M")  # tmpfs takes a DST of 2^63-1 bytes (ext4: EFBIG)
    dst, meta = str(room / "dst.img"), str(room / "clone.meta")
    result = fuseclone("mount", server.url(), dst, meta, rig.mnt, check=False)
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "\n" not in line and "memory" in line and "--region-size" in line, line
    assert os.listdir(room) == []
    assert rig.mnt not in open("/proc/mounts").read()


def test_a_meta_whose_bitmaps_cannot_fit_in_memory_is_refused_with_one_line(rig):
    """A META made where memory was plentiful (here: its header alone, on a sparse file) gets
    one line from every command that loads its bitmaps, not a MemoryError traceback."""
    room = small_tmpfs(rig, "room", "16M")
    meta = str(room / "clone.meta")
    geometry = Geometry(LARGEST_FILE, 4096)
    header = Header(seq=1, region_size=4096, source_size=LARGEST_FILE,
                    nr_regions=geometry.nr_regions, flags=0, features=0, hydration_threshold=1,
                    hydration_batch_size=1, uuid=os.urandom(16),
                    written_granularity=written_granularity(4096))
    with open(meta, "wb") as f:
        f.truncate(_file_blocks(header) * BLOCK)  # sparse: empty slots read as zeros
        f.write(header.pack())
    for command in (["check", meta], ["diff", meta], ["status", meta]):
        result = fuseclone(*command, check=False)
        assert result.returncode == 1, command
        line = result.stderr.strip()
        assert "\n" not in line and "memory" in line and "--region-size" in line, (command, line)


def test_a_lost_writeback_of_dst_fails_the_next_fsync(rig):
    """sync_file_range(WAIT), which hydration uses to pace its copies, reports a writeback error
    of any part of DST, and the kernel reports each error once per open file: the next
    fdatasync on that descriptor succeeded, so a user's fsync said a write was durable that
    the kernel had dropped (and a commit could mark regions whose copy was lost). Here DST is
    a loop device over a tmpfs that runs out of room, as a thin-provisioned volume does."""
    make_source_file(rig.src, 8 * MiB, seed=5)
    room = small_tmpfs(rig, "room", "4M")
    backing = room / "dst.raw"
    backing.write_bytes(b"")
    os.truncate(backing, 8 * MiB)  # sparse: DST's blocks need room in the tmpfs when written
    rig.dst = rig.losetup(str(backing))
    rig.mount("--no-hydration", "--write-cache", "0")
    sh("fallocate", "--punch-hole", "--offset", 4 * MiB, "--length", MiB, rig.image)
    fd = os.open(rig.image, os.O_RDWR)
    try:
        os.fsync(fd)  # those regions are hydrated now, as holes in DST
        filler = fill(room)
        os.pwrite(fd, b"written by a user", 4 * MiB + 1)  # buffered into DST: acknowledged
        # The kernel writes DST back (its flusher would, within 30 s): no room, the data is lost.
        device = os.open(rig.dst, os.O_RDONLY)
        try:
            with pytest.raises(OSError):
                os.fsync(device)
        finally:
            os.close(device)
        # A partial write into unhydrated regions: stored whole with the source's data around
        # it (buffered, like the user's write: acknowledged, its writeback error comes later).
        os.pwrite(fd, b"x", 1)
        os.unlink(filler)  # room again: nothing fails any more
        with pytest.raises(OSError) as lost:
            os.fsync(fd)
        assert lost.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert status_json(rig.mnt)["metadata_mode"] == "fail"


@pytest.mark.parametrize("attribute, reason", [("+i", "immutable"), ("+a", "append-only")])
def test_a_dst_or_meta_with_an_attribute_that_forbids_writes_says_so(rig, random_source,
                                                                     attribute, reason):
    """chattr +i / +a make open(O_RDWR) fail with EPERM even for root: the line said
    "permission denied", and root, who may write anything, had nothing to go on."""
    for path in (rig.dst, rig.meta):
        with open(path, "wb") as f:
            f.truncate(32 * MiB if path == rig.dst else 0)
    for path, other in ((rig.dst, rig.meta), (rig.meta, rig.dst)):
        sh("chattr", attribute, path)
        try:
            result = fuseclone("mount", rig.src, rig.dst, rig.meta, rig.mnt, check=False)
        finally:
            sh("chattr", attribute.replace("+", "-"), path)
        assert result.returncode == 1
        line = result.stderr.strip()
        assert "\n" not in line and path in line and reason in line and "chattr" in line, line
        assert os.path.getsize(rig.meta) == 0  # nothing changed


def test_a_device_node_on_a_filesystem_mounted_nodev_says_so(rig, random_source):
    """A block device's node on a nodev filesystem cannot be opened (EACCES, for root too)."""
    backing = rig.tmp / "dev.raw"
    backing.write_bytes(b"")
    os.truncate(backing, 32 * MiB)
    loop = rig.losetup(str(backing))
    nodev = rig.tmp / "devices"  # a name without "nodev" in it
    nodev.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "nodev,size=1M", "tmpfs", nodev)
    rig.stack.callback(lambda: sh("umount", "-l", nodev, check=False))
    node = str(nodev / "disk")
    os.mknod(node, 0o600 | stat.S_IFBLK, os.stat(loop).st_rdev)
    for src, dst in ((rig.src, node), (node, rig.dst)):
        result = fuseclone("mount", src, dst, rig.meta, rig.mnt, check=False)
        assert result.returncode == 1
        line = result.stderr.strip()
        assert "\n" not in line and node in line and "nodev" in line, line
        assert not os.path.exists(rig.meta)


def test_after_dst_lost_copies_the_mount_reads_them_from_the_source_again(rig):
    """DST on a volume that runs out of room under hydration (a thin pool): copies land in
    DST's page cache, their writeback fails, and the commit's fdatasync puts META in fail mode.
    Their bits stayed set in core, so once DST's pages left the cache the image read zeros
    there, data that is neither the source's nor a user's, until the next mount."""
    make_source_file(rig.src, 32 * MiB, seed=9, zero_every=0, hole_every=0)
    room = small_tmpfs(rig, "room", "8M")
    backing = room / "dst.raw"
    backing.write_bytes(b"")
    os.truncate(backing, 32 * MiB)
    rig.dst = rig.losetup(str(backing))
    rig.mount()
    deadline = time.monotonic() + 60
    while status_json(rig.mnt)["metadata_mode"] != "fail":
        assert time.monotonic() < deadline, "no fail mode"
        time.sleep(0.1)
    device = os.open(rig.dst, os.O_RDONLY)
    try:
        os.posix_fadvise(device, 0, 0, os.POSIX_FADV_DONTNEED)  # as memory pressure would
    finally:
        os.close(device)
    fd = os.open(rig.image, os.O_RDONLY | os.O_DIRECT)
    buffer = mmap.mmap(-1, MiB)
    try:
        with open(rig.src, "rb") as src:
            for offset in range(0, 32 * MiB, MiB):
                os.preadv(fd, [buffer], offset)
                assert buffer[:] == src.read(MiB), f"MiB at {offset >> 20} differs from the source"
    finally:
        os.close(fd)
        buffer.close()


class _HugeImageHandler(http.server.BaseHTTPRequestHandler):
    """A web server that claims an image of `server.size` bytes (and serves "y"s)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", str(self.server.size))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", '"v1"')
        self.end_headers()

    def do_GET(self):
        first, last = (int(x) for x in self.headers["Range"].split("=")[1].split("-"))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{last}/{self.server.size}")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        self.wfile.write(b"y" * (last - first + 1))


@pytest.mark.parametrize("size", [LARGEST_FILE + 1, 2**64 - 1])
def test_a_source_larger_than_linux_files_go_is_refused_with_one_line(rig, size):
    """Past 2^63-1 bytes no file (DST, the image) can be that large: creating DST died with an
    OverflowError traceback in the log, and left an empty DST behind."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HugeImageHandler)
    server.size = size
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rig.stack.callback(server.shutdown)
    room = small_tmpfs(rig, "room", "16M")
    url = f"http://127.0.0.1:{server.server_address[1]}/image.raw"
    result = fuseclone("mount", url, str(room / "dst.img"), str(room / "clone.meta"), rig.mnt,
                       "--region-size", "1G", check=False)
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "\n" not in line and str(size) in line and "2^63-1" in line, line
    assert os.listdir(room) == []
