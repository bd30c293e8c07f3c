"""Hydration's order before the in-order sweep: the prefetch trace, then hot spots."""

from bitarray import bitarray

from fuseclone.ordering import HOT_SPOT_BYTES, HydrationOrder

REGION = 4096
HOT = HOT_SPOT_BYTES // REGION


def free_runs(taken: bitarray):
    def free_run(start, stop, limit):
        pos = taken.find(0, start, stop)
        if pos < 0:
            return None
        end = pos
        while end < min(stop, pos + limit) and not taken[end]:
            end += 1
        return range(pos, end)
    return free_run


def empty(n):
    bits = bitarray(n)
    bits.setall(0)
    return bits


def test_prefetch_runs_in_trace_order_split_by_the_limit_skipping_hydrated():
    taken = empty(10000)
    taken[50:60] = 1
    order = HydrationOrder(10000, REGION, [range(900, 905), range(50, 60), range(10, 13)])
    got = []
    while order.prefetching:
        run = order.next_prefetch(free_runs(taken), 2)
        if run is not None:
            taken[run.start:run.stop] = 1
            got.append(run)
    assert got == [range(900, 902), range(902, 904), range(904, 905), range(10, 12), range(12, 13)]
    assert order.next_prefetch(free_runs(taken), 2) is None


def test_hot_spots_most_recent_first_within_their_neighbourhood():
    taken = empty(10 * HOT)
    order = HydrationOrder(10 * HOT, REGION)
    order.note_source_read(range(HOT + 3, HOT + 4))
    order.note_source_read(range(5 * HOT + 1, 5 * HOT + 2))
    run = order.next_hot(free_runs(taken), HOT)
    assert run == range(5 * HOT, 6 * HOT)
    taken[run.start:run.stop] = 1
    assert order.next_hot(free_runs(taken), HOT) == range(HOT, 2 * HOT)
    taken[HOT:2 * HOT] = 1
    assert order.next_hot(free_runs(taken), HOT) is None


def test_hot_spot_clipped_to_the_image():
    order = HydrationOrder(HOT + 2, REGION)
    order.note_source_read(range(HOT + 1, HOT + 2))
    assert order.next_hot(free_runs(empty(HOT + 2)), 10 * HOT) == range(HOT, HOT + 2)


def test_prefetched_tells_the_prefetch_copies_regions_apart_from_the_rest():
    order = HydrationOrder(10 * HOT, REGION, [range(0, 10 * HOT)])
    for run in (range(5, 7), range(1, 3), range(7, 9), range(10, 11), range(9, 10)):
        order.note_prefetched(run)
    assert [r for r in range(12) if order.prefetched(range(r, r + 1))] == [1, 2, 5, 6, 7, 8, 9, 10]
    assert order.prefetched(range(2, 6)) and not order.prefetched(range(3, 6))
