"""The daemon's log of an HTTP clone: httpx's line per request only at `--log-level debug`
(a clone hydrated at info would otherwise log every GET, into /run's memory by default)."""

from __future__ import annotations

import pytest

from tests.integration.conftest import fuseclone, rig, status_json  # noqa: F401

from .test_http import image, nginx  # noqa: F401


@pytest.mark.parametrize("level, logged", [("info", False), ("debug", True)])
def test_request_lines_are_logged_at_debug_level_only(rig, nginx, image, level, logged):
    rig.mount("--no-hydration", "--log-level", level, src=nginx.url("image.raw"))
    with open(rig.image, "rb") as f:
        assert f.read(4096) == image[:4096]
    log_file = status_json(rig.mnt)["log_file"]
    fuseclone("unmount", rig.mnt)
    rig.wait_unmounted()
    with open(log_file) as log:
        requests = [line for line in log if "HTTP Request: GET" in line]
    assert bool(requests) == logged, requests[:3]
