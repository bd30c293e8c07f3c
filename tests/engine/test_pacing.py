"""The hydration pacer: depth grows while copies do not queue, drops to what the link delivers
in the quickest copy's time plus QUEUE_TIME once they do, and stays within its floor and cap."""

from hypothesis import given
from hypothesis import strategies as st

from fuseclone.pacing import QUEUE_TIME, HydrationPacer, PrefetchPacer

MiB = 1 << 20


def test_depth_grows_by_what_finishes_while_nothing_queues_up_to_the_cap():
    pacer = HydrationPacer(cap=64 * MiB, floor=MiB, start=8 * MiB)
    now = 0.0
    for _ in range(4):
        now += 0.01
        pacer.copied(2 * MiB, 0.01, now)
    assert pacer.depth == 16 * MiB
    for _ in range(100):
        now += 0.01
        pacer.copied(8 * MiB, 0.02, now)
    assert pacer.depth == 64 * MiB


def test_a_queued_copy_brings_the_depth_to_what_the_link_delivers():
    pacer = HydrationPacer(cap=128 * MiB, floor=MiB, start=128 * MiB)
    pacer.copied(MiB, 0.05, now=0.0)  # the quickest copy: 50 ms
    now = 0.0
    for _ in range(10):  # then 10 MB/s: a 1 MiB copy finishes every 0.1 s, after 2 s each
        now += 0.1
        pacer.copied(MiB, 2.0, now)
    rate = pacer.delivery_rate(now)
    assert abs(rate - 10 * MiB) < MiB
    assert abs(pacer.depth - rate * (0.05 + QUEUE_TIME)) < 2  # about 2.6 MiB, not 128


def test_the_depth_never_leaves_floor_and_cap_and_follows_a_lower_cap():
    pacer = HydrationPacer(cap=32 * MiB, floor=4 * MiB, start=MiB)
    assert pacer.depth == 4 * MiB
    pacer.copied(MiB, 0.01, 0.0)
    pacer.copied(MiB, 5.0, 10.0)  # one copy in the window: no rate yet, so the floor
    assert pacer.depth == 4 * MiB
    pacer.set_cap(2 * MiB)
    assert pacer.depth == 2 * MiB and pacer.floor == 2 * MiB


@given(st.lists(st.tuples(st.integers(1, 16 * MiB), st.floats(0.0, 5.0), st.floats(0.0, 1.0)),
                max_size=200))
def test_depth_is_always_within_bounds(copies):
    pacer = HydrationPacer(cap=128 * MiB, floor=MiB, start=8 * MiB)
    now = 0.0
    for nbytes, seconds, gap in copies:
        now += gap
        pacer.copied(nbytes, seconds, now)
        assert MiB <= pacer.depth <= 128 * MiB


def test_a_cap_raised_again_brings_back_the_floor():
    pacer = HydrationPacer(cap=32 * MiB, floor=4 * MiB, start=8 * MiB)
    pacer.set_cap(MiB)
    pacer.set_cap(32 * MiB)
    assert pacer.floor == 4 * MiB and pacer.depth >= 4 * MiB


def test_prefetch_starts_small_grows_as_copies_finish_and_yields_to_users_of_hydrated_data():
    pacer = PrefetchPacer(cap=128 * MiB, first=4 * MiB, yielding=MiB // 4)
    idle = dict(users_need_it=False, user_active=False)
    assert pacer.depth(**idle) == 4 * MiB  # the trace is claimed at mount: not all of it at once
    pacer.copied(4 * MiB, user_active=False)
    assert pacer.depth(**idle) == 8 * MiB
    assert pacer.depth(users_need_it=False, user_active=True) == MiB // 4
    pacer.copied(MiB // 4, user_active=True)
    assert pacer.depth(**idle) == 4 * MiB  # users left: from the first burst again
    assert pacer.depth(users_need_it=True, user_active=True) == 128 * MiB
    assert pacer.depth(**idle) == 128 * MiB
    pacer.set_cap(16 * MiB)
    assert pacer.depth(**idle) == 16 * MiB
