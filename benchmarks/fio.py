"""Running fio and reading its JSON output (`--output-format=json`).

`FioJob` is one job's options, `fio_command` turns it into argv, `parse_fio_json` turns fio's
output into `FioResult`s (pure: the smoke test feeds it a saved real run), `run_fio` does both.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field


@dataclass
class FioJob:
    filename: str
    rw: str  # randread, randwrite, read, write, randrw
    bs: str = "4k"
    iodepth: int = 16
    runtime: float = 5.0
    ramp_time: float = 1.0
    ioengine: str = "libaio"
    direct: bool = True
    size: str | None = None  # limit the job to the first SIZE bytes of the file
    offset: str | None = None
    name: str = "bench"
    extra: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        return (f"fio {self.rw} bs={self.bs} iodepth={self.iodepth} {self.ioengine} "
                f"direct={int(self.direct)}")


def fio_command(job: FioJob) -> list[str]:
    cmd = ["fio", f"--name={job.name}", f"--filename={job.filename}", f"--rw={job.rw}",
           f"--bs={job.bs}", f"--iodepth={job.iodepth}", f"--ioengine={job.ioengine}",
           f"--direct={int(job.direct)}", f"--runtime={job.runtime:g}s", "--time_based",
           f"--ramp_time={job.ramp_time:g}s", "--numjobs=1", "--group_reporting",
           "--percentile_list=50:90:99:99.9", "--output-format=json"]
    if job.size:
        cmd.append(f"--size={job.size}")
    if job.offset:
        cmd.append(f"--offset={job.offset}")
    return cmd + job.extra


@dataclass
class FioSide:
    """One direction (read or write) of a fio job."""

    iops: float
    bw_bytes: float  # bytes per second
    io_bytes: int
    clat_mean_us: float
    clat_percentiles_us: dict[str, float]  # "50", "90", "99", "99.9" -> microseconds

    @property
    def mb_per_s(self) -> float:
        return self.bw_bytes / 1e6

    def percentile(self, p: float) -> float | None:
        for key, value in self.clat_percentiles_us.items():
            if abs(float(key) - p) < 1e-9:
                return value
        return None


@dataclass
class FioResult:
    name: str
    read: FioSide
    write: FioSide
    error: int
    runtime_ms: int
    sync: FioSide | None = None  # the fsyncs of --fsync=N (latencies only), if any

    def side(self, rw: str) -> FioSide:
        """The side a job of kind RW exercised ('randwrite' -> write)."""
        return self.write if "write" in rw and "rw" not in rw else self.read


def _side(doc: dict, latency: str = "clat_ns") -> FioSide:
    clat = doc.get(latency) or {}
    pct = clat.get("percentile") or {}
    return FioSide(
        iops=float(doc.get("iops", 0.0)),
        bw_bytes=float(doc.get("bw_bytes", doc.get("bw", 0) * 1024)),
        io_bytes=int(doc.get("io_bytes", 0)),
        clat_mean_us=float(clat.get("mean", 0.0)) / 1000,
        clat_percentiles_us={f"{float(k):g}": float(v) / 1000 for k, v in pct.items()},
    )


def parse_fio_json(text: str) -> list[FioResult]:
    """fio's JSON output (possibly preceded by warning lines) -> one FioResult per job."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in fio's output")
    doc = json.loads(text[start:])
    results = []
    for job in doc.get("jobs", []):
        results.append(FioResult(name=job.get("jobname", "?"), read=_side(job.get("read", {})),
                                 write=_side(job.get("write", {})), error=int(job.get("error", 0)),
                                 runtime_ms=int(job.get("job_runtime", 0)),
                                 sync=_side(job["sync"], "lat_ns") if job.get("sync", {}).get("total_ios") else None))
    if not results:
        raise ValueError("fio's JSON output has no jobs")
    return results


class FioError(RuntimeError):
    pass


def run_fio(job: FioJob, timeout: float | None = None) -> FioResult:
    cmd = fio_command(job)
    timeout = timeout or (job.runtime + job.ramp_time + 60)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise FioError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    result = parse_fio_json(proc.stdout)[0]
    if result.error:
        raise FioError(f"fio job failed with error {result.error}: {proc.stderr.strip()[-500:]}")
    return result
