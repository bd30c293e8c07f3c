"""LostWrites: the cached writes a mount lost, merged and counted once, summarised in a line."""

import errno
import random

from fuseclone.fuse.fs import LOST_RANGES_SHOWN, LostWrites

EIO = OSError(errno.EIO, "Input/output error")


def test_lost_ranges_are_merged_and_their_bytes_counted_once():
    lost = LostWrites()
    covered = set()
    pick = random.Random(3)
    for _ in range(2000):
        offset, length = pick.randrange(20000), pick.randrange(1, 60)
        covered.update(range(offset, offset + length))
        lost.add(offset, length, EIO)
    assert lost.bytes == len(covered)
    ranges = lost._ranges
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))  # disjoint, apart, in order
    assert {x for start, end in ranges for x in range(start, end)} == covered


def test_a_summary_names_the_first_ranges_and_counts_the_rest():
    lost = LostWrites()
    assert not lost
    for k in range(LOST_RANGES_SHOWN + 3):
        lost.add(k * 8192, 4096, EIO)
    lost.add(4096, 4096, EIO)  # joins the first two
    assert lost
    summary = lost.summary()
    assert summary.startswith(f"{(LOST_RANGES_SHOWN + 4) * 4096} bytes whose write-back failed "
                              "(offset 0 +12288, offset 16384 +4096")
    assert summary.endswith(" and 2 more ranges)")


def test_a_stop_that_gave_up_says_how_many_is_unknown():
    lost = LostWrites()
    lost.give_up("the stop gave up on them after 30 s waiting for the source")
    assert lost and lost.bytes == 0
    assert lost.summary() == ("the writes still cached when the stop gave up on them after 30 s "
                              "waiting for the source (how many is unknown)")
