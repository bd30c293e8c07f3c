"""How a live clone stops, and what it leaves alone while it does: filesystems mounted over
its mountpoint or there after it, a switch-over hook that unmounts it, a terminal that closes,
a caller whose standard descriptors are closed."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fuseclone.fuse.mount import unmount
from tests.engine.conftest import make_source_file
from tests.integration.conftest import MiB, Rig, daemon_pid, fuseclone, sh, status_json


def wait_gone(pid, timeout=30):
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and not _zombie(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.05)


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def mounts_at(path):
    real = os.path.realpath(path)
    return [line.split()[2] for line in open("/proc/mounts") if line.split()[1] == real]


def tmpfs_over(rig, where):
    """A tmpfs mounted at WHERE holding one file; unmounted at the end of the test."""
    sh("mount", "-t", "tmpfs", "tmpfs", where)
    rig.stack.callback(lambda: sh("umount", "-l", where, check=False))
    with open(os.path.join(where, "keep"), "w") as f:
        f.write("not fuseclone's")


def test_a_filesystem_mounted_over_the_clone_is_never_unmounted_by_it(rig, random_source):
    rig.mount("--no-hydration")
    pid = daemon_pid(rig.mnt)
    tmpfs_over(rig, rig.mnt)

    result = fuseclone("unmount", rig.mnt, "--timeout", "5", check=False)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "mounted over" in result.stderr
    os.kill(pid, signal.SIGTERM)  # stops the daemon, and leaves the tmpfs alone
    wait_gone(pid)
    assert mounts_at(rig.mnt) == ["fuse.fuseclone", "tmpfs"]
    assert open(os.path.join(rig.mnt, "keep")).read() == "not fuseclone's"

    result = fuseclone("unmount", "--lazy", rig.mnt, check=False)  # would detach the tmpfs
    assert result.returncode == 1 and "mounted over" in result.stderr
    sh("umount", rig.mnt)
    fuseclone("unmount", "--lazy", rig.mnt)  # the daemon is gone: nothing answers
    assert mounts_at(rig.mnt) == []
    fuseclone("check", rig.meta, "--src", rig.src, "--dst", rig.dst, "--verify")


def test_a_clone_detached_behind_its_back_leaves_the_next_mount_there_alone(rig, random_source):
    rig.mount("--no-hydration")
    pid = daemon_pid(rig.mnt)
    loop = rig.losetup()  # keeps the detached mount, and its daemon, alive
    sh("umount", "-l", rig.mnt)
    fuseclone("mount", rig.src, rig.tmp / "dst2.img", rig.tmp / "two.meta", rig.mnt, "--no-hydration")
    rig.stack.callback(rig._force_unmount, rig.mnt)

    sh("losetup", "-d", loop)  # the first clone's mount goes, and its daemon stops
    wait_gone(pid)
    assert mounts_at(rig.mnt) == ["fuse.fuseclone"]
    assert status_json(rig.mnt)["metadata"] == str(rig.tmp / "two.meta")
    with open(rig.image, "rb") as f:
        assert f.read(4096) == open(rig.src, "rb").read(4096)


def fuse_device(mnt):
    """"major:minor" of the filesystem mounted at MNT, from mountinfo (nothing stats MNT)."""
    real = os.path.join(os.path.realpath(os.path.dirname(mnt)), os.path.basename(mnt))
    return next(line.split()[2] for line in open("/proc/self/mountinfo") if line.split()[4] == real)


def _continue(pid):
    with contextlib.suppress(ProcessLookupError):  # it ended, as it should once continued
        os.kill(pid, signal.SIGCONT)


def test_a_clone_unmounted_from_outside_leaves_alone_the_next_mount_given_its_numbers(rig, random_source):
    """umount(8) of a clone ends its session, and the kernel hands its device number and mount
    id to the next mounts at once. Its daemon, stopping after that (slowly, on a busy host;
    here it is stopped meanwhile), must not take another clone's mount given them for its own:
    it unmounted that clone (as one of its own bind mounts, or its own mount)."""
    rig.mount("--no-hydration")
    pid = daemon_pid(rig.mnt)
    device = fuse_device(rig.mnt)
    os.kill(pid, signal.SIGSTOP)
    rig.stack.callback(_continue, pid)
    unmount(os.path.join(os.path.realpath(os.path.dirname(rig.mnt)), os.path.basename(rig.mnt)))
    # The kernel gives the lowest free number: mounts elsewhere on the host may free a lower
    # one, or take this one, first. The clones that did not get it stay, taking those numbers.
    for name in "bcdef":
        (rig.tmp / name).mkdir()
        other = Rig(rig.tmp / name, rig.stack)
        make_source_file(other.src, 8 * MiB, seed=5)
        other.mount("--no-hydration")
        if fuse_device(other.mnt) == device:
            break
    else:
        pytest.skip(f"other mounts on this host took {device} first")
    os.kill(pid, signal.SIGCONT)
    wait_gone(pid)
    assert mounts_at(other.mnt) == ["fuse.fuseclone"]
    assert status_json(other.mnt)["live"] is True


def wait_for_file(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_an_on_complete_hook_that_unmounts_the_clone_is_not_cut_short_by_it(rig, random_source):
    """The switch-over of the walkthrough's step 4 as a hook: unmount the clone, then use DST."""
    marker = rig.tmp / "switched"
    rig.mount("--on-complete", f"sh -c '{sys.executable} -m fuseclone unmount {rig.mnt} "
                               f"&& cmp -n {MiB} {rig.dst} {rig.src} && touch {marker}'")
    wait_for_file(marker)
    rig.wait_unmounted()
    fuseclone("check", rig.meta, "--src", rig.src, "--dst", rig.dst, "--verify")


def test_a_hung_on_complete_hook_holds_up_no_unmount(rig, random_source):
    pid_file = rig.tmp / "hook.pid"
    rig.mount("--on-complete", f"sh -c 'echo $$ > {pid_file}; exec sleep 120'")
    wait_for_file(pid_file)
    time.sleep(0.1)  # the pid is written before the exec
    hook = int(pid_file.read_text())
    rig.stack.callback(lambda: subprocess.run(["kill", str(hook)], capture_output=True))
    started = time.monotonic()
    fuseclone("unmount", rig.mnt, "--timeout", "20")
    assert time.monotonic() - started < 15
    assert status_json(rig.meta)["clean"]


def test_a_mount_whose_caller_closed_its_standard_descriptors(rig, random_source):
    """`fuseclone mount ... <&- >&- 2>&-`: the mount's own files must not take those numbers."""
    rig.stack.callback(rig._force_unmount, rig.mnt)
    sh("sh", "-c", 'exec "$0" -m fuseclone mount "$@" <&- >&- 2>&-', sys.executable, rig.src,
       rig.dst, rig.meta, rig.mnt, "--no-hydration", timeout=20)
    assert status_json(rig.mnt)["live"]


def test_a_mount_whose_runtime_directory_was_removed_stays_reachable(rig, random_source):
    """`rm -rf /run/fuseclone` under a live mount: its control socket comes back, and its
    default log with it, at the name status shows (before, it went on into the deleted file)."""
    env = dict(os.environ, FUSECLONE_RUNTIME_DIR=str(rig.tmp / "run"))

    def cli(*args, check=True):
        return sh(sys.executable, "-m", "fuseclone", *args, env=env, check=check, timeout=60)

    cli("mount", rig.src, rig.dst, rig.meta, rig.mnt, "--no-hydration")
    rig.stack.callback(lambda: cli("unmount", "--lazy", rig.mnt, check=False))
    sh("rm", "-rf", rig.tmp / "run")
    deadline = time.monotonic() + 10
    while (result := cli("message", rig.mnt, "enable_hydration", check=False)).returncode:
        assert time.monotonic() < deadline, result.stderr
        time.sleep(0.2)
    cli("wait", rig.mnt, "--timeout", "60")
    log_file = json.loads(cli("status", "--json", rig.mnt).stdout)["log_file"]
    assert os.path.dirname(log_file) == str(rig.tmp / "run")
    cli("unmount", rig.mnt)
    assert mounts_at(rig.mnt) == []
    with open(log_file) as log:  # the mount's last words are there
        assert "hydration complete" in (lines := log.read()) and "was unmounted" in lines, lines
    fuseclone("check", rig.meta, "--src", rig.src, "--dst", rig.dst, "--verify")


def test_a_runtime_directory_that_cannot_be_made_again_costs_no_descriptors(rig, random_source):
    """While the socket cannot be bound again (an immutable runtime directory), each retry
    closes its socket: a daemon left so for hours must not run out of descriptors."""
    env = dict(os.environ, FUSECLONE_RUNTIME_DIR=str(rig.tmp / "run"))

    def cli(*args, check=True):
        return sh(sys.executable, "-m", "fuseclone", *args, env=env, check=check, timeout=60)

    cli("mount", rig.src, rig.dst, rig.meta, rig.mnt, "--no-hydration")
    rig.stack.callback(lambda: cli("unmount", "--lazy", rig.mnt, check=False))
    pid = int(sh("pgrep", "-f", f"fuseclone mount .*{rig.meta}").stdout.split()[0])
    run = rig.tmp / "run"
    for name in os.listdir(run):  # only the socket: the log stays open
        if name.endswith(".sock"):
            os.unlink(run / name)
    sh("chattr", "+i", run)  # nothing can be made in it, not even by root: bind fails
    try:
        time.sleep(1.0)
        before = len(os.listdir(f"/proc/{pid}/fd"))
        time.sleep(3.0)  # several retries
        assert len(os.listdir(f"/proc/{pid}/fd")) <= before + 1
    finally:
        sh("chattr", "-i", run)
    deadline = time.monotonic() + 10
    while (result := cli("message", rig.mnt, "enable_hydration", check=False)).returncode:
        assert time.monotonic() < deadline, result.stderr
        time.sleep(0.2)


def test_status_watch_ends_quietly_when_the_mount_goes_away(rig, random_source):
    rig.mount("--no-hydration")
    watch = subprocess.Popen([sys.executable, "-m", "fuseclone", "status", "--watch", rig.mnt],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        assert watch.poll() is None
        fuseclone("unmount", rig.mnt)
        out, err = watch.communicate(timeout=30)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, err
    assert "0.0%" in out and not err


def test_a_foreground_mount_whose_stderr_reader_went_away_serves_on(rig, random_source):
    """`fuseclone mount -f ... 2>&1 | head -1`: its notices then meet a closed pipe."""
    from fuseclone.fuse.mount import is_fuseclone_mount

    proc = subprocess.Popen([sys.executable, "-m", "fuseclone", "mount", "-f", rig.src, rig.dst,
                             rig.meta, rig.mnt, "--no-hydration"], stderr=subprocess.PIPE)
    rig.stack.callback(rig._force_unmount, rig.mnt)
    try:
        proc.stderr.close()
        deadline = time.monotonic() + 30
        while not is_fuseclone_mount(rig.mnt):
            assert proc.poll() is None, "the mount ended"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        assert proc.poll() is None, "the mount ended"
        with open(rig.image, "rb") as f:
            assert f.read(4096) == open(rig.src, "rb").read(4096)
        fuseclone("unmount", rig.mnt)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def foreground_mount_with_write_back_timeout(rig, seconds, log, *options, src=None):
    """`fuseclone mount --foreground`, its daemon's WRITE_BACK_TIMEOUT set to SECONDS (30 s would
    make the test slow), logging to LOG; returned once the image is mounted."""
    code = ("import fuseclone.daemon as d; d.WRITE_BACK_TIMEOUT = " + repr(float(seconds)) +
            "; from fuseclone.cli import main; main(prog_name='fuseclone')")
    proc = subprocess.Popen([sys.executable, "-c", code, "mount", "--foreground", *options,
                             src or rig.src, rig.dst, rig.meta, rig.mnt],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    rig.stack.callback(lambda: proc.poll() is None and proc.kill())
    rig.stack.callback(rig._force_unmount, rig.mnt)
    deadline = time.monotonic() + 30
    while os.path.realpath(rig.mnt) not in open("/proc/mounts").read():
        assert proc.poll() is None, open(log).read()
        assert time.monotonic() < deadline, "not mounted"
        time.sleep(0.05)
    return proc


def wait_for_line(log, *needles, timeout=30):
    """The first of NEEDLES that appears in the file LOG."""
    deadline = time.monotonic() + timeout
    while True:
        text = open(log).read()
        for needle in needles:
            if needle in text:
                return needle
        assert time.monotonic() < deadline, text
        time.sleep(0.05)


# Writes DATA (stdin's first line, hex) at OFFSET into IMAGE without an fsync, says so, and
# keeps the file open until stdin closes. A process of its own: a fork of the test's process
# (any subprocess) would flush the image's cached pages when it closes the inherited file.
HOLDER = """
import os, sys
image, offset = sys.argv[1], int(sys.argv[2])
fd = os.open(image, os.O_RDWR)
os.pwrite(fd, bytes.fromhex(sys.stdin.readline()), offset)
print("written", flush=True)
sys.stdin.read()
"""


def test_a_stop_waits_for_cached_writes_held_up_by_a_frozen_filesystem(rig, random_source):
    """DST and META on a frozen filesystem: the cached writes of a file still open wait for it,
    and so does the stop's last commit. Giving up on those writes after WRITE_BACK_TIMEOUT
    gained nothing, and lost them: after the thaw the session detached lazily without them."""
    frozen = rig.ext4()
    rig.dst, rig.meta = os.path.join(frozen, "dst.img"), os.path.join(frozen, "clone.meta")
    log = str(rig.tmp / "mount.log")
    proc = foreground_mount_with_write_back_timeout(rig, 0.5, log)
    # Hydrated: the write's first need is its written bits in META, committed in a worker
    # thread (which the freeze holds), so the event loop stays free to give up on it.
    fuseclone("wait", rig.mnt, "--timeout", "60")
    data = os.urandom(MiB)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, rig.image, str(3 * MiB)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rig.stack.callback(lambda: holder.poll() is None and holder.kill())
    holder.stdin.write(data.hex() + "\n")
    holder.stdin.flush()
    assert holder.stdout.readline() == "written\n"
    sh("fsfreeze", "-f", frozen)
    rig.stack.callback(lambda: sh("fsfreeze", "-u", frozen, check=False))
    proc.send_signal(signal.SIGTERM)
    said = wait_for_line(log, "waiting for them", "going on without them")
    sh("fsfreeze", "-u", frozen)
    assert proc.wait(timeout=30) == 0, open(log).read()
    holder.stdin.close()  # its close fails (ENOTCONN: detached lazily), which it ignores
    holder.wait(timeout=30)
    with open(rig.dst, "rb") as f:
        f.seek(3 * MiB)
        assert f.read(MiB) == data, said
    assert said == "waiting for them", open(log).read()
    fuseclone("check", rig.meta, "--src", rig.src, "--dst", rig.dst, "--verify")


def _loop_device_over(path, stack):
    """A loop device of PATH, detached at the end of the test unless the test did, and only
    while it still is PATH's (its name may be another test's by then)."""
    loop = sh("losetup", "-f", "--show", path).stdout.strip()

    def detach():
        backing = sh("losetup", "-n", "-O", "BACK-FILE", loop, check=False).stdout.strip()
        if backing.removesuffix(" (deleted)") == os.path.realpath(path):
            sh("losetup", "-d", loop, check=False)

    stack.callback(detach)
    return loop


@pytest.mark.parametrize("stop, options", [
    ("SIGTERM", ()), ("SIGINT", ()), ("SIGHUP", ()), ("unmount --lazy", ()),
    ("SIGTERM", ("--write-cache", "0")),  # the image caches nothing; the filesystem above does
])
def test_a_stop_first_writes_back_the_filesystem_on_a_loop_device_of_the_image(
        rig, random_source, stop, options):
    """A stop while a filesystem is mounted from a loop device of the image (systemd stopping
    the clone's unit at shutdown, an operator's SIGTERM) detaches the image under it: what that
    filesystem wrote so far only into its own cache (a file copied a moment before, the
    journal not yet committed) was lost with it, without a word, although the stop waits for
    the image's cached writes. A stop first has that filesystem, and the loop device, written
    back into the image, as a `sync` of them would; only later writes fail."""
    rig.mount("--no-hydration", *options)
    loop = _loop_device_over(rig.image, rig.stack)
    sh("mkfs.ext4", "-q", "-E", "nodiscard", loop)
    fs = str(rig.tmp / "fs")
    os.mkdir(fs)
    sh("mount", loop, fs)
    rig.stack.callback(lambda: sh("umount", fs, check=False))
    data = os.urandom(4 * MiB)
    with open(os.path.join(fs, "file"), "wb") as f:
        f.write(data)  # in ext4's cache only: no fsync, no sync
    pid = daemon_pid(rig.mnt)
    if stop == "unmount --lazy":
        fuseclone("unmount", "--lazy", rig.mnt)
    else:
        os.kill(pid, getattr(signal, stop))
    wait_gone(pid)
    sh("umount", fs)  # its writes from now on fail: the image is gone
    sh("losetup", "-d", loop)

    rig.mount()
    again = rig.mount_fs(rig.image, str(rig.tmp / "again"), "-o", "loop")
    with open(os.path.join(again, "file"), "rb") as f:
        assert f.read() == data
