"""Start-up counts in every short clone (hydration of 512 MiB from NBD takes ~0.6 s, the
mount's start-up ~0.18 s): serving a local file imports no other source's client."""

import subprocess
import sys

# What `mount` of a local file imports: the CLI, the daemon, the FUSE layer, the local source.
MOUNT_OF_A_FILE = ("fuseclone.cli", "fuseclone.daemon", "fuseclone.fuse.session",
                   "fuseclone.fuse.fs", "fuseclone.sources.local")
NOT_NEEDED = ("httpx", "h11", "botocore", "fuseclone.sources.http", "fuseclone.sources.s3",
              "fuseclone.sources.nbd", "fuseclone.sources.nbd.wire", "rich", "fuseclone.demo",
              "fuseclone.checker")


def test_a_local_mount_imports_no_remote_source_client():
    code = (f"import sys\nfor name in {MOUNT_OF_A_FILE!r}: __import__(name)\n"
            f"print(' '.join(m for m in {NOT_NEEDED!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    assert loaded == []
