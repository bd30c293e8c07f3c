"""Session-wide set-up. The fuseclone commands the tests run keep their control sockets and
default logs in a runtime directory of this session, removed at its end, not in /run/fuseclone
(and their list of startup files in a cache directory of the session, not in ~/.cache):
set before anything imports fuseclone.control, and inherited by every process a test starts."""

import os
import shutil
import tempfile

RUNTIME_DIR = tempfile.mkdtemp(prefix="fuseclone-tests-run-")
os.environ["FUSECLONE_RUNTIME_DIR"] = RUNTIME_DIR
CACHE_DIR = tempfile.mkdtemp(prefix="fuseclone-tests-cache-")
os.environ["XDG_CACHE_HOME"] = CACHE_DIR

pytest_plugins = ["tests.engine.conftest"]


def pytest_unconfigure(config):
    shutil.rmtree(RUNTIME_DIR, ignore_errors=True)
    shutil.rmtree(CACHE_DIR, ignore_errors=True)
