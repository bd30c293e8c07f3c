"""Changed-block tracking through the real CLI: a clone users wrote to passes `check --verify`,
a corrupt never-written region fails it, and `diff` lists every chunk written, and no more than
the MiB around each write, or a doubled window past a sequential one (markahead)."""

import json

from tests.integration.conftest import MiB, fuseclone, sh, status_json

KiB = 1 << 10
CHUNK = 64 * KiB  # the written granularity at the default 4 KiB regions
# (offset, length) written with dd through the loop device, and the chunks they make.
PATTERN = [(5 * MiB + 4 * KiB, 4 * KiB), (10 * MiB, 128 * KiB), (20 * MiB - 4 * KiB, 64 * KiB)]
EXTENTS = [(5 * MiB, CHUNK), (10 * MiB, 2 * CHUNK), (20 * MiB - CHUNK, 2 * CHUNK)]
# A write to unhydrated regions marks its own chunks; one to hydrated regions (hydration runs
# meanwhile) waits for a META commit that also marks the MiB around it. dd writes 4 KiB at a
# time: the last pattern's writes cross into 20 MiB as a sequential stream, whose next window
# doubles (markahead: [19, 20) then [20, 22) MiB), if those regions are hydrated by then.
AROUND = [(5 * MiB, MiB), (10 * MiB, MiB), (19 * MiB, 3 * MiB)]


def within(extents, bounds):
    """Whether every extent lies inside one of `bounds` (all (offset, length))."""
    return all(any(lo <= o and o + n <= lo + m for lo, m in bounds) for o, n in extents)


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
    assert 5 * CHUNK <= st["written_bytes"] <= sum(length for _, length in AROUND)
    assert st["written_regions"] == st["written_bytes"] // 4096
    for command in ("diff", "check"):  # both read META offline, and say so alike
        live = fuseclone(command, rig.meta, check=False)
        assert live.returncode == 1 and "in use by a live mount: unmount it first" in live.stderr
    sh("losetup", "-d", loop)
    fuseclone("unmount", rig.mnt)

    verify = fuseclone("check", rig.meta, "--src", rig.src, "--dst", rig.dst, "--verify", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert f"{st['written_regions']} regions written by users, not compared" in verify.stdout
    assert " 0 differ" in verify.stdout

    doc = json.loads(fuseclone("diff", rig.meta, "--json").stdout)
    listed = [(e["offset"], e["length"]) for e in doc["extents"]]
    assert within(EXTENTS, listed) and within(listed, AROUND)
    assert (doc["granularity"], doc["image_size"], doc["written_bytes"]) == (CHUNK, 32 * MiB, st["written_bytes"])
    human = fuseclone("diff", rig.meta).stdout
    assert f"{st['written_bytes']} bytes written in {len(listed)} extents" in human

    with open(rig.dst, "r+b") as f:  # a never-written region goes bad
        f.seek(MiB + 10)
        f.write(b"corrupt!")
    verify = fuseclone("check", rig.meta, "--src", rig.src, "--dst", rig.dst, "--verify", check=False)
    assert verify.returncode == 1
    assert "region 256 (offset 1048576) differs" in verify.stdout and " 1 differ" in verify.stdout


def test_a_sequential_writer_into_a_hydrated_clone_waits_for_few_written_commits(rig, random_source):
    """dd bs=64k into a fresh hydrated clone: the write-ahead marks a window that doubles ahead
    of the writer (1, 2, 4, 8, 16 MiB), not one META commit per 64 KiB chunk (512 for 32 MiB)."""
    rig.mount()
    fuseclone("wait", rig.mnt, "--timeout", "120")
    loop = rig.losetup(None, "--direct-io=on")
    sh("dd", "if=/dev/zero", f"of={loop}", "bs=64k", "count=512", "oflag=direct", "status=none")
    st = status_json(rig.mnt)
    assert st["written_bytes"] == 32 * MiB
    assert 1 <= st["written_commits"] <= 6
    sh("losetup", "-d", loop)
