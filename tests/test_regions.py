import pytest
from hypothesis import given, strategies as st

from fuseclone.errors import RegionSizeError
from fuseclone.regions import CompleteMap, Geometry, RegionMap, validate_region_size


@pytest.mark.parametrize("bad", [0, 1, 2048, 4095, 4097, 3 * 4096, 2 * 1024**3])
def test_bad_region_sizes_are_refused(bad):
    with pytest.raises(RegionSizeError, match="power of two"):
        validate_region_size(bad)


def test_partial_last_region():
    g = Geometry(image_size=10_000, region_size=4096)
    assert g.nr_regions == 3
    assert g.region_end(2) == 10_000
    assert list(g.region_span(4095, 2)) == [0, 1]
    assert list(g.covered_span(0, 10_000)) == [0, 1, 2]
    assert list(g.covered_span(1, 10_000)) == [1, 2]
    assert list(g.covered_span(8192, 100)) == []
    assert list(g.covered_span(8192, 1808)) == [2]


@given(
    size=st.integers(1, 1 << 22),
    off=st.integers(0, 1 << 22),
    length=st.integers(0, 1 << 22),
)
def test_covered_span_is_inside_touched_span(size, off, length):
    g = Geometry(size, 4096)
    off = min(off, size)
    length = min(length, size - off)
    covered = g.covered_span(off, length)
    touched = g.region_span(off, length)
    for r in covered:
        assert r in touched
        assert g.region_start(r) >= off and g.region_end(r) <= off + length
    for r in touched:
        if r not in covered:
            assert g.region_start(r) < off or g.region_end(r) > off + length


def test_region_map_counts_and_runs():
    m = RegionMap(10)
    assert m.set_hydrated(range(2, 5)) == 3
    assert m.set_hydrated(range(4, 6)) == 1
    assert m.hydrated_count == 4
    assert list(m.runs(range(0, 10))) == [
        (False, range(0, 2)),
        (True, range(2, 6)),
        (False, range(6, 10)),
    ]
    assert m.next_unhydrated(2) == 6
    assert not m.complete
    m.set_hydrated(range(0, 10))
    assert m.complete and m.next_unhydrated(0) == -1


def test_complete_map_releases_bits():
    m = CompleteMap(1 << 30)
    assert m.all_hydrated(range(5, 1 << 29)) and m.hydrated_count == 1 << 30
