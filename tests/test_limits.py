"""The memory a mount may use, as cgroups bound it (fake hierarchies: the machines that run the
suite may lack either; tests/integration/test_environment.py uses a real one)."""

from fuseclone import limits
from fuseclone.fuse.mount import MountEntry


def _hierarchy(tmp_path, monkeypatch, fstype, options, proc_line, limits_by_level, stat_key):
    """A mounted hierarchy at tmp_path/cg holding this process's cgroup a/b, with a limit file
    per level as given (None: no file, as in a v2 root), each using 10 MiB."""
    root = tmp_path / "cg"
    level = root
    for name, limit in zip(["", "a", "b"], limits_by_level):
        level = level / name if name else level
        level.mkdir(exist_ok=True)
        if limit is not None:
            (level / limit[0]).write_text(limit[1] + "\n")
            (level / "memory.stat").write_text(f"file 999999999\n{stat_key} {10 << 20}\n")
    proc = tmp_path / "cgroup"
    proc.write_text(proc_line + "\n")
    monkeypatch.setattr(limits, "PROC_CGROUPS", str(proc))
    monkeypatch.setattr(limits, "mount_entries", lambda: [
        MountEntry(30, 1, "0:26", str(root), fstype, "cgroup", options)])
    return root


def test_the_tightest_cgroup_limit_above_a_process_bounds_its_memory(tmp_path, monkeypatch):
    """cgroup v2: a slice's memory.max of 200 MiB bounds a service without a limit of its own
    ("max"), less what the slice's processes hold (anon; page cache is reclaimable)."""
    root = _hierarchy(tmp_path, monkeypatch, "cgroup2", "rw", "0::/a/b",
                      [None, ("memory.max", str(200 << 20)), ("memory.max", "max")], "anon")
    assert limits.available_memory() == (190 << 20,
                                         f"left under the memory limit of cgroup {root}/a")


def test_cgroup_v1s_memory_controller_counts_too(tmp_path, monkeypatch):
    """v1 (a hybrid hierarchy, as on the machines here): unlimited is a huge number."""
    unlimited = ("memory.limit_in_bytes", str(2**63 - 4096))
    root = _hierarchy(tmp_path, monkeypatch, "cgroup", "rw,memory", "4:memory:/a/b",
                      [unlimited, unlimited, ("memory.limit_in_bytes", str(64 << 20))], "total_rss")
    assert limits.available_memory() == (54 << 20,
                                         f"left under the memory limit of cgroup {root}/a/b")


def test_without_a_limit_the_machines_available_memory_bounds_it(tmp_path, monkeypatch):
    _hierarchy(tmp_path, monkeypatch, "cgroup2", "rw", "0::/a/b",
               [None, ("memory.max", "max"), ("memory.max", "max")], "anon")
    available, bound = limits.available_memory()
    assert bound == "available" and available > 0
