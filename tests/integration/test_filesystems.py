"""What the filesystems DST and META live on, and images of extreme sizes, can do to a clone."""

import os

from fuseclone.metadata import BLOCK, Header, _file_blocks, written_granularity
from fuseclone.regions import Geometry
from tests.integration.conftest import fuseclone
from tests.integration.test_metadata_failure import small_tmpfs
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
