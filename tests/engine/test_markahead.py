"""MarkAhead: what a write-ahead marks written besides the write (sans-IO)."""

import random

from hypothesis import given
from hypothesis import strategies as st

from fuseclone.markahead import MAX_WINDOW, NEIGHBOURHOOD, MarkAhead

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


class Marked:
    """The engine's side: `span` is asked only for writes not inside what is marked already."""

    def __init__(self, image_size):
        self.ahead = MarkAhead(image_size)
        self.spans = []

    def write(self, offset, length):
        if not any(lo <= offset and offset + length <= hi for lo, hi in self.spans):
            self.spans.append(self.ahead.span(offset, length))

    def total(self):
        ends = sorted(self.spans)
        merged = []
        for lo, hi in ends:
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        return sum(hi - lo for lo, hi in merged)


def test_a_random_write_marks_the_aligned_neighbourhood_around_it():
    assert MarkAhead(GiB).span(5 * MiB + 123, 4096) == (5 * MiB, 6 * MiB)
    assert MarkAhead(GiB).span(6 * MiB - 10, 20) == (5 * MiB, 7 * MiB)  # straddles two
    assert MarkAhead(GiB).span(GiB - 100, 100) == (GiB - MiB, GiB)


def test_the_window_doubles_along_a_sequential_writer_up_to_the_maximum():
    marked = Marked(4 * GiB)
    for offset in range(0, GiB, 64 * KiB):
        marked.write(offset, 64 * KiB)
    sizes = [hi - lo for lo, hi in marked.spans]
    assert sizes[:8] == [MiB, 2 * MiB, 4 * MiB, 8 * MiB, 16 * MiB, 32 * MiB, 64 * MiB, 64 * MiB]
    assert len(marked.spans) <= 7 + GiB // MAX_WINDOW
    assert marked.total() <= GiB + MAX_WINDOW


def test_writes_slightly_out_of_order_continue_their_stream():
    marked = Marked(GiB)
    for pair in range(0, 32 * MiB, 512 * KiB):  # 256 KiB writes, each pair the wrong way round
        marked.write(pair + 256 * KiB, 256 * KiB)
        marked.write(pair, 256 * KiB)
    assert len(marked.spans) <= 7


def test_random_writers_over_a_large_image_mark_little_more_than_their_neighbourhoods():
    rng = random.Random(1)
    marked = Marked(64 * GiB)
    for _ in range(2000):
        marked.write(rng.randrange(64 * GiB // 4096) * 4096, 4096)
    assert marked.total() <= 2000 * NEIGHBOURHOOD * 1.1


def test_interleaved_streams_keep_their_own_windows():
    marked = Marked(64 * GiB)
    for offset in range(0, 64 * MiB, 64 * KiB):
        marked.write(offset, 64 * KiB)
        marked.write(8 * GiB + offset, 64 * KiB)
    assert len(marked.spans) <= 2 * 7


@given(st.lists(st.tuples(st.integers(0, 256 * MiB - 1), st.integers(1, 2 * MiB)), max_size=60))
def test_a_span_holds_its_write_and_is_bounded(writes):
    ahead = MarkAhead(256 * MiB)
    for offset, length in writes:
        length = min(length, 256 * MiB - offset)
        lo, hi = ahead.span(offset, length)
        assert lo <= offset and offset + length <= hi
        assert hi - lo <= length + MAX_WINDOW + 2 * NEIGHBOURHOOD
