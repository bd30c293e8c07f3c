"""Spike measurement (not part of the package): cold 4 KiB random reads through dio loop devices
on a raw copy, on spikes/uring_fuse.py's mounts (classic, uring) and on a fuseclone mount.

    python spikes/uring_bench.py --rounds 3 raw=FILE classic=MNT:PID uring=MNT:PID fuseclone=MNT:PID

Each NAME=PATH[:PID] is a contender: a file to put a `losetup --direct-io=on` device on, and the
pid of the daemon serving it (its CPU per request is reported). Each round takes
/tmp/fuseclone-bench.lock (flock(2), as `flock` does), rotates the contenders' order, and runs
for each iodepth and contender: sync, drop caches, `fio --rw=randread --bs=4k --ioengine=libaio
--direct=1 --runtime=5s --time_based --ramp_time=1s` on the loop device. With `--job fsync`
each contender's file is an ext4 image: it is mounted from its loop device and each sample is
row 7's job (FSYNC_JOB) on it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import json
import os
import signal
import statistics
import subprocess
import sys
import time

LOCK = "/tmp/fuseclone-bench.lock"
TICK = os.sysconf("SC_CLK_TCK")


def daemon_cpu(pid: int | None) -> tuple[float, float]:
    """(user, system) seconds of all the daemon's threads so far."""
    if pid is None:
        return 0.0, 0.0
    user = system = 0
    for path in glob.glob(f"/proc/{pid}/task/*/stat"):
        with contextlib.suppress(FileNotFoundError):
            fields = open(path).read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
    return user / TICK, system / TICK


def loop_requests(device: str) -> int:
    """Reads + writes + flushes the loop device completed (each one FUSE request or more)."""
    with open(f"/sys/block/{os.path.basename(device)}/stat") as f:
        fields = [int(x) for x in f.read().split()]
    return fields[0] + fields[4] + (fields[15] if len(fields) > 15 else 0)


def cpu_idle() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields)


def run_fio(device: str, iodepth: int, runtime: int) -> float:
    out = subprocess.run(
        ["fio", "--name=cold", f"--filename={device}", "--rw=randread", "--bs=4k",
         "--ioengine=libaio", "--direct=1", f"--iodepth={iodepth}", f"--runtime={runtime}s",
         "--time_based", "--ramp_time=1s", "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"]


# row 7's job (benchmarks/rows.py synced_writes_job), full profile: 5 s + 1 s ramp
FSYNC_JOB = ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--ioengine=psync", "--size=64M",
             "--fsync=1", "--numjobs=4", "--group_reporting"]


def run_fsync_fio(directory: str, runtime: float, ramp: float = 1) -> float:
    out = subprocess.run(
        ["fio", "--name=r7", f"--filename={directory}/fio.dat", *FSYNC_JOB, f"--runtime={runtime}",
         f"--ramp_time={ramp}", "--time_based", "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]["write"]["iops"]


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def sample(name: str, device: str, pid: int | None, iodepth: int, runtime: int,
           directory: str | None) -> dict:
    if directory is None:
        drop_caches()
    else:
        os.sync()
    cpu0, reads0, idle0 = daemon_cpu(pid), loop_requests(device), cpu_idle()
    if directory is None:
        iops = run_fio(device, iodepth, runtime)
    else:
        iops = run_fsync_fio(directory, runtime)
    cpu1, reads1, idle1 = daemon_cpu(pid), loop_requests(device), cpu_idle()
    requests = max(reads1 - reads0, 1)
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    return {"name": name, "iodepth": iodepth, "iops": round(iops),
            "cpu_us": round((user + system) / requests * 1e6, 1),
            "sys_us": round(system / requests * 1e6, 1),
            "idle": round((idle1[0] - idle0[0]) / max(idle1[1] - idle0[1], 1), 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=5)
    parser.add_argument("--iodepths", default="16,1")
    parser.add_argument("--out", help="append the samples as JSON lines here")
    parser.add_argument("--job", choices=("randread", "fsync"), default="randread",
                        help="fsync: each contender holds an ext4 image, mounted on its loop device")
    parser.add_argument("contenders", nargs="+")
    args = parser.parse_args()
    # `timeout` sends SIGTERM: leave through the finally below, which detaches the loop devices
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    contenders = []
    for spec in args.contenders:
        name, _, rest = spec.partition("=")
        path, _, pid = rest.partition(":")
        contenders.append((name, path, int(pid) if pid else None))
    devices = {}
    try:
        for name, path, _ in contenders:
            devices[name] = subprocess.run(["losetup", "--direct-io=on", "-f", "--show", path],
                                           check=True, capture_output=True, text=True).stdout.strip()
        directories = dict.fromkeys(devices)
        if args.job == "fsync":
            args.iodepths = "1"
            for name in devices:
                directories[name] = f"/tmp/uring-spike-fs-{name}"
                os.makedirs(directories[name], exist_ok=True)
                subprocess.run(["mount", devices[name], directories[name]], check=True)
                run_fsync_fio(directories[name], 1, 0)  # lay the file out
        for name, _, _ in contenders:  # read through once (the loop device's first touch)
            subprocess.run(["dd", f"if={devices[name]}", "of=/dev/null", "bs=1M", "count=64",
                            "iflag=direct", "status=none"], check=True)
        samples = []
        for round_no in range(args.rounds):
            order = contenders[round_no % len(contenders):] + contenders[:round_no % len(contenders)]
            with open(LOCK, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                for iodepth in (int(x) for x in args.iodepths.split(",")):
                    for name, _, pid in order:
                        s = sample(name, devices[name], pid, iodepth, args.runtime, directories[name])
                        s["round"] = round_no
                        samples.append(s)
                        print(json.dumps(s), flush=True)
                        if args.out:
                            with open(args.out, "a") as f:
                                f.write(json.dumps(s) + "\n")
            time.sleep(2)  # let others take the lock between rounds
        report(samples, [c[0] for c in contenders])
    finally:
        for name in devices:
            directory = f"/tmp/uring-spike-fs-{name}"
            if args.job == "fsync" and os.path.ismount(directory):
                subprocess.run(["umount", directory], check=False)
        for device in devices.values():
            subprocess.run(["losetup", "-d", device], check=False)


def report(samples: list[dict], names: list[str]) -> None:
    for iodepth in sorted({s["iodepth"] for s in samples}, reverse=True):
        raw_by_round = {s["round"]: s["iops"] for s in samples
                        if s["name"] == names[0] and s["iodepth"] == iodepth}
        print(f"iodepth {iodepth}:")
        for name in names:
            mine = [s for s in samples if s["name"] == name and s["iodepth"] == iodepth]
            ratios = [s["iops"] / raw_by_round[s["round"]] for s in mine]
            print(f"  {name:10} IOPS {[s['iops'] for s in mine]} median {statistics.median(s['iops'] for s in mine):.0f}"
                  f"  /{names[0]} {[round(r, 2) for r in ratios]} median {statistics.median(ratios):.2f}"
                  f"  CPU/req us {[s['cpu_us'] for s in mine]} (sys {[s['sys_us'] for s in mine]})"
                  f"  idle {[s['idle'] for s in mine]}")


if __name__ == "__main__":
    main()
