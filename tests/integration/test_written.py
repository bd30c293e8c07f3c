"""Changed-block tracking through the real CLI: a clone users wrote to passes `check --verify`,
a corrupt never-written region fails it, and `diff` lists exactly what was written."""

import json

from tests.integration.conftest import MiB, fuseclone, sh, status_json

KiB = 1 << 10
CHUNK = 64 * KiB  # the written granularity at the default 4 KiB regions
# (offset, length) written with dd through the loop device, and the chunks they make.
PATTERN = [(5 * MiB + 4 * KiB, 4 * KiB), (10 * MiB, 128 * KiB), (20 * MiB - 4 * KiB, 64 * KiB)]
EXTENTS = [(5 * MiB, CHUNK), (10 * MiB, 2 * CHUNK), (20 * MiB - CHUNK, 2 * CHUNK)]
WRITTEN_REGIONS = 5 * CHUNK // 4096


def dd(device, offset, length):
    sh("dd", "if=/dev/urandom", f"of={device}", "bs=4096", f"seek={offset // 4096}",
       f"count={length // 4096}", "oflag=direct", "conv=fsync,notrunc", "status=none")


def test_verify_passes_on_a_written_clone_and_diff_lists_its_writes(rig, random_source):
    rig.mount()
    loop = rig.losetup(None, "--direct-io=on")
    for offset, length in PATTERN:
        dd(loop, offset, length)
    fuseclone("wait", rig.mnt, "--timeout", "120")
    st = status_json(rig.mnt)
    assert (st["written_regions"], st["written_bytes"]) == (WRITTEN_REGIONS, 5 * CHUNK)
    live = fuseclone("diff", rig.meta, check=False)
    assert live.returncode == 1 and "in use by a live mount" in live.stderr
    sh("losetup", "-d", loop)
    fuseclone("unmount", rig.mnt)

    verify = fuseclone("check", rig.meta, "--src", rig.src, "--dst", rig.dst, "--verify", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert f"{WRITTEN_REGIONS} regions written by users, not compared" in verify.stdout
    assert " 0 differ" in verify.stdout

    doc = json.loads(fuseclone("diff", rig.meta, "--json").stdout)
    assert [(e["offset"], e["length"]) for e in doc["extents"]] == EXTENTS
    assert (doc["granularity"], doc["image_size"], doc["written_bytes"]) == (CHUNK, 32 * MiB, 5 * CHUNK)
    human = fuseclone("diff", rig.meta).stdout
    assert f"{5 * CHUNK} bytes written in 3 extents" in human

    with open(rig.dst, "r+b") as f:  # a never-written region goes bad
        f.seek(MiB + 10)
        f.write(b"corrupt!")
    verify = fuseclone("check", rig.meta, "--src", rig.src, "--dst", rig.dst, "--verify", check=False)
    assert verify.returncode == 1
    assert "region 256 (offset 1048576) differs" in verify.stdout and " 1 differ" in verify.stdout
