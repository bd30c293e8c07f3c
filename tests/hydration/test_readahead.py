"""The stream detector (sans-IO): sequential streams get a growing window, random reads none."""

from hypothesis import given, strategies as st

from fuseclone.readahead import MAX_STREAMS, MIN_WINDOW, ReadaheadDetector

MiB = 1 << 20
SIZE = 1 << 40


def test_first_read_fetches_nothing_second_opens_a_window():
    d = ReadaheadDetector(8 * MiB, SIZE)
    assert d.observe(0, 65536) is None
    assert d.observe(65536, 65536) == (131072, 131072 + 4 * 65536)


def test_window_grows_while_sequential_up_to_the_maximum():
    d = ReadaheadDetector(8 * MiB, SIZE)
    offset, fetched_to = 0, 0
    for _ in range(500):
        ahead = d.observe(offset, 65536)
        offset += 65536
        if ahead is not None:
            start, stop = ahead
            assert start == max(fetched_to, offset)  # nothing asked for twice
            fetched_to = stop
        assert fetched_to - offset <= 8 * MiB
    assert fetched_to - offset > 4 * MiB  # the window reached the maximum


def test_a_jump_collapses_the_window():
    d = ReadaheadDetector(8 * MiB, SIZE)
    for i in range(20):
        d.observe(i * 65536, 65536)
    assert d.observe(100 * MiB, 65536) is None
    assert d.observe(100 * MiB + 65536, 65536) == (100 * MiB + 131072, 100 * MiB + 131072 + MIN_WINDOW * 2)


def test_interleaved_streams_are_told_apart():
    d = ReadaheadDetector(8 * MiB, SIZE)
    a, b = 0, 512 * MiB
    d.observe(a, 4096)
    d.observe(b, 4096)
    assert d.observe(a + 4096, 4096) is not None
    assert d.observe(b + 4096, 4096) is not None


def test_reads_of_data_at_hand_do_not_start_streams():
    d = ReadaheadDetector(8 * MiB, SIZE)
    d.observe(0, 4096, may_start=False)
    assert len(d) == 0 and d.observe(4096, 4096) is None


def test_never_past_the_end_of_the_image():
    d = ReadaheadDetector(8 * MiB, MiB)
    d.observe(MiB - 3 * 65536, 65536)
    assert d.observe(MiB - 2 * 65536, 65536) == (MiB - 65536, MiB)
    assert d.observe(MiB - 65536, 65536) is None


@given(st.lists(st.tuples(st.integers(0, SIZE // 4096 - 64), st.integers(1, 64)), max_size=200))
def test_random_reads_never_fetch_ahead(reads):
    """Reads that never start where an earlier one ended fetch nothing, and the streams kept
    stay bounded."""
    d = ReadaheadDetector(8 * MiB, SIZE)
    ends = set()
    for block, blocks in reads:
        offset, length = block * 4096, blocks * 4096
        ahead = d.observe(offset, length)
        assert (ahead is not None) <= (offset in ends)
        ends.add(offset + length)
        assert len(d) <= MAX_STREAMS


@given(st.integers(1, 256).map(lambda n: n * 4096), st.integers(2, 300))
def test_a_sequential_stream_stays_ahead_within_the_window(length, reads):
    d = ReadaheadDetector(8 * MiB, SIZE)
    fetched_to = length
    for i in range(reads):
        ahead = d.observe(i * length, length)
        end = (i + 1) * length
        if ahead is not None:
            assert ahead[0] == max(fetched_to, end) and ahead[1] > ahead[0]
            fetched_to = ahead[1]
        assert fetched_to - end <= 8 * MiB
        if i >= 1:
            assert fetched_to > end  # always something ahead of a confirmed stream
