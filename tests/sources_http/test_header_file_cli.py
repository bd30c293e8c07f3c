"""`mount --http-header-file` through the CLI against nginx requiring a bearer token: the token
rotates while the clone is mounted, and no token appears in META, status, the log or argv."""

from __future__ import annotations

import hashlib

from tests.integration.conftest import (assert_secret_absent, fuseclone, rig,  # noqa: F401
                                        sha256, status_json)

from .test_http import FIRST_TOKEN, SECOND_TOKEN, image, nginx, write_header_file  # noqa: F401


def test_a_token_rotated_while_mounted_is_picked_up_and_never_shown(rig, nginx, image, tmp_path):
    headers = write_header_file(tmp_path / "headers", FIRST_TOKEN)
    url = nginx.url("bearer/image.raw")
    rig.mount("--no-hydration", "--http-header-file", headers, "--log-level", "debug", src=url)
    with open(rig.image, "rb") as f:
        assert f.read(4096) == image[:4096]
    (nginx.tmp / "rotated").touch()
    write_header_file(tmp_path / "headers", SECOND_TOKEN)
    fuseclone("message", rig.mnt, "enable_hydration")
    fuseclone("wait", rig.mnt, "--timeout", "60")
    status = status_json(rig.mnt)
    assert status["hydrated_regions"] == status["total_regions"] and not status["hydration_error"]
    assert sha256(rig.dst, len(image)) == hashlib.sha256(image).hexdigest()
    for token in (FIRST_TOKEN, SECOND_TOKEN):
        assert_secret_absent(token, rig, status)
