"""The benchmark's pure parts: fio JSON parsing (from real fio runs saved beside this file),
figures, ratios, targets and verdicts, the chart's points, the --only parser. No mounts, no
processes; the benchmark itself runs with `./run bench` (python -m benchmarks)."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks.__main__ import is_leftover_server, parse_rows
from benchmarks.fio import FioJob, fio_command, parse_fio_json
from benchmarks.report import chart_points, render_table, summary
from benchmarks.rows import ROWS, Profile
from benchmarks.stats import Figure, Metric, Target, best, human, ratio

HERE = os.path.dirname(__file__)


def sample(name: str) -> str:
    with open(os.path.join(HERE, name)) as f:
        return f.read()


def test_parse_randread_sample():
    (res,) = parse_fio_json(sample("fio-randread-4k.json"))
    assert res.error == 0
    side = res.side("randread")
    assert side is res.read
    assert side.iops == pytest.approx(80078.921079)
    assert side.bw_bytes == 328003260
    assert side.mb_per_s == pytest.approx(328.00326)
    assert side.percentile(99) == pytest.approx(216.064)  # ns in the JSON, µs here
    assert side.percentile(50) == pytest.approx(175.104)
    assert side.percentile(99.9) == pytest.approx(3227.648)
    assert side.percentile(42) is None
    assert res.write.iops == 0


def test_parse_write_sample_and_leading_noise():
    text = "fio: some warning line\n" + sample("fio-write-1m.json")
    (res,) = parse_fio_json(text)
    side = res.side("write")
    assert side is res.write
    assert side.iops == pytest.approx(4598.605578)
    assert side.mb_per_s == pytest.approx(4821.987442)
    assert res.side("randwrite") is res.write
    assert res.side("randrw") is res.read


def test_parse_fsync_latencies():
    (res,) = parse_fio_json(sample("fio-randwrite-4k-fsync.json"))  # --fsync=1
    assert res.write.iops == pytest.approx(2968.115942)
    assert res.sync is not None
    assert res.sync.percentile(99) == pytest.approx(1908.736)
    assert res.sync.percentile(50) == pytest.approx(234.496)
    (unsynced,) = parse_fio_json(sample("fio-write-1m.json"))
    assert unsynced.sync is None


def test_parse_rejects_garbage():
    with pytest.raises(ValueError):
        parse_fio_json("fio: failed to open file")
    with pytest.raises(ValueError):
        parse_fio_json(json.dumps({"jobs": []}))


def test_fio_command():
    cmd = fio_command(FioJob("/dev/loop7", "randread", "4k", iodepth=1, runtime=3, ramp_time=0.5, size="64M"))
    assert "--output-format=json" in cmd
    assert "--filename=/dev/loop7" in cmd and "--iodepth=1" in cmd and "--direct=1" in cmd
    assert "--ioengine=libaio" in cmd and "--size=64M" in cmd and "--runtime=3s" in cmd
    assert "--ramp_time=0.5s" in cmd and "--time_based" in cmd


def test_figure_median_and_spread():
    f = Figure("x", [10, 30, 20])
    assert f.median == 20
    assert f.spread == pytest.approx(0.5)
    assert Figure("y").median is None and not Figure("y").ok
    assert Figure("z", [5]).spread is None


def test_ratio_and_best():
    assert ratio(10, 4) == 2.5
    assert ratio(None, 4) is None and ratio(3, 0) is None
    figs = [Figure("a", [1, 2, 3]), Figure("b", [5]), Figure("c")]
    assert best(figs).name == "b"
    assert best(figs, higher_is_better=False).name == "a"
    assert best([Figure("c")]) is None


def io_metric() -> Metric:
    m = Metric(1, "r1.randread4k", "4 KiB random read", "IOPS", targets=[
        Target("≥ 2× qsd", ["fc off", "fc on"], ">=", 2.0, ["qsd off", "qsd on"]),
        Target("of raw", ["fc off", "fc on"], ">=", 0.0, ["raw"], info=True)])
    m.figure("fc off").samples += [30_000, 32_000, 31_000]
    m.figure("fc on").samples += [90_000, 110_000, 100_000]
    m.figure("qsd off").samples += [14_000]
    m.figure("qsd on").samples += [50_000, 52_000]
    m.figure("raw").samples += [200_000]
    return m


def test_ratio_target_uses_best_of_each_side():
    v, info = io_metric().verdicts()
    assert v.numerator.name == "fc on" and v.denominator.name == "qsd on"
    assert v.value == pytest.approx(100_000 / 51_000)
    assert v.met is False and v.word == "NOT MET"
    assert info.word == "info" and info.value == pytest.approx(0.5)


def test_missing_figure_skips_instead_of_guessing():
    m = Metric(3, "r3", "nbd", "MB/s", targets=[Target("≥ 0.8× nbdcopy", ["fuseclone"], ">=", 0.8, ["nbdcopy"])])
    m.figure("nbdcopy").add(1000)
    m.skip(["fuseclone", "nbdcopy"], "no NBD source yet")
    assert m.figure("fuseclone").note == "no NBD source yet"
    assert m.figure("nbdcopy").note == ""  # measured figures keep no skip note
    (v,) = m.verdicts()
    assert v.met is None and v.value is None and v.word == "skipped" and "fuseclone" in v.note


def test_lower_is_better_and_absolute_targets():
    lat = Metric(4, "r4", "p99", "µs", False, targets=[Target("≤ 3× idle", ["hydrating"], "<=", 3.0, ["idle"])])
    lat.figure("idle").samples += [100, 120, 110]
    lat.figure("hydrating").samples += [300, 400, 350]
    (v,) = lat.verdicts()
    assert v.value == pytest.approx(350 / 110) and v.met is False
    t = Metric(5, "r5", "first use", "s", False, targets=[Target("< 2 s", ["16 GiB"], "<", 2.0)])
    t.figure("16 GiB").samples += [1.2, 1.5, 1.4]
    (v,) = t.verdicts()
    assert v.value == 1.4 and v.met is True and v.word == "MET"


def test_summary_chart_and_table():
    metrics = [io_metric()]
    rows = summary(metrics)
    assert [r["target"] for r in rows] == ["≥ 2× qsd"]  # info targets are not SPEC's
    (point,) = chart_points(metrics)
    assert point["line"] == 2.0 and point["value"] == pytest.approx(100_000 / 51_000)
    render_table(metrics, "t")  # builds without error
    json.dumps([m.to_dict() for m in metrics])  # the JSON report is serialisable


def test_absolute_target_charted_against_its_limit():
    m = Metric(6, "r6", "RSS", "MiB", False, targets=[Target("< 100 MiB", ["rss"], "<", 100)])
    m.figure("rss").add(45)
    (point,) = chart_points([m])
    assert point["value"] == pytest.approx(0.45) and point["line"] == 1.0 and point["lower_is_better"]


def test_human():
    assert human(None) == "—"
    assert human(12345, "IOPS") == "12.3k"
    assert human(1234.5, "MB/s") == "1234"
    assert human(3.14159, "s") == "3.14"


def test_parse_rows_and_profiles():
    assert parse_rows(None) == sorted(ROWS) == list(range(1, len(ROWS) + 1))
    assert parse_rows("1,3-5") == [1, 3, 4, 5]
    with pytest.raises(Exception):
        parse_rows("99")
    q, f = Profile.quick(), Profile.full()
    assert q.reps >= 3 and f.reps >= q.reps and f.r1_size >= q.r1_size


def test_a_leftover_server_is_one_naming_the_workdir_across_a_path_boundary():
    workdir = "/var/tmp/fcb-nt"
    daemon = ["/venv/bin/python", "-m", "fuseclone", "mount", f"{workdir}/src", f"{workdir}/dst"]
    nbdkit = ["nbdkit", "--unix", f"{workdir}/nbd.sock", "file", f"{workdir}/src"]
    assert is_leftover_server(daemon, workdir)
    assert is_leftover_server(nbdkit, workdir)
    assert is_leftover_server(["nbdkit", "-U", "-", "file", f"file={workdir}/src"], workdir)
    assert is_leftover_server(["/usr/lib/postgresql/15/bin/postgres", "-D", f"{workdir}/r10-qsd-fs/pgdata"],
                              workdir)
    # Another run's scratch directory shares the prefix; another run waits for the bench lock.
    assert not is_leftover_server(["nbdkit", "file", "/var/tmp/fcb-nt3/src"], workdir)
    assert not is_leftover_server(
        ["flock", "/tmp/fuseclone-bench.lock", "python", "-m", "benchmarks", "--workdir", workdir],
        workdir)
    assert not is_leftover_server(["sleep", f"{workdir}/x"], workdir)


def test_a_server_pg_ctl_cannot_stop_is_killed(tmp_path, monkeypatch):
    """qsd's export once corrupted the filesystem under a row 10 server: `pg_ctl stop` could not
    read its PID file, and the server kept the filesystem and its loop device busy."""
    import subprocess
    import sys
    import threading

    from benchmarks import postgres
    from benchmarks.system import BenchError

    datadir = str(tmp_path / "pgdata")
    servers: list[subprocess.Popen] = []

    def pg_ctl(self, program, *args, timeout=300):
        if args[-1] == "start":  # a stand-in for the postmaster, with its `-D DATADIR`
            server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                                       "-D", datadir])
            threading.Thread(target=server.wait, daemon=True).start()  # reaps it once killed
            servers.append(server)
            return ""
        raise BenchError('pg_ctl: could not open PID file "postmaster.pid": Bad message')

    monkeypatch.setattr(postgres.Cluster, "_as_user", pg_ctl)
    try:
        with pytest.raises(BenchError, match="Bad message"):
            with postgres.Cluster(datadir, "/nonexistent").running():
                assert postgres.processes_with_args("-D", datadir) == [servers[0].pid]
        assert servers[0].wait(timeout=15) is not None
        assert postgres.processes_with_args("-D", datadir) == []
    finally:
        for server in servers:
            server.kill()
