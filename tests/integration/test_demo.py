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
