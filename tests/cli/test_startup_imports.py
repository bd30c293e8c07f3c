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


def _loaded_after(code: str, names: tuple[str, ...]) -> list[str]:
    """Which of NAMES a fresh interpreter has imported after running CODE."""
    probe = f"import sys\n{code}\nprint(' '.join(m for m in {names!r} if m in sys.modules))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.split()


# Only a mount serves the image: the commands that ask one (status, wait, unmount, list) or
# read META need none of this.
ONLY_THE_MOUNT_NEEDS = ("trio", "fuseclone.engine", "fuseclone.control_server",
                        "fuseclone.fuse.codec", "fuseclone.hydrator", "fuseclone.metrics")


def test_the_cli_imports_only_what_every_command_needs():
    assert _loaded_after("import fuseclone.cli", ONLY_THE_MOUNT_NEEDS) == []


def test_a_mount_without_metrics_listen_does_not_import_the_metrics_server():
    parse = ("from fuseclone.cli import mount\n"
             "mount.make_context('mount', ['src.img', 'dst.img', 'clone.meta', 'mnt'])")
    assert _loaded_after(parse, ("fuseclone.metrics",)) == []


def test_machine_readable_status_does_not_import_rich(tmp_path):
    """`status --json` and `--dmsetup` are for scripts, which run them often: no rich."""
    meta = tmp_path / "clone.meta"
    create = ("from fuseclone.metadata import Metadata\nfrom fuseclone.regions import Geometry\n"
              f"Metadata.create({str(meta)!r}, Geometry(1 << 20, 4096), {{}}).close()")
    subprocess.run([sys.executable, "-c", create], check=True)
    for form in ("--json", "--dmsetup"):
        run = ("import contextlib, io\nfrom fuseclone.cli import main\n"
               "with contextlib.redirect_stdout(io.StringIO()):\n"
               f"    main(['status', {str(meta)!r}, {form!r}], standalone_mode=False)")
        assert _loaded_after(run, ("rich",)) == []
