"""What the READs of caching opens tell about the image's page cache: which direct writes must
have their range dropped again before they are answered."""

from fuseclone.fuse import pagecache
from fuseclone.fuse.pagecache import CHUNK, CachedRanges, Invalidation

SIZE = 1 << 30


def test_a_range_no_read_touched_needs_no_invalidation():
    cached = CachedRanges(SIZE)
    assert cached.plan(0, 4096) is None
    cached.note_cached(CHUNK, 4096)
    assert cached.plan(0, 4096) is None and cached.plan(2 * CHUNK, CHUNK) is None


def test_a_range_read_is_dropped_by_chunks_then_needs_no_more():
    cached = CachedRanges(SIZE)
    cached.note_cached(CHUNK - 4096, 8192)  # across two chunks
    planned = cached.plan(CHUNK + 4096, 4096)
    assert planned == Invalidation(CHUNK, CHUNK, 1)
    cached.dropped(planned)
    assert cached.plan(CHUNK, CHUNK) is None
    assert cached.plan(0, 4096) == Invalidation(0, CHUNK, 1)  # the other chunk is still read


def test_a_read_noted_after_an_invalidation_was_planned_stays_noted():
    """Its pages may be filled after the invalidation passed them (the READ came while it
    ran): the next write of the range must drop them again."""
    cached = CachedRanges(SIZE)
    cached.note_cached(0, 4096)
    planned = cached.plan(0, 4096)
    cached.note_cached(0, 4096)
    cached.dropped(planned)
    assert cached.plan(0, 4096) == Invalidation(0, CHUNK, 2)


def test_only_the_invalidation_that_ends_forgets_what_it_drops():
    """A write whose range another write's invalidation is about to drop must still drop it
    itself: until that one ends, a reader may still find the replaced data cached."""
    cached = CachedRanges(SIZE)
    cached.note_cached(0, 4096)
    first = cached.plan(0, 4096)
    assert cached.plan(4096, 4096) == first  # not dropped yet
    cached.dropped(first)
    assert cached.plan(4096, 4096) is None


def test_too_many_chunks_read_count_as_the_whole_image_until_it_is_dropped(monkeypatch):
    monkeypatch.setattr(pagecache, "MAX_CHUNKS", 4)
    cached = CachedRanges(SIZE)
    for chunk in range(5):
        cached.note_cached(chunk * CHUNK, 4096)
    planned = cached.plan(100 * CHUNK, 4096)  # a chunk never read: everything may be cached
    assert planned == Invalidation(0, SIZE, 5)
    cached.note_cached(7 * CHUNK, 4096)
    cached.dropped(planned)
    assert cached.plan(100 * CHUNK, 4096) is None and cached.plan(0, 4096) is None
    assert cached.plan(7 * CHUNK, 4096) == Invalidation(7 * CHUNK, CHUNK, 6)  # read meanwhile
