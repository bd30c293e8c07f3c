"""The README's first command: the demo clones a sample image from a slow source, uses it at
once, watches it hydrate, and leaves nothing behind."""

import glob
import os

from fuseclone import control
from tests.integration.conftest import fuseclone


def test_the_demo_runs_and_leaves_nothing_behind():
    before = set(glob.glob("/var/tmp/fuseclone-demo-*"))
    logs = set(glob.glob(os.path.join(control.RUNTIME_DIR, "*.log")))
    result = fuseclone("demo", "--size", "64M", "--rate", "256M", timeout=300)
    assert "demo complete" in result.stdout, result.stdout + result.stderr
    assert "files match" in result.stdout
    assert set(glob.glob("/var/tmp/fuseclone-demo-*")) == before
    assert set(glob.glob(os.path.join(control.RUNTIME_DIR, "*.log"))) == logs  # its mount's log too
    assert "fuseclone-demo" not in open("/proc/mounts").read()


def test_the_demo_refuses_options_it_cannot_run_with_in_one_line():
    """A sample too small for its files (mkfs.ext4 failed), a rate nbdkit refuses, a negative
    latency: each was a traceback after the work directory was made."""
    before = set(glob.glob("/var/tmp/fuseclone-demo-*"))
    for option, value, message in (("--size", "8M", "--size must be at least 16M"),
                                   ("--rate", "0", "--rate must be more than 0"),
                                   ("--latency-ms", "-1", "--latency-ms must be 0 or more")):
        result = fuseclone("demo", option, value, check=False)
        assert result.returncode == 1 and result.stderr.startswith(f"fuseclone: error: {message}")
        assert len(result.stderr.splitlines()) == 1, result.stderr
    assert set(glob.glob("/var/tmp/fuseclone-demo-*")) == before
