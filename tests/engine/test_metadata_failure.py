"""Fail mode at the engine: a failed commit (META write or DST fdatasync) is one transition
with a reason; nothing is written to META after it, so it stays at the last good commit."""

import errno
import os

import pytest
import trio

from fuseclone.errors import MetadataFailedError
from fuseclone.metadata import Metadata, MetadataMode
from fuseclone.regions import Geometry
from tests.engine.conftest import assert_settle_waiter_woken_by


def fail_datasync(engine):
    def datasync():
        raise OSError(errno.EIO, "Input/output error")

    engine.dst.datasync = datasync


async def test_a_failed_dst_fdatasync_puts_the_metadata_in_fail_mode(clone):
    engine = await clone.open(hydration=False)
    async with clone.running(engine):
        await engine.write(0, b"a" * 4096)
        await engine.flush()  # the last good commit
        fail_datasync(engine)
        await engine.write(8192, b"b" * 4096)
        with pytest.raises(OSError) as info:
            await engine.flush()
        assert info.value.errno == errno.EIO
        status = engine.status()
        assert status.metadata_mode == "fail"
        assert status.metadata_error == f"a failed fdatasync of {clone.dst} (Input/output error)"
        with pytest.raises(OSError) as info:
            await engine.write(0, b"c" * 4096)  # hydrated, but nothing may be committed now
        assert info.value.errno == errno.EIO and "unmount and mount again" in str(info.value)
        assert await engine.read(0, 4096) == b"a" * 4096
        with pytest.raises(MetadataFailedError, match="after a failed fdatasync"):
            engine.message("enable_hydration")
        assert engine.status().hydration_enabled is False
        with trio.fail_after(5):
            await engine.wait_until_settled()  # fail mode ends a wait at once
    with Metadata.open(clone.meta, writable=False) as meta:
        assert not meta.header.clean  # not marked clean after a failure
        assert meta.is_hydrated(0) and not meta.is_hydrated(2)


def test_fail_is_one_transition_and_the_first_reason_sticks(tmp_path):
    from fuseclone.regions import Geometry

    with Metadata.create(str(tmp_path / "m"), Geometry(1 << 20, 4096), {}) as meta:
        assert meta.mode is MetadataMode.RW
        meta.fail("the first trouble")
        meta.fail("a later one")
        assert (meta.mode, meta.failure) == (MetadataMode.FAIL, "the first trouble")
        with pytest.raises(OSError, match="after the first trouble"):
            meta.mark_clean()
        meta.set_hydrated(range(0, 1))
        batch = meta.prepare_commit()
        with pytest.raises(OSError):
            meta.write_commit(batch)
        assert meta.bytes_written == 0


async def test_a_waiter_wakes_when_the_metadata_fails(clone, monkeypatch):
    """Fail mode begins in a commit's worker thread; `wait` still hears of it at once."""
    engine = await clone.open(hydration=False)

    async def failed_flush():
        fail_datasync(engine)
        await engine.write(0, b"a" * 4096)
        with pytest.raises(OSError):
            await engine.flush()

    async with clone.running(engine):
        await assert_settle_waiter_woken_by(engine, failed_flush, monkeypatch)
        assert engine.status().metadata_mode == "fail"


def test_a_commit_written_after_meta_lost_its_name_and_was_copied_is_not_acknowledged(
        tmp_path, monkeypatch):
    """Two commits at once (user writes' written bits beside hydration's bits): META is
    deleted once one of them looked at its name, and the other finds it gone and writes META's
    copy before the first writes its slots, into the deleted file. That commit returned as
    durable: a user write then reached DST while its written bit was in no file anyone would
    find (`diff` omitting it after the remount from the copy)."""
    path = str(tmp_path / "meta")
    meta = Metadata.create(path, Geometry(1 << 20, 4096), {})
    real_check_named = Metadata.check_named
    checks = []

    def deleted_then_copied_beside(self):
        real_check_named(self)
        if not checks:
            checks.append(True)
            os.unlink(path)
            with pytest.raises(OSError):  # the other commit: it writes the copy and fails
                real_check_named(self)

    monkeypatch.setattr(Metadata, "check_named", deleted_then_copied_beside)
    with meta:
        meta.mark_written(0, 4096)
        batch = meta.prepare_written_commit()
        with pytest.raises(OSError) as info:
            meta.write_commit(batch)
        assert info.value.errno == errno.EIO and meta.mode is MetadataMode.FAIL
    with Metadata.open(path, writable=False) as copy:
        assert copy.written_extents == []  # and nobody was told otherwise


def test_meta_is_written_again_over_a_temporary_copy_that_a_crash_left(tmp_path):
    """The copy is made under PATH.PID.tmp first: one left by a daemon killed while it copied,
    found by a later daemon that got the same pid, made the copy fail (File exists)."""
    path = str(tmp_path / "meta")
    with Metadata.create(path, Geometry(1 << 20, 4096), {}) as meta:
        meta.set_hydrated(range(3, 4))
        batch = meta.prepare_commit()
        meta.write_commit(batch)
        meta.finish_commit(batch)
        with open(f"{path}.{os.getpid()}.tmp", "wb") as left:
            left.write(b"half a copy")
        os.unlink(path)
        with pytest.raises(OSError):
            meta.check_named()
        assert f"written again at {path}" in meta.failure
    with Metadata.open(path, writable=False) as copy:
        assert copy.is_hydrated(3) and copy.hydrated_count == 1
