"""CLI commands that need no live mount: exit codes and messages."""

import json
import os
import struct
import subprocess
import sys
import zlib

import pytest
import trio
from click.testing import CliRunner

from fuseclone.cli import main, parse_size
from fuseclone.clone import running


@pytest.mark.parametrize("text,value", [("4096", 4096), ("4K", 4096), ("64KiB", 65536),
                                        ("1M", 1 << 20), ("1MB", 1 << 20), ("10M/s", 10 << 20),
                                        ("2g", 2 << 30)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "4X", "-1", "1.5M", "K"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


def invoke(*args):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def half_clone(clone):
    """A clone with some regions written and hydration off, cleanly closed."""

    async def make():
        engine = await clone.open(hydration=False, copy_on_read=False)
        async with running(engine):
            await engine.write(0, b"q" * 4096 * 10)

    trio.run(make)
    return clone


@pytest.fixture
def full_clone(clone):
    async def make():
        engine = await clone.open()
        async with running(engine):
            await engine.complete.wait()

    trio.run(make)
    return clone


def test_status_offline_json_and_dmsetup(half_clone):
    result = invoke("status", half_clone.meta, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    for key in ("hydrated_regions", "total_regions", "hydrating_regions", "region_size",
                "hydration_enabled", "metadata_mode", "bytes_per_second", "eta_seconds"):
        assert key in doc
    assert doc["hydrated_regions"] == 10 and doc["live"] is False and doc["metadata_mode"] == "ro"
    result = invoke("status", half_clone.meta, "--dmsetup")
    assert result.exit_code == 0
    fields = result.output.split()
    assert fields[0] == "8" and fields[2] == "8" and fields[3] == f"10/{doc['total_regions']}"
    used, total = map(int, fields[1].split("/"))  # META's 4 KiB blocks: header and bitmap slots
    assert 2 <= used < total and (used, total) == (doc["metadata_used_blocks"], doc["metadata_total_blocks"])
    assert "no_hydration" in fields and fields[-1] == "ro"


@pytest.mark.parametrize("options", [("--json", "--dmsetup"), ("--watch", "--json"),
                                     ("-w", "--dmsetup", "--json")])
def test_status_refuses_forms_that_do_not_go_together(half_clone, options):
    """Each is one form of the output: the one not printed was ignored (--watch won over
    --json, --json over --dmsetup), and a script got another shape than it asked for."""
    result = invoke("status", half_clone.meta, *options)
    assert result.exit_code == 1
    assert result.output.endswith("do not go together: choose one\n")
    assert len(result.output.splitlines()) == 1


def test_status_human(half_clone):
    result = invoke("status", half_clone.meta)
    assert result.exit_code == 0
    assert "10/" in result.output and "hydrated" in result.output and "(not mounted)" in result.output


def test_status_human_on_an_ascii_terminal_escapes_what_it_cannot_show(half_clone, tmp_path):
    meta = tmp_path / "m\u00e9t\u00e4.meta"
    os.rename(half_clone.meta, meta)
    result = subprocess.run([sys.executable, "-m", "fuseclone", "status", str(meta)],
                            capture_output=True, env={**os.environ, "PYTHONIOENCODING": "ascii", "COLUMNS": "500"})  # the whole path
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr
    assert b"\\xe9" in result.stdout and b"10/" in result.stdout  # the path, escaped


def test_status_of_nothing(tmp_path):
    result = invoke("status", str(tmp_path / "nope"))
    assert result.exit_code == 1
    assert result.output.strip() == f"fuseclone: error: {tmp_path / 'nope'}: no such mountpoint or metadata file"


def test_status_of_a_non_metadata_file(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 10000)
    result = invoke("status", str(tmp_path / "f"))
    assert result.exit_code == 1 and "not a fuseclone metadata file" in result.output


def test_message_without_mount(half_clone):
    result = invoke("message", half_clone.meta, "enable_hydration")
    assert result.exit_code == 1 and "no live mount" in result.output


def test_wait_incomplete_and_unmounted(half_clone):
    result = invoke("wait", half_clone.meta, "--timeout", "1")
    assert result.exit_code == 1 and "no mount is hydrating it" in result.output


def test_wait_complete(full_clone):
    assert invoke("wait", full_clone.meta, "--timeout", "1").exit_code == 0


def test_check_valid_and_verify(full_clone):
    result = invoke("check", full_clone.meta, "--src", full_clone.src, "--dst", full_clone.dst, "--verify")
    assert result.exit_code == 0, result.output
    assert "valid fuseclone metadata" in result.output and "0 differ" in result.output


def test_check_verify_finds_differences(full_clone):
    with open(full_clone.dst, "r+b") as f:
        f.seek(4096 * 3 + 5)
        f.write(b"\x01\x02\x03" if full_clone.source_bytes(4096 * 3 + 5, 3) != b"\x01\x02\x03" else b"\x09")
    result = invoke("check", full_clone.meta, "--src", full_clone.src, "--dst", full_clone.dst, "--verify")
    assert result.exit_code == 1 and "region 3 " in result.output and "1 differ" in result.output


def test_check_verify_explains_writes_before_a_format_upgrade(full_clone):
    from fuseclone.metadata import FLAG_WRITTEN_UNKNOWN, Metadata

    with Metadata.open(full_clone.meta) as meta:  # as a format-1 META upgraded by a mount
        meta._write_header(flags=meta.header.flags | FLAG_WRITTEN_UNKNOWN)
    with open(full_clone.dst, "r+b") as f:
        f.seek(4096 * 3 + 5)
        f.write(bytes(b ^ 0xFF for b in full_clone.source_bytes(4096 * 3 + 5, 3)))
    result = invoke("check", full_clone.meta, "--src", full_clone.src, "--dst", full_clone.dst, "--verify")
    assert result.exit_code == 1 and "1 differ" in result.output
    assert "writes made before then are unknown, and the regions that differ may be such writes" in result.output
    diff = invoke("diff", full_clone.meta)
    assert diff.exit_code == 0 and "writes made before then are not listed" in diff.output


def test_diff_of_a_clone_written_to(half_clone):
    result = invoke("diff", half_clone.meta, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["extents"] == [{"offset": 0, "length": 65536}] and doc["written_bytes"] == 65536
    assert doc["written_unknown"] is False
    assert json.loads(invoke("status", half_clone.meta, "--json").output)["written_regions"] == 16


def test_check_against_the_wrong_source(full_clone, tmp_path):
    from tests.engine.conftest import make_source_file
    import os

    other = make_source_file(tmp_path / "other", os.path.getsize(full_clone.src), seed=77)
    result = invoke("check", full_clone.meta, "--src", str(other))
    assert result.exit_code == 1 and "MISMATCH" in result.output


def test_check_verify_needs_paths(full_clone):
    result = invoke("check", full_clone.meta, "--verify")
    assert result.exit_code == 1 and "--verify needs --src and --dst" in result.output


def test_check_corrupt(tmp_path):
    (tmp_path / "m").write_bytes(bytes(9000))
    result = invoke("check", str(tmp_path / "m"))
    assert result.exit_code == 1 and "fuseclone: error:" in result.output


def test_a_meta_of_a_later_format_is_one_line_naming_it(full_clone):
    """A META written by a later release: check, diff and status name the file."""
    with open(full_clone.meta, "r+b") as f:
        for slot in (0, 1):
            f.seek(slot * 4096)
            header = bytearray(f.read(4096))
            if header[:8] != b"FUSECLN1":
                continue
            struct.pack_into("<I", header, 8, 3)  # the format version
            struct.pack_into("<I", header, 4092, zlib.crc32(bytes(header[:4092])))
            f.seek(slot * 4096)
            f.write(header)
    for command in ("check", "diff", "status"):
        result = invoke(command, full_clone.meta)
        assert result.exit_code == 1, result.output
        assert result.output == (f"fuseclone: error: {full_clone.meta}: metadata format version 3 "
                                 "is not supported (expected 2)\n"), result.output


def test_check_with_the_source_as_destination(full_clone):
    result = invoke("check", full_clone.meta, "--src", full_clone.src, "--dst", full_clone.src, "--verify")
    assert result.exit_code == 1
    assert f"destination {full_clone.src} is the same file as source {full_clone.src}" in result.output


def test_progress_never_shows_more_bytes_than_the_image_holds():
    """A 1-byte image in one 1 GiB region, complete: "1 B of 1 B", not "1.0 GiB of 1 B"."""
    from rich.console import Console

    from fuseclone.progress import render_status
    from fuseclone.status import Status

    st = Status(hydrated_regions=1, total_regions=1, hydrating_regions=0, region_size=1 << 30,
                image_size=1, features=[], hydration_threshold=1, hydration_batch_size=1,
                hydration_enabled=True, hydration_error=None, metadata_mode="rw",
                bytes_per_second=0.0, eta_seconds=None, source="s", destination="d",
                metadata="m", live=False)
    console = Console(record=True, width=100)
    render_status(st, console)
    assert "1 B of 1 B" in console.export_text()


@pytest.mark.parametrize("command", [["wait", "/nonexistent"], ["unmount", "/nonexistent"],
                                     ["list"], ["metrics"]])
@pytest.mark.parametrize("timeout", ["nan", "inf", "-1", "soon"])
def test_a_timeout_is_a_finite_number_of_seconds(command, timeout):
    """`wait --timeout nan` never expired, `list --timeout nan` or `inf` was a traceback."""
    result = invoke(*command, "--timeout", timeout)
    assert result.exit_code == 2
    assert f"'{timeout}' is not a number of seconds (0 or more)" in result.output


def test_version_names_the_commit_of_a_checkout():
    """An install from a git checkout (`./run setup`) says which commit it runs: releases are
    told apart by it (README's Versions), not by the package's version, which stays 0.1.0."""
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    head = subprocess.run(["git", "-C", checkout, "log", "-1", "--format=%h"], capture_output=True,
                          text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    result = subprocess.run([sys.executable, "-m", "fuseclone", "--version"], capture_output=True,
                            text=True, cwd=checkout, check=True)
    assert result.stdout.startswith("fuseclone, version 0.1.0 (commit ")
    assert head.stdout.strip() in result.stdout
