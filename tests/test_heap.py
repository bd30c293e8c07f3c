from fuseclone.heap import IdleTrim


def test_memory_is_given_back_once_per_quiet_spell():
    trim = IdleTrim()
    ticks = [(1, 0), (1, 0), (1, 0), (2, 0), (2, 5), (2, 5), (2, 5), (3, 5)]
    assert [trim.tick(activity) for activity in ticks] == [
        False, True, False,  # mounted, quiet: once
        False, False, True, False,  # user I/O, then hydration, then quiet: once
        False]
