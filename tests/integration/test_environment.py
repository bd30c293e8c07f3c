"""What a mount inherits from the shell or service manager that starts it: its limits
(`ulimit`: refused at mount with one line and nothing created, or raised where the hard limit
allows, instead of a daemon that fails after the image was handed out), its umask and its
working directory, and odd values typed for its options."""

import contextlib
import json
import mmap
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fuseclone.limits import MOUNT_OPEN_FILES
from tests.integration.conftest import daemon_pid, fuseclone, sh, status_json
from tests.sources_http.test_http import tls_nginx  # noqa: F401


def _with_open_files(soft, hard):
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return limit


def _mount(rig, soft, hard):
    rig.stack.callback(rig._force_unmount, rig.mnt)
    return sh(sys.executable, "-m", "fuseclone", "mount", rig.src, rig.dst, rig.meta, rig.mnt,
              check=False, timeout=60, preexec_fn=_with_open_files(soft, hard))


def test_too_few_open_files_is_refused_before_anything_is_made(rig, random_source):
    # ulimit -n 16 left a mount without a daemon (its mountinfo read failed after mount(2)),
    # and 18 a daemon that died after `mount` had said the image was ready.
    result = _mount(rig, 16, 16)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"fuseclone: error: at most 16 files may be open (ulimit -n): a mount needs "
        f"{MOUNT_OPEN_FILES} (ulimit -n {MOUNT_OPEN_FILES}, or LimitNOFILE={MOUNT_OPEN_FILES} "
        "in its systemd unit)"]
    assert not os.path.exists(rig.dst) and not os.path.exists(rig.meta)
    assert os.path.realpath(rig.mnt) not in open("/proc/mounts").read()


def test_a_low_soft_limit_is_raised_up_to_the_hard_one(rig, random_source):
    result = _mount(rig, 16, 4096)
    assert result.returncode == 0, result.stderr
    limits = open(f"/proc/{daemon_pid(rig.mnt)}/limits").read()
    soft, hard = next(line.split()[3:5] for line in limits.splitlines()
                      if line.startswith("Max open files"))
    assert (int(soft), int(hard)) == (MOUNT_OPEN_FILES, 4096)
    with open(rig.image, "rb") as image, open(rig.src, "rb") as src:
        assert image.read() == src.read()
    sh(sys.executable, "-m", "fuseclone", "unmount", rig.mnt)


def test_files_a_mount_creates_are_never_writable_by_others(rig, random_source, tmp_path):
    """Under `umask 000` the log came out 0666: any user could write lines into a root
    daemon's log (or fill its disk). META, DST, the log and the trace: written by the mount's
    user alone, whatever the umask."""
    log, trace = str(tmp_path / "clone.log"), str(tmp_path / "clone.trace")

    def umask_000():
        os.umask(0)

    rig.stack.callback(rig._force_unmount, rig.mnt)
    sh(sys.executable, "-m", "fuseclone", "mount", rig.src, rig.dst, rig.meta, rig.mnt,
       "--log-file", log, "--record-access", trace, timeout=60, preexec_fn=umask_000)
    modes = {path: os.stat(path).st_mode & 0o777 for path in (rig.meta, rig.dst, log, trace)}
    assert not [path for path, mode in modes.items() if mode & 0o022], modes
    sh(sys.executable, "-m", "fuseclone", "unmount", rig.mnt)


def test_a_region_size_of_zero_is_refused_not_taken_for_the_default(rig, random_source):
    result = sh(sys.executable, "-m", "fuseclone", "mount", rig.src, rig.dst, rig.meta, rig.mnt,
                "--region-size", "0", check=False, timeout=60)
    rig.stack.callback(rig._force_unmount, rig.mnt)
    assert (result.returncode, result.stderr) == (
        1, "fuseclone: error: region size 0 is not a power of two between 4 KiB and 1 GiB\n")
    assert not os.path.exists(rig.dst) and not os.path.exists(rig.meta)


def test_the_daemon_keeps_no_directory_busy(rig, random_source):
    """Mounted with relative paths from a directory on another filesystem (here a tmpfs), the
    daemon stayed in it: `umount` of that filesystem said "target is busy" for the mount's life.
    Its --on-complete command still runs where the mount command ran."""
    work = rig.tmp / "work"
    work.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", work)
    rig.stack.callback(lambda: sh("umount", "-l", work, check=False))
    hook = work / "hook"
    hook.write_text("#!/bin/sh\npwd > ../hook-ran\n")
    hook.chmod(0o755)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    rig.stack.callback(rig._force_unmount, rig.mnt)
    sh(sys.executable, "-m", "fuseclone", "mount", "../src.img", "../dst.img", "../clone.meta",
       "../mnt", "--on-complete", "./hook", cwd=work, env=env, timeout=60)
    sh(sys.executable, "-m", "fuseclone", "wait", rig.mnt, "--timeout", "60")
    deadline = time.monotonic() + 30
    while not (rig.tmp / "hook-ran").exists():
        assert time.monotonic() < deadline, "the --on-complete command did not run"
        time.sleep(0.05)
    assert (rig.tmp / "hook-ran").read_text().strip() == str(work)
    assert os.readlink(f"/proc/{daemon_pid(rig.mnt)}/cwd") == "/"
    sh("umount", work)  # not busy
    with open(rig.image, "rb") as image, open(rig.src, "rb") as src:
        assert image.read() == src.read()
    sh(sys.executable, "-m", "fuseclone", "unmount", rig.mnt)


def test_a_removed_working_directory_is_one_line(rig, tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    code = (f"import os, sys; os.chdir({str(gone)!r}); os.rmdir({str(gone)!r}); "
            "sys.argv = ['fuseclone', 'mount', 'src.img', 'dst.img', 'clone.meta', 'mnt']; "
            "from fuseclone.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert (result.returncode, result.stderr) == (
        1, "fuseclone: error: the current directory was removed: give absolute paths, or cd "
           "elsewhere\n")



NOT_UTF8 = b"\xff\xfe"  # a Latin-1 name, as an old USB stick's label gives

# Run in a mount namespace of its own: a path that is not UTF-8 in the host's mount table
# would trip up whatever else reads it meanwhile (other test runs on this machine).
IN_OWN_NAMESPACE = r"""
set -e
fuseclone() { "$PYTHON" -m fuseclone "$@"; }
trap 'fuseclone unmount "$MNT" >/dev/null 2>&1 || true; umount -l "$STICK" 2>/dev/null || true' EXIT
mkdir "$STICK" "$MNT"
mount -t tmpfs -o size=1M tmpfs "$STICK"
fuseclone mount "$SRC" "$DST" "$META" "$MNT" --no-hydration --name "$NAME"
cmp "$SRC" "$MNT/$NAME"
fuseclone status "$MNT" --json | grep -q '"metadata"'
fuseclone list | grep -q "/mnt"
fuseclone unmount "$MNT"
echo done
"""


def test_paths_that_are_not_utf8(rig, random_source):
    """Any filesystem mounted at such a path on the host (an automounted stick) made every
    command that reads the mount table end in a UnicodeDecodeError: mount, unmount, list; and
    a META or image named so reached str.encode (the log's name, mount(2)'s fsname)."""
    def path(stem):
        return os.fsencode(str(rig.tmp)) + b"/" + stem + NOT_UTF8

    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=os.getcwd(), SRC=rig.src,
               STICK=path(b"stick"), MNT=path(b"mnt"), META=path(b"meta"), DST=path(b"dst"),
               NAME=b"image" + NOT_UTF8)
    env = {key: os.fsdecode(value) for key, value in env.items()}
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             IN_OWN_NAMESPACE], env=env, capture_output=True, timeout=120)
    image = path(b"mnt") + b"/image" + NOT_UTF8
    assert (result.returncode, result.stdout) == (0, image + b"\ndone\n"), result.stderr


PIDS_CGROUPS = "/sys/fs/cgroup/pids"  # cgroup v1's pids hierarchy, as on these machines


@pytest.fixture
def few_tasks(tmp_path):
    """A pids cgroup allowing 8 tasks (threads count): systemd's TasksMax=8."""
    if not os.path.isdir(PIDS_CGROUPS):
        pytest.skip("needs cgroup v1's pids controller")
    group = os.path.join(PIDS_CGROUPS, f"fuseclone-test-{os.getpid()}-{tmp_path.name}")
    os.mkdir(group)
    try:
        with open(os.path.join(group, "pids.max"), "w") as f:
            f.write("8")
        yield group
    finally:
        _remove_cgroup(group)


def _remove_cgroup(group):
    deadline = time.monotonic() + 10
    while True:  # a group goes once its last task has
        try:
            os.rmdir(group)
            return
        except OSError:
            assert time.monotonic() < deadline, f"{group} still has tasks"
            time.sleep(0.05)


def test_a_daemon_refused_threads_serves_on(rig, random_source, few_tasks):
    """Under TasksMax=8 the daemon said the image was ready, then died on its first
    hydration copy ("can't start new thread")."""
    def join():
        with open(os.path.join(few_tasks, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    rig.stack.callback(rig._force_unmount, rig.mnt)
    sh(sys.executable, "-m", "fuseclone", "mount", rig.src, rig.dst, rig.meta, rig.mnt,
       timeout=60, preexec_fn=join)
    data = os.urandom(1 << 20)
    with open(rig.image, "r+b") as image:
        image.seek(8 << 20)
        image.write(data)
        os.fsync(image.fileno())
    fd = os.open(rig.image, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 1 << 20)
        read = [os.preadv(fd, [buf], offset) for offset in range(0, 32 << 20, 1 << 20)]
        assert read == [1 << 20] * 32
    finally:
        os.close(fd)
    sh(sys.executable, "-m", "fuseclone", "wait", rig.mnt, "--timeout", "60")
    events = open(os.path.join(few_tasks, "pids.events")).read()
    assert events.split() != ["max", "0"], "no thread was refused: the test tests nothing"
    sh(sys.executable, "-m", "fuseclone", "unmount", rig.mnt)
    want = bytearray(open(rig.src, "rb").read())
    want[8 << 20:9 << 20] = data
    assert open(rig.dst, "rb").read(len(want)) == want


MEMORY_CGROUPS = "/sys/fs/cgroup/memory"  # cgroup v1's memory hierarchy, as on these machines


@pytest.fixture
def memory_cgroup(tmp_path):
    """A memory cgroup of its own (systemd's MemoryMax= sets its limit); cgroup v2 where the
    root delegates memory, else v1's. Yields (its directory, its limit's file)."""
    if os.path.isdir(MEMORY_CGROUPS):
        root, limit = MEMORY_CGROUPS, "memory.limit_in_bytes"
    elif "memory" in _read("/sys/fs/cgroup/cgroup.subtree_control").split():
        root, limit = "/sys/fs/cgroup", "memory.max"
    else:
        pytest.skip("no memory cgroup controller to use")
    group = os.path.join(root, f"fuseclone-test-{os.getpid()}-{tmp_path.name}")
    os.mkdir(group)
    try:
        yield group, os.path.join(group, limit)
    finally:
        _remove_cgroup(group)


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _mount_in(group, rig, *options):
    """`fuseclone mount` of a 1 TiB sparse source (34 MiB of bitmaps in 4 KiB regions) run
    inside GROUP; its result."""
    with open(rig.src, "wb") as f:
        f.truncate(1 << 40)

    def join():
        with open(os.path.join(group, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    rig.stack.callback(rig._force_unmount, rig.mnt)
    return sh(sys.executable, "-m", "fuseclone", "mount", rig.src, rig.dst, rig.meta, rig.mnt,
              "--no-hydration", *options, check=False, timeout=60, preexec_fn=join)


def test_a_clone_beyond_its_cgroups_memory_limit_is_refused_with_one_line(memory_cgroup, rig):
    """Under MemoryMax=48M, with the machine's memory plentiful, a 1 TiB clone was mounted and
    its daemon OOM-killed as it allocated its bitmaps: "exited before the image was ready" at
    best, a dead mount at worst. Now it is refused, naming the limit, before anything is
    created."""
    group, limit = memory_cgroup
    with open(limit, "w") as f:
        f.write(str(48 << 20))
    result = _mount_in(group, rig)
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.splitlines()
    assert f"memory limit of cgroup {group}" in line and "--region-size" in line, line
    assert not os.path.exists(rig.dst) and not os.path.exists(rig.meta)
    assert rig.mnt not in open("/proc/mounts").read()


def test_an_access_traces_bitmaps_count_against_the_memory_limit(memory_cgroup, rig):
    """--record-access holds two more bitmaps of one bit per region (64 MiB for 1 TiB in 4 KiB
    regions): under a limit the clone fits in without them, recording is refused."""
    group, limit = memory_cgroup
    with open(limit, "w") as f:
        f.write(str(112 << 20))
    result = _mount_in(group, rig, "--record-access", str(rig.tmp / "trace"))
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.splitlines()
    assert "98.0 MiB of memory for its bitmaps" in line and f"cgroup {group}" in line, line
    assert not os.path.exists(rig.dst) and not os.path.exists(rig.meta)
    result = _mount_in(group, rig)
    assert result.returncode == 0, result.stderr
    fuseclone("unmount", rig.mnt)


@pytest.mark.parametrize("url,says", [
    ("nbd://[::1/vm", "not a valid NBD URL (Invalid IPv6 URL)"),
    ("https://user:secret@[::1/vm.img", "not a valid URL (Invalid port: ':1')"),
])
def test_a_url_that_does_not_parse_is_one_line(rig, url, says):
    """An unclosed '[' ended the daemon in a ValueError ("the mount process exited (1)
    before the image was ready; see LOG")."""
    result = sh(sys.executable, "-m", "fuseclone", "mount", url, rig.dst, rig.meta, rig.mnt,
                check=False, timeout=60)
    rig.stack.callback(rig._force_unmount, rig.mnt)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("fuseclone: error: ") and line.endswith(says), line
    assert "secret" not in line
    assert not os.path.exists(rig.dst) and not os.path.exists(rig.meta)


def test_an_nbd_socket_named_from_the_callers_directory(rig, random_source):
    """?socket= relative to where `mount` ran, although the daemon leaves that directory."""
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed")
    server = subprocess.Popen(["nbdkit", "-f", "-r", "-U", "nbd.sock", "file", rig.src],
                              cwd=rig.tmp, stderr=subprocess.DEVNULL)
    rig.stack.callback(server.wait)
    rig.stack.callback(server.terminate)
    deadline = time.monotonic() + 10
    while not (rig.tmp / "nbd.sock").exists():
        assert time.monotonic() < deadline, "nbdkit did not start"
        time.sleep(0.05)
    rig.stack.callback(rig._force_unmount, rig.mnt)
    sh(sys.executable, "-m", "fuseclone", "mount", "nbd+unix:///?socket=nbd.sock", "dst.img",
       "clone.meta", "mnt", "--no-hydration", cwd=rig.tmp,
       env=dict(os.environ, PYTHONPATH=os.getcwd()), timeout=60)
    assert status_json(rig.mnt)["source"] == f"nbd+unix:///?socket={rig.tmp}/nbd.sock"
    with open(rig.image, "rb") as image, open(rig.src, "rb") as src:
        assert image.read(1 << 20) == src.read(1 << 20)
    sh(sys.executable, "-m", "fuseclone", "unmount", rig.mnt)


def test_a_relative_ssl_cert_file_is_taken_from_the_callers_directory(rig, tls_nginx):
    """SSL_CERT_FILE=cert.pem is read whenever the daemon connects, and the daemon leaves
    the caller's directory: the command makes it absolute first."""
    from tests.sources_http.test_http import write_file

    data = write_file(tls_nginx.root / "image.raw", 300 << 10, seed=4)
    env = dict(os.environ, PYTHONPATH=os.getcwd(), SSL_CERT_FILE="cert.pem")
    env.pop("SSL_CERT_DIR", None)
    rig.stack.callback(rig._force_unmount, rig.mnt)
    sh(sys.executable, "-m", "fuseclone", "mount", tls_nginx.tls_url("image.raw"), rig.dst,
       rig.meta, rig.mnt, "--no-hydration", cwd=tls_nginx.tmp, env=env, timeout=60)
    with open(rig.image, "rb") as image:
        assert image.read() == data
    sh(sys.executable, "-m", "fuseclone", "unmount", rig.mnt)


def test_the_soft_cpu_limit_stops_the_mount_cleanly(rig, random_source):
    """`ulimit -S -t` (systemd's LimitCPU=): SIGXCPU's default action killed the daemon, with
    the writes the kernel cached for it, and left a stale mount. It now stops as on SIGTERM."""
    def cpu_limit():
        resource.setrlimit(resource.RLIMIT_CPU, (1, 120))

    rig.stack.callback(rig._force_unmount, rig.mnt)
    sh(sys.executable, "-m", "fuseclone", "mount", rig.src, rig.dst, rig.meta, rig.mnt,
       "--no-hydration", timeout=60, preexec_fn=cpu_limit)
    log = status_json(rig.mnt)["log_file"]
    cached = os.urandom(64 << 10)
    with open(rig.image, "r+b") as image:  # no fsync: the kernel keeps it for the daemon
        image.seek(4 << 20)
        image.write(cached)
    buf = mmap.mmap(-1, 4096)
    deadline = time.monotonic() + 60
    while os.path.realpath(rig.mnt) in open("/proc/mounts").read():  # burn the daemon's CPU
        assert time.monotonic() < deadline, "the daemon did not reach its CPU limit"
        try:
            fd = os.open(rig.image, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            break  # unmounted meanwhile
        try:
            for offset in range(0, 32 << 20, 4096):
                os.preadv(fd, [buf], offset)
        except OSError:
            pass
        with contextlib.suppress(OSError):  # ENOTCONN once the stop detached it lazily
            os.close(fd)
    assert "received SIGXCPU: committing and unmounting" in open(log).read()
    with open(rig.dst, "rb") as dst:
        dst.seek(4 << 20)
        assert dst.read(len(cached)) == cached
    checked = sh(sys.executable, "-m", "fuseclone", "check", rig.meta).stdout
    assert "clean" in checked


@pytest.mark.parametrize("stop", ["unmount", "SIGTERM"])
def test_a_directory_above_the_mountpoint_renamed(rig, random_source, stop):
    """`mv /srv/clones /srv/clones.old` under a live clone: `unmount` of the new path was
    refused ("META was moved?"), and SIGTERM lost the kernel's cached writes (the image's old
    path was gone) and left a mount without a daemon."""
    before, after = rig.tmp / "a", rig.tmp / "b"
    before.mkdir()
    mnt = before / "mnt"
    mnt.mkdir()
    rig.stack.callback(rig._force_unmount, str(after / "mnt"))
    fuseclone("mount", rig.src, rig.dst, rig.meta, mnt, "--no-hydration")
    pid = daemon_pid(str(mnt))
    cached = os.urandom(64 << 10)
    with open(mnt / "image", "r+b") as image:  # no fsync: the kernel keeps it
        image.seek(1 << 20)
        image.write(cached)
    os.rename(before, after)
    moved = str(after / "mnt")
    listed = json.loads(fuseclone("list", "--json").stdout)
    assert [c["image"] for c in listed if c["metadata"] == rig.meta] == [f"{moved}/image"]
    if stop == "unmount":
        fuseclone("unmount", moved)
    else:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while moved in open("/proc/mounts").read() or os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, "the clone did not stop, or left its mount"
        time.sleep(0.05)
    with open(rig.dst, "rb") as dst:
        dst.seek(1 << 20)
        assert dst.read(len(cached)) == cached
