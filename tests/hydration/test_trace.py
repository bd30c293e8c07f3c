"""Access traces: what the recorder writes reads back; anything else is refused."""

import re

import pytest

from fuseclone.regions import Geometry
from fuseclone.trace import TraceError, TraceRecorder, read_trace

IDENT = {"kind": "file", "path": "/x", "size": 1 << 20}
GEOMETRY = Geometry(1 << 20, 4096)


def record(path, runs, close=True):
    recorder = TraceRecorder(str(path), IDENT, GEOMETRY, clock=iter(range(100, 200)).__next__)
    for run in runs:
        recorder.source_read(run)
    if close:
        recorder.close()


def test_round_trip_in_first_read_order_without_repeats(tmp_path):
    record(tmp_path / "t", [range(5, 7), range(0, 1), range(5, 7), range(6, 9)])
    trace = read_trace(str(tmp_path / "t"))
    assert trace.source == IDENT and trace.image_size == 1 << 20 and trace.complete
    assert trace.records == ((5 * 4096, 2 * 4096), (0, 4096), (7 * 4096, 2 * 4096))
    # touching records merge into one run, placed where the first of them was read
    assert trace.region_runs(GEOMETRY) == [range(5, 9), range(0, 1)]


def test_the_first_burst_is_the_runs_read_before_the_first_pause(tmp_path):
    times = iter([0, 0.01, 0.03, 0.05, 0.4, 0.41, 0.9])  # the recorder's start, then each read
    recorder = TraceRecorder(str(tmp_path / "t"), IDENT, GEOMETRY, clock=times.__next__)
    for run in [range(8, 9), range(0, 2), range(20, 21), range(30, 31), range(2, 4), range(9, 10)]:
        recorder.source_read(run)
    recorder.close()
    trace = read_trace(str(tmp_path / "t"))
    assert trace.seconds == (0.01, 0.03, 0.05, 0.4, 0.41, 0.9)
    assert trace.region_runs(GEOMETRY) == [range(8, 10), range(0, 4), range(20, 21), range(30, 31)]
    # read before the 0.35 s pause: regions 8, 0-1 and 20; 2-3 and 9, read after it, are not
    # merged into the burst's runs
    assert trace.first_burst_and_rest(GEOMETRY, pause=0.1) == (
        [range(8, 9), range(0, 2), range(20, 21)], [range(30, 31), range(2, 4), range(9, 10)])
    assert trace.first_burst_and_rest(GEOMETRY, pause=0.5) == (  # no such pause: all of it
        trace.region_runs(GEOMETRY), [])


def test_readahead_counts_once_read(tmp_path):
    recorder = TraceRecorder(str(tmp_path / "t"), IDENT, GEOMETRY, clock=lambda: 0.0)
    recorder.source_read(range(0, 1))
    recorder.fetched_ahead(range(1, 9))
    recorder.read(range(1, 3))
    recorder.read(range(0, 2))
    recorder.close()
    assert read_trace(str(tmp_path / "t")).records == ((0, 4096), (4096, 2 * 4096))


def test_a_trace_cut_short_is_usable(tmp_path):
    record(tmp_path / "t", [range(1, 2)], close=False)
    trace = read_trace(str(tmp_path / "t"))
    assert trace.records == ((4096, 4096),) and not trace.complete


@pytest.mark.parametrize("mangle", [
    lambda text: "hello\n",
    lambda text: text.replace('"image_size"', '"imagesize"'),
    lambda text: text.replace("end 1", "end 2"),
    lambda text: text + "0.1 0 4096\n",
    lambda text: text.replace(" 4096\n", " 4x96\n", 1),
    lambda text: text.replace(" 4096 4096\n", f" {1 << 20} 4096\n"),
    lambda text: re.sub(r"\n[^ \n]+ 4096 4096\n", "\nnan 4096 4096\n", text),
    lambda text: re.sub(r"\n[^ \n]+ 4096 4096\n", "\ninf 4096 4096\n", text),
    # a header nested deeper than the JSON parser recurses (it raised RecursionError)
    lambda text: text.replace(text.split("\n")[1], "[" * 100_000),
])
def test_corrupt_traces_are_refused(tmp_path, mangle):
    record(tmp_path / "t", [range(1, 2)])
    path = tmp_path / "t"
    path.write_text(mangle(path.read_text()))
    with pytest.raises(TraceError, match="t: "):
        read_trace(str(path))


def test_missing_trace_is_refused(tmp_path):
    with pytest.raises(TraceError, match="cannot read"):
        read_trace(str(tmp_path / "nothing"))


@pytest.mark.parametrize("cut", [
    lambda text: text[:-3],  # the size on disk ended inside the last record
    lambda text: text[: text.rindex("\n") + 1] + "\0" * 100,  # it did past the data: zeros
])
def test_a_last_record_a_power_cut_left_without_its_newline_is_dropped(tmp_path, cut):
    record(tmp_path / "t", [range(1, 2), range(7, 9)], close=False)
    path = tmp_path / "t"
    path.write_text(cut(path.read_text()[:-1]))  # and the newline before it, for the zeros
    trace = read_trace(str(path))
    assert trace.records == ((4096, 4096),) and not trace.complete
