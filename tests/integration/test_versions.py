"""Other versions of fuseclone and its packages: daemons of an earlier release answering this
one's commands (the package upgraded while clones stay mounted), METAs of a later one, the
packages changed under a running mount (pip upgrading them while clones live for days)."""

import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import h11
import pytest

from tests.integration.conftest import fuseclone, sh, sha256, status_json
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


# The last release whose daemon takes no "mountpoint" in an unmount request.
BEFORE_UNMOUNT_MOUNTPOINT = "89d44a5"
# A release of format-1 METAs, whose daemon listens at a socket named by META's path.
FORMAT_1_RELEASE = "a393477"


def earlier_release(commit: str, where) -> str:
    """The fuseclone package of COMMIT (this repository's history) in a directory of WHERE, to
    run with `python -m fuseclone` from there; skips without the history (a tarball)."""
    tree = where / f"fuseclone-{commit}"
    tree.mkdir()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    archive = subprocess.run(["git", "-C", repo, "archive", commit, "fuseclone"],
                             capture_output=True)
    if archive.returncode:
        pytest.skip(f"no release {commit} in this repository's history")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return str(tree)


def mount_with(rig, release: str, *options) -> None:
    """Mount RIG's clone with the fuseclone of RELEASE (a package directory)."""
    sh(sys.executable, "-m", "fuseclone", "mount", rig.src, rig.dst, rig.meta, rig.mnt, *options,
       cwd=release)
    rig.stack.callback(rig._force_unmount, rig.mnt)


@pytest.mark.parametrize("lazy", [False, True])
def test_unmount_of_a_mount_of_an_earlier_release(rig, random_source, lazy):
    """After an upgrade of the package, `unmount` of a clone still served by a daemon of a
    release before the unmount request's "mountpoint" field was refused by that daemon
    ('unmount takes no field "mountpoint"'), lazy or not: no clone mounted before the upgrade
    could be unmounted by the new command."""
    release = earlier_release(BEFORE_UNMOUNT_MOUNTPOINT, rig.tmp)
    mount_with(rig, release, "--no-hydration")
    with open(rig.image, "r+b") as image:
        image.write(b"written before the upgrade")
        os.fsync(image.fileno())
    fuseclone("unmount", rig.mnt, *(["--lazy"] if lazy else []))
    rig.wait_unmounted()
    assert status_json(rig.meta)["clean"] is True
    with open(rig.dst, "rb") as dst:
        assert dst.read(26) == b"written before the upgrade"


def later_release(where) -> str:
    """This package with a status field it does not have yet, as a later release's daemon
    sends it; a directory to run `python -m fuseclone` from."""
    package = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "fuseclone")
    tree = where / "fuseclone-later"
    shutil.copytree(package, tree / "fuseclone", ignore=shutil.ignore_patterns("__pycache__"))
    status_py = tree / "fuseclone" / "status.py"
    last_field = "    fetched: dict = field(default_factory=dict)\n"
    text = status_py.read_text()
    assert last_field in text
    status_py.write_text(text.replace(last_field, last_field + "    of_a_later_release: int = 1\n"))
    return str(tree)


def test_commands_to_a_mount_of_a_later_release(rig, random_source):
    """After a downgrade of the package, every command that reads a live status (status, list,
    metrics, wait, unmount) of a clone still served by a later release's daemon failed with a
    traceback (TypeError: an unexpected keyword argument) at the first field it did not know."""
    mount_with(rig, later_release(rig.tmp), "--no-hydration")
    assert status_json(rig.mnt)["hydrated_regions"] == 0
    assert fuseclone("status", rig.mnt).stdout
    assert os.path.realpath(rig.mnt) in fuseclone("list").stdout
    assert "fuseclone_up" in fuseclone("metrics").stdout
    assert fuseclone("wait", rig.mnt, "--timeout", "0.1", check=False).returncode == 1
    fuseclone("unmount", rig.mnt)
    assert status_json(rig.meta)["clean"] is True


def test_commands_to_a_mount_of_a_format_1_release(rig, random_source):
    """After an upgrade of the package, a clone still served by a daemon of a release before
    sockets were named by META's identity was out of every command's reach: status said 'in
    use by another fuseclone process', message and unmount that it did not answer (and offered
    a lazy detach); list showed 'no control socket'."""
    mount_with(rig, earlier_release(FORMAT_1_RELEASE, rig.tmp), "--no-hydration")
    with open(rig.image, "r+b") as image:
        image.write(b"written before the upgrade")
        os.fsync(image.fileno())
    assert status_json(rig.mnt)["live"] is True
    fuseclone("message", rig.mnt, "enable_hydration")
    row = next(line for line in fuseclone("list").stdout.splitlines()
               if line.startswith(os.path.realpath(rig.mnt) + " "))
    assert "no control socket" not in row
    fuseclone("unmount", rig.mnt)
    assert os.path.realpath(rig.mnt) not in open("/proc/mounts").read()
    assert status_json(rig.meta)["clean"] is True
    with open(rig.dst, "rb") as dst:
        assert dst.read(26) == b"written before the upgrade"


def test_unmount_of_a_killed_daemon_of_a_format_1_release(rig, random_source):
    """Its socket left behind at the earlier name: the stale mount is cleaned, as one of this
    release's (`unmount` said the mount did not answer, and `list` 'no control socket')."""
    mount_with(rig, earlier_release(FORMAT_1_RELEASE, rig.tmp), "--no-hydration")
    pid = int(sh("pgrep", "-f", f"fuseclone mount .*{rig.meta}").stdout.split()[0])
    os.kill(pid, signal.SIGKILL)
    while os.path.exists(f"/proc/{pid}"):
        time.sleep(0.01)  # no event to await: a killed process is reaped by init
    row = next(line for line in fuseclone("list").stdout.splitlines()
               if line.startswith(os.path.realpath(rig.mnt) + " "))
    assert "daemon gone (killed)" in row
    result = fuseclone("unmount", rig.mnt)
    assert result.stderr.endswith(f"fuseclone: cleaned a stale mount at {rig.mnt}\n")
    assert os.path.realpath(rig.mnt) not in open("/proc/mounts").read()


def test_a_live_format_1_clones_files_are_no_files_of_a_new_mount(rig, random_source):
    """A daemon of a format-1 release claims neither its DST nor its SRC (no flock): after an
    upgrade of the package, a new clone took the live clone's DST as its own DST, or as the
    access trace it truncates, or its SRC as its DST, and wrote into the live clone's data."""
    mount_with(rig, earlier_release(FORMAT_1_RELEASE, rig.tmp), "--no-hydration")
    with open(rig.image, "r+b") as image:
        image.write(b"the live clone's data")
        os.fsync(image.fileno())
    before = sha256(rig.dst), sha256(rig.src)
    other = rig.tmp / "other"
    other.mkdir()
    (other / "mnt").mkdir()
    rig.stack.callback(rig._force_unmount, str(other / "mnt"))  # were it mounted
    new_dst, new_meta = str(other / "dst.img"), str(other / "clone.meta")
    for options, dst, role, what, path in (
            ([], rig.dst, "destination", "destination", rig.dst),
            (["--record-access", rig.dst], new_dst, "access trace", "destination", rig.dst),
            ([], rig.src, "destination", "source", rig.src)):
        result = fuseclone("mount", new_source(other), dst, new_meta, str(other / "mnt"),
                           "--no-hydration", *options, check=False)
        assert (result.returncode, result.stderr) == (1, (
            f"fuseclone: error: {path}: the {what} of the live clone at "
            f"{os.path.realpath(rig.mnt)} (mounted by an earlier fuseclone release) cannot be "
            f"this mount's {role}\n"))
        assert not os.path.exists(new_meta) and not os.path.exists(new_dst)
    assert (sha256(rig.dst), sha256(rig.src)) == before


def new_source(where) -> str:
    from tests.engine.conftest import make_source_file

    path = str(where / "src.img")
    if not os.path.exists(path):
        make_source_file(path, os.path.getsize(str(where.parent / "src.img")), seed=5)
    return path
