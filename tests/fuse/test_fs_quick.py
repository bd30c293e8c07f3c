"""The image filesystem's quick handlers for what a database's commits send: direct WRITEs,
FSYNC, and the SETATTR of times that the kernel sends before each FSYNC with the write cache."""

import errno
import os

import pytest

from fuseclone.fuse import abi, codec
from fuseclone.fuse.backend import Blocking, Continue, Permissions
from fuseclone.fuse.fs import DIRECT_FH, ImageFilesystem
from fuseclone.fuse.pagecache import CHUNK

IMAGE = 2  # the image's node in a directory mount
TIMES = abi.FATTR_MTIME | abi.FATTR_CTIME | abi.FATTR_FH  # what the write cache sends (0x460)


class Image:
    size = 1 << 20

    def __init__(self, flush_now, flush_is_short=False):
        self._flush_now = flush_now
        self._flush_is_short = flush_is_short
        self.writes = []

    def permissions(self):
        return Permissions(0o600, 0, 0)

    def flush_now(self):
        return self._flush_now

    def flush_is_short(self):
        return self._flush_is_short

    def write_now(self, offset, data, *, direct=False):
        self.writes.append((offset, bytes(data), direct))
        return True

    def read_now(self, offset, length, *, kernel_keeps):
        return bytes(length)

    async def write(self, offset, data, *, direct=False):
        self.writes.append((offset, bytes(data), direct))

    async def flush(self):
        pass


def setattr_req(valid, size=0):
    return codec.SetAttr(1, IMAGE, 0, 0, 0, valid, 1, size, 0, 0, 0)


def fsync_req():
    return codec.Fsync(1, IMAGE, 0, 0, 0, 1, True)


def test_fsync_with_nothing_to_commit_is_handed_to_the_job_thread():
    synced = []
    fs = ImageFilesystem(Image(lambda: synced.append(1)))
    answer = fs.quick_handlers()[codec.Fsync](fsync_req())
    assert isinstance(answer, Blocking) and not synced
    assert isinstance(answer.job(), codec.EmptyReply) and synced == [1]


def test_a_short_fsync_with_nothing_to_commit_is_answered_on_the_loop():
    synced = []
    fs = ImageFilesystem(Image(lambda: synced.append(1), flush_is_short=True))
    assert isinstance(fs.quick_handlers()[codec.Fsync](fsync_req()), codec.EmptyReply)
    assert synced == [1]


def test_a_passthrough_fsync_never_runs_on_the_loop():
    """The kernel writes DST itself under passthrough: the daemon's count of unsynced bytes
    misses those writes, so the fdatasync may be long and goes to the job thread."""
    synced = []
    fs = ImageFilesystem(Image(lambda: synced.append(1), flush_is_short=True))
    fs.use_backing(1)
    answer = fs.quick_handlers()[codec.Fsync](fsync_req())
    assert isinstance(answer, Blocking) and not synced


def test_fsync_with_bits_to_commit_waits_for_its_task():
    fs = ImageFilesystem(Image(None))
    assert isinstance(fs.quick_handlers()[codec.Fsync](fsync_req()), Continue)


def test_setattr_of_times_is_answered_at_once():
    quick = ImageFilesystem(Image(None)).quick_handlers()[codec.SetAttr]
    reply = quick(setattr_req(TIMES))
    assert isinstance(reply, codec.AttrReply) and reply.attr.size == Image.size
    assert isinstance(quick(setattr_req(abi.FATTR_SIZE, size=Image.size)), codec.AttrReply)  # same size
    with pytest.raises(OSError) as raised:
        quick(setattr_req(abi.FATTR_SIZE, size=4096))
    assert raised.value.errno == errno.EPERM
    assert isinstance(quick(setattr_req(abi.FATTR_MODE | TIMES)), Continue)  # chmod: DST's, in a task


def write_req(open_flags, write_flags=0, fh=1):
    return codec.Write(1, IMAGE, 0, 0, 0, fh, 4096, memoryview(b"w" * 4096), write_flags, open_flags)


def no_invalidation(nodeid, offset, length):
    raise AssertionError("nothing to invalidate")


def test_a_writer_with_o_direct_is_told_to_the_image():
    """Its writes may skip DST's page cache; the kernel's writeback of its own cache may not."""
    image = Image(None)
    quick = ImageFilesystem(image, write_cache=True).quick_handlers()[codec.Write]
    for open_flags, write_flags in ((os.O_RDWR | os.O_DIRECT, 0), (os.O_RDWR, 0),
                                    (os.O_RDWR | os.O_DIRECT, abi.FUSE_WRITE_CACHE)):
        assert quick(write_req(open_flags, write_flags)) == codec.WriteReply(4096)
    assert [direct for _, _, direct in image.writes] == [True, False, False]


def open_req(flags):
    return codec.Open(1, IMAGE, 0, 0, 0, flags)


@pytest.mark.trio
async def test_a_direct_opener_gets_direct_io_and_a_buffered_one_the_page_cache():
    """A direct opener's writes then stamp no times on the image, so its FSYNCs come without a
    SETATTR of times before them, and they share the inode lock."""
    fs = ImageFilesystem(Image(None), write_cache=True)
    fs.negotiated(abi.FUSE_WRITEBACK_CACHE | abi.FUSE_DIRECT_IO_ALLOW_MMAP, no_invalidation)
    direct = await fs.open(open_req(os.O_RDWR | os.O_DIRECT))
    assert direct.open_flags & abi.FOPEN_DIRECT_IO
    assert direct.open_flags & abi.FOPEN_PARALLEL_DIRECT_WRITES
    buffered = await fs.open(open_req(os.O_RDWR))
    assert not buffered.open_flags & abi.FOPEN_DIRECT_IO
    assert buffered.open_flags & abi.FOPEN_KEEP_CACHE


@pytest.mark.trio
async def test_no_direct_io_opens_where_the_kernel_would_refuse_their_shared_mmap():
    fs = ImageFilesystem(Image(None), write_cache=True)
    fs.negotiated(abi.FUSE_WRITEBACK_CACHE, no_invalidation)
    assert not (await fs.open(open_req(os.O_RDWR | os.O_DIRECT))).open_flags & abi.FOPEN_DIRECT_IO


@pytest.mark.trio
@pytest.mark.parametrize("open_flags, write_flags", [
    (os.O_RDWR | os.O_DIRECT, os.O_RDWR | os.O_DIRECT),  # an FOPEN_DIRECT_IO open
    (os.O_RDWR, os.O_RDWR | os.O_DIRECT),  # O_DIRECT set later with fcntl
    (os.O_RDWR, os.O_RDWR),  # a loop device switched to direct I/O: IOCB_DIRECT per request
])
async def test_a_direct_write_of_a_range_a_caching_open_read_is_answered_after_its_invalidation(
        open_flags, write_flags):
    """The kernel drops the range's cached pages before it sends a direct WRITE, not after: a
    buffered reader's READ answered meanwhile would leave the replaced data cached. So once an
    open that caches (other than the writer's own) has READ from the range, the range is
    dropped again once the write is done, by a thread that answers no READ (the kernel waits
    for pages that READs in flight hold locked), which then replies itself."""
    image = Image(None)
    fs = ImageFilesystem(image, write_cache=True)
    fs.negotiated(abi.FUSE_WRITEBACK_CACHE | abi.FUSE_DIRECT_IO_ALLOW_MMAP,
                  lambda nodeid, offset, length: image.writes.append(("invalidated", nodeid,
                                                                      offset, length)))
    quick = fs.quick_handlers()[codec.Write]
    writer = await fs.open(open_req(open_flags))
    direct_write = write_req(write_flags, fh=writer.fh)
    assert writer.fh == DIRECT_FH if open_flags & os.O_DIRECT else writer.fh != DIRECT_FH
    # Nothing else caches (a caching open that writes directly reads directly too): at once.
    assert quick(direct_write) == codec.WriteReply(4096)
    reader = await fs.open(open_req(os.O_RDONLY))
    # Nor while the reader has read nothing: it has nothing cached.
    assert quick(direct_write) == codec.WriteReply(4096)
    fs.quick_handlers()[codec.Read](read_req(reader.fh, 60 << 10))
    image.writes.clear()
    answer = quick(direct_write)
    written = (4096, b"w" * 4096, bool(write_flags & os.O_DIRECT))
    assert isinstance(answer, Blocking) and answer.waits_for_reads
    assert image.writes == [written]  # written, not answered yet
    assert answer.job() == codec.WriteReply(4096)
    assert image.writes == [written, ("invalidated", IMAGE, 0, CHUNK)]  # the READ's chunk
    # Dropped, and read from no more since: at once again.
    assert quick(direct_write) == codec.WriteReply(4096)
    # The kernel writing back its cache needs none: it updated its pages itself.
    fs.quick_handlers()[codec.Read](read_req(reader.fh, 0))
    assert quick(write_req(os.O_RDWR, abi.FUSE_WRITE_CACHE, fh=reader.fh)) == codec.WriteReply(4096)
    await fs.release(codec.Release(1, IMAGE, 0, 0, 0, reader.fh, 0))
    assert quick(direct_write) == codec.WriteReply(4096)  # the reader is gone


@pytest.mark.trio
@pytest.mark.parametrize("write_cache", [False, True])
async def test_a_direct_write_of_a_range_a_buffered_write_filled_is_answered_after_its_invalidation(
        write_cache):
    """A buffered write fills its pages without a READ (write-through: before it is sent; the
    write cache's stay filled until written back). One that reached DST before a direct write
    of its range would otherwise leave its data cached over the direct write's for good."""
    image = Image(None)
    fs = ImageFilesystem(image, write_cache=write_cache)
    invalidated = []
    fs.negotiated(abi.FUSE_DIRECT_IO_ALLOW_MMAP | (abi.FUSE_WRITEBACK_CACHE if write_cache else 0),
                  lambda *args: invalidated.append(args))
    writer = await fs.open(open_req(os.O_RDWR | os.O_DIRECT))
    buffered = await fs.open(open_req(os.O_RDWR))
    quick = fs.quick_handlers()[codec.Write]
    direct_write = write_req(os.O_RDWR | os.O_DIRECT, fh=writer.fh)
    assert quick(direct_write) == codec.WriteReply(4096)  # nothing cached yet
    buffered_write = write_req(os.O_RDWR, abi.FUSE_WRITE_CACHE if write_cache else 0,
                               fh=buffered.fh)
    assert quick(buffered_write) == codec.WriteReply(4096)
    answer = quick(direct_write)
    assert isinstance(answer, Blocking) and answer.waits_for_reads and not invalidated
    assert answer.job() == codec.WriteReply(4096)
    assert invalidated == [(IMAGE, 0, CHUNK)]


@pytest.mark.trio
async def test_a_direct_write_that_waits_is_invalidated_for_an_open_that_came_meanwhile():
    """Such a write may wait long (for the source, a commit): a buffered open that comes
    meanwhile and reads its range before the data is in DST caches what it replaces, and
    keeps it cached (FOPEN_KEEP_CACHE) even once closed again."""
    image = Image(None)
    fs = ImageFilesystem(image)
    invalidated = []
    fs.negotiated(abi.FUSE_DIRECT_IO_ALLOW_MMAP, lambda *args: invalidated.append(args))
    writer = await fs.open(open_req(os.O_RDWR | os.O_DIRECT))
    answer = fs.quick_handlers()[codec.Write](
        write_req(os.O_RDWR | os.O_DIRECT | os.O_DSYNC, fh=writer.fh))  # waits for its flush
    assert isinstance(answer, Continue)
    reader = await fs.open(open_req(os.O_RDONLY))
    fs.quick_handlers()[codec.Read](read_req(reader.fh, 4096))
    await fs.release(codec.Release(1, IMAGE, 0, 0, 0, reader.fh, 0))
    assert await answer.answer() == codec.WriteReply(4096)
    assert invalidated == [(IMAGE, 0, CHUNK)]


class DiskImage(Image):
    """Its writes of hydrated regions are blocking calls for a job thread."""

    def write_now(self, offset, data, *, direct=False):
        return lambda: self.writes.append((offset, bytes(data), direct))


def handed_on(got):
    """What the session does with what a job returned: the reply, or the job it handed on
    (run on a thread that answers no READ) and its reply."""
    if isinstance(got, Blocking):
        assert got.waits_for_reads
        return handed_on(got.job())
    return got


@pytest.mark.trio
async def test_a_direct_write_for_a_job_thread_is_invalidated_for_an_open_that_came_meanwhile():
    """A large direct write of hydrated regions waits for the job thread's turn: a buffered
    open that comes meanwhile and reads its range before the data is in DST caches what it
    replaces. The job plans once done; it invalidates only on a thread that answers no READ
    (not its own: one that runs write-through WRITEs in order, which hold pages locked)."""
    image = DiskImage(None)
    fs = ImageFilesystem(image)
    invalidated = []
    fs.negotiated(abi.FUSE_DIRECT_IO_ALLOW_MMAP, lambda *args: invalidated.append(args))
    writer = await fs.open(open_req(os.O_RDWR | os.O_DIRECT))
    quick = fs.quick_handlers()[codec.Write]
    answer = quick(write_req(os.O_RDWR | os.O_DIRECT, fh=writer.fh))
    assert isinstance(answer, Blocking) and not answer.waits_for_reads  # no caching open yet
    reader = await fs.open(open_req(os.O_RDONLY))
    fs.quick_handlers()[codec.Read](read_req(reader.fh, 4096))  # answered the old data
    await fs.release(codec.Release(1, IMAGE, 0, 0, 0, reader.fh, 0))  # its pages stay cached
    got = answer.job()
    assert image.writes == [(4096, b"w" * 4096, True)] and not invalidated
    assert handed_on(got) == codec.WriteReply(4096)
    assert invalidated == [(IMAGE, 0, CHUNK)]
    # No open came while the next one waited: it costs its job thread nothing more.
    assert quick(write_req(os.O_RDWR | os.O_DIRECT, fh=writer.fh)).job() == codec.WriteReply(4096)
    assert invalidated == [(IMAGE, 0, CHUNK)]


@pytest.mark.trio
async def test_reads_of_a_direct_open_leave_nothing_cached_to_invalidate():
    """An FOPEN_DIRECT_IO open's READs (a loop device's, a database's) bypass the page cache:
    they cost the direct writer beside a caching open no invalidation."""
    image = Image(None)
    fs = ImageFilesystem(image, write_cache=True)
    fs.negotiated(abi.FUSE_WRITEBACK_CACHE | abi.FUSE_DIRECT_IO_ALLOW_MMAP, no_invalidation)
    writer = await fs.open(open_req(os.O_RDWR | os.O_DIRECT))
    await fs.open(open_req(os.O_RDONLY))
    fs.quick_handlers()[codec.Read](read_req(writer.fh, 4096))
    assert fs.quick_handlers()[codec.Write](
        write_req(os.O_RDWR | os.O_DIRECT, fh=writer.fh)) == codec.WriteReply(4096)


def read_req(fh, offset):
    return codec.Read(1, IMAGE, 0, 0, 0, fh, offset, 4096)


@pytest.mark.trio
async def test_a_write_through_buffered_write_is_not_invalidated():
    """Without the write cache the kernel updates its pages with a buffered write itself, and
    holds one locked until the answer: an invalidation would wait for it, and never end."""
    fs = ImageFilesystem(Image(None))
    fs.negotiated(abi.FUSE_DIRECT_IO_ALLOW_MMAP, no_invalidation)
    buffered = await fs.open(open_req(os.O_RDWR))
    quick = fs.quick_handlers()[codec.Write]
    assert quick(write_req(os.O_RDWR, fh=buffered.fh)) == codec.WriteReply(4096)


class FailingImage(Image):
    """Every store fails, as a partial write to an unhydrated region whose source read fails."""

    size = 8192

    def write_now(self, offset, data, *, direct=False):
        return Continue(lambda: self.write(offset, data, direct=direct))

    async def write(self, offset, data, *, direct=False):
        raise OSError(errno.EIO, "the source failed")


@pytest.mark.trio
async def test_a_cached_write_across_the_end_whose_part_inside_fails_is_counted_lost():
    """The kernel's write-back of a cache that grew past the image's end may send one WRITE
    across it (pages coalesced): its part past the end is refused (ENOSPC, not lost), but its
    part inside was acknowledged like any cached write, and is lost if storing it fails."""
    fs = ImageFilesystem(FailingImage(None), write_cache=True)
    req = codec.Write(1, IMAGE, 0, 0, 0, 1, 4096, memoryview(b"w" * 8192), abi.FUSE_WRITE_CACHE, os.O_RDWR)
    answer = fs.quick_handlers()[codec.Write](req)
    with pytest.raises(OSError) as failed:
        await answer.answer()
    assert failed.value.errno == errno.EIO
    assert fs.lost_writes.bytes == 4096  # the part inside, not the part refused past the end


@pytest.mark.trio
async def test_a_cached_write_across_the_end_stored_inside_is_refused_not_lost():
    image = Image(None)
    image.size = 8192
    fs = ImageFilesystem(image, write_cache=True)
    req = codec.Write(1, IMAGE, 0, 0, 0, 1, 4096, memoryview(b"w" * 8192), abi.FUSE_WRITE_CACHE, os.O_RDWR)
    answer = fs.quick_handlers()[codec.Write](req)
    with pytest.raises(OSError) as failed:
        await answer.answer()
    assert failed.value.errno == errno.ENOSPC
    assert image.writes == [(4096, b"w" * 4096, False)] and not fs.lost_writes
