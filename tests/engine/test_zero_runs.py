"""`_zero_runs` decides which hydrated pieces become holes: it must agree with the obvious
piece-by-piece definition on any data, including pieces whose first byte is zero but not the
rest, and a short last piece."""

from hypothesis import given, settings
from hypothesis import strategies as st

from fuseclone.copier import _zero_runs


def reference_runs(data: bytes, step: int) -> list[tuple[bool, int, int]]:
    runs: list[tuple[bool, int, int]] = []
    for lo in range(0, len(data), step):
        piece = data[lo : lo + step]
        is_zero = not any(piece)
        if runs and runs[-1][0] == is_zero:
            runs[-1] = (is_zero, runs[-1][1], lo + len(piece))
        else:
            runs.append((is_zero, lo, lo + len(piece)))
    return runs


PIECES = st.sampled_from([b"\0" * 8, b"\0" * 7 + b"\1", b"\1" + b"\0" * 7, b"\2" * 8, b"\0" * 3])


@settings(max_examples=300)
@given(st.lists(PIECES, max_size=40), st.sampled_from([1, 4, 8, 16]), st.booleans())
def test_zero_runs_match_the_piecewise_definition(pieces, step, as_bytearray):
    data = b"".join(pieces)
    if as_bytearray:
        data = bytearray(data)
    assert _zero_runs(data, step) == reference_runs(bytes(data), step)


def test_runs_cover_the_data_in_order():
    data = bytes(4096) + b"x" * 4096 + bytes(8192) + b"\0" * 100 + b"y"
    assert _zero_runs(data, 4096) == [(True, 0, 4096), (False, 4096, 8192), (True, 8192, 16384),
                                      (False, 16384, 16485)]
