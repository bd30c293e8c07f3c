"""Other versions of fuseclone and its packages: the packages changed under a running mount (pip
upgrading them while clones live for days)."""

import os
import shutil

import h11

from tests.integration.conftest import status_json
from tests.integration.test_operating import free_port, scrape


def test_a_scrape_after_h11_was_replaced_under_the_mount_is_answered(rig, random_source,
                                                                      monkeypatch):
    """The metrics endpoint imported h11 at its first scrape: with the package replaced under a
    running mount by then (pip upgrading it: removed, then written again), the import failed
    and took the whole mount down with it."""
    shadow = rig.tmp / "site"
    shutil.copytree(os.path.dirname(h11.__file__), shadow / "h11")
    port = free_port()
    monkeypatch.setenv("PYTHONPATH", str(shadow))  # the daemon's h11 is this copy
    rig.mount("--no-hydration", "--metrics-listen", f"127.0.0.1:{port}")
    monkeypatch.delenv("PYTHONPATH")
    (shadow / "h11" / "__init__.py").write_text('raise ImportError("h11 half installed")\n')
    assert "fuseclone_up" in scrape(port)
    assert status_json(rig.mnt)["hydrated_regions"] == 0
