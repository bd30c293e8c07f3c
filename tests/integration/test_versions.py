"""Other versions of fuseclone and its packages: the packages changed under a running mount (pip
upgrading them while clones live for days)."""

import os
import shutil
import struct
import zlib

import h11
import pytest

from tests.integration.conftest import fuseclone, sha256, status_json
from tests.integration.test_operating import free_port, scrape


def test_a_scrape_after_h11_was_replaced_under_the_mount_is_answered(rig, random_source,
                                                                      monkeypatch):
    """The metrics endpoint imported h11 at its first scrape: with the package replaced under a
    running mount by then (pip upgrading it: removed, then written again), the import failed
    and took the whole mount down with it."""
    shadow = rig.tmp / "site"
    shutil.copytree(os.path.dirname(h11.__file__), shadow / "h11")
    port = free_port()
    monkeypatch.setenv("PYTHONPATH", str(shadow))  # the daemon's h11 is this copy
    rig.mount("--no-hydration", "--metrics-listen", f"127.0.0.1:{port}")
    monkeypatch.delenv("PYTHONPATH")
    (shadow / "h11" / "__init__.py").write_text('raise ImportError("h11 half installed")\n')
    assert "fuseclone_up" in scrape(port)
    assert status_json(rig.mnt)["hydrated_regions"] == 0


def rewrite_headers(meta: str, change) -> None:
    """Apply CHANGE(header bytearray) to both header slots of META, CRCs made right again."""
    with open(meta, "r+b") as f:
        for slot in (0, 1):
            f.seek(slot * 4096)
            header = bytearray(f.read(4096))
            change(header)
            struct.pack_into("<I", header, 4092, zlib.crc32(bytes(header[:4092])))
            f.seek(slot * 4096)
            f.write(header)


@pytest.mark.parametrize("field, offset, bit", [("flags", 44, 1 << 7),
                                                ("features", 48, 1 << 9)])
def test_a_meta_with_header_bits_of_a_later_release_is_refused(rig, random_source, field, offset,
                                                               bit):
    """A later release that gives a new meaning to a header flag or feature bit must be able to
    count on this one refusing its META: it mounted it, read the clone without that meaning
    and rewrote the features whole (the bit gone) at its first message or unmount."""
    rig.mount("--no-hydration")
    fuseclone("unmount", rig.mnt)
    rewrite_headers(rig.meta, lambda header: struct.pack_into(
        "<I", header, offset, struct.unpack_from("<I", header, offset)[0] | bit))
    before = sha256(rig.meta), sha256(rig.dst)
    for command in (["mount", rig.src, rig.dst, rig.meta, rig.mnt], ["status", rig.meta],
                    ["check", rig.meta]):
        result = fuseclone(*command, check=False)
        assert result.returncode == 1, result
        assert result.stderr == (f"fuseclone: error: {rig.meta}: metadata header {field} "
                                 f"0x{bit:x} unknown to this release (written by a later "
                                 "fuseclone?): use that release or a later one\n")
    assert os.path.realpath(rig.mnt) not in open("/proc/mounts").read()
    assert (sha256(rig.meta), sha256(rig.dst)) == before
