"""A clone mounted at more than one place: bind mounts of its mountpoint, and the copies another
mount namespace (`unshare -m`) takes of it. The FUSE session, and so the daemon, lasts until the
last of them is unmounted."""

import contextlib
import json
import os
import signal
import subprocess
import sys

from tests.integration.conftest import MiB, daemon_pid, fuseclone, sh, status_json
from tests.integration.test_operating import real, samples_of
from tests.integration.test_stopping import wait_gone


def bind_mount(rig, name):
    """A bind mount of the clone's mountpoint at a new directory NAME; returns its path."""
    other = str(rig.tmp / name)
    os.mkdir(other)
    sh("mount", "--bind", rig.mnt, other)
    rig.stack.callback(lambda: sh("umount", "-l", other, check=False))
    return other


def mounted(path):
    return any(line.split()[1] == real(path) for line in open("/proc/mounts"))


def test_unmount_refuses_while_the_clone_is_bind_mounted_elsewhere(rig, random_source):
    rig.mount("--no-hydration")
    other = bind_mount(rig, "other")
    # Before: the mountpoint was unmounted, the daemon served on at OTHER, and the command
    # waited out its timeout to say that the daemon was "busy or hung".
    result = fuseclone("unmount", rig.mnt, "--timeout", "5", check=False)
    assert result.returncode == 1
    assert f"also mounted at {real(other)} (a bind mount" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert mounted(rig.mnt) and mounted(other)  # nothing half-done
    result = fuseclone("unmount", other, "--timeout", "5", check=False)
    assert f"also mounted at {real(rig.mnt)} (a bind mount" in result.stderr
    sh("umount", other)
    fuseclone("unmount", rig.mnt)
    assert not mounted(rig.mnt)
    assert status_json(rig.meta)["clean"]


def test_a_bind_mount_left_alone_is_unmounted_by_its_own_path(rig, random_source):
    rig.mount("--no-hydration")
    other = bind_mount(rig, "other")
    data = os.urandom(2 * MiB)
    with open(os.path.join(other, "image"), "r+b") as f:
        f.write(data)
    sh("umount", rig.mnt)  # by hand: the clone lives on at OTHER
    assert status_json(other)["live"]
    clone = [c for c in fuseclone("list").stdout.splitlines() if c.startswith(real(other))]
    assert os.path.join(real(other), "image") in clone[0].split()  # where its image is now
    # Before: "the mount of META is at MNT, not OTHER (META was moved ...)".
    fuseclone("unmount", other, "--timeout", "20")
    assert not mounted(other)
    assert status_json(rig.meta)["clean"]
    rig.mount("--no-hydration")
    with open(rig.image, "rb") as f:
        assert f.read(len(data)) == data


def test_unmount_refuses_while_another_mount_namespace_holds_a_copy(rig, random_source):
    rig.mount("--no-hydration")
    holder = namespace_holder(rig, "private")
    result = fuseclone("unmount", rig.mnt, "--timeout", "5", check=False)
    assert result.returncode == 1
    assert (f"also mounted at {real(rig.mnt)} in the mount namespace of pid {holder.pid} "
            f"(`nsenter -t {holder.pid} -m umount {real(rig.mnt)}`)") in result.stderr
    assert mounted(rig.mnt)
    sh("nsenter", "-t", holder.pid, "-m", "umount", real(rig.mnt))
    fuseclone("unmount", rig.mnt)
    assert not mounted(rig.mnt)
    assert status_json(rig.meta)["clean"]


def test_list_and_metrics_show_a_clone_mounted_in_another_mount_namespace(rig, random_source):
    """`unshare -m fuseclone mount ...` (a service's PrivateMounts=): the mount is in that
    namespace's table alone, and `list` (every live clone on this machine) left it out."""
    sh("unshare", "-m", "--propagation", "private", sys.executable, "-m", "fuseclone", "mount",
       rig.src, rig.dst, rig.meta, rig.mnt, "--no-hydration")
    pid = daemon_pid(rig.meta)
    rig.stack.callback(_stop_if_alive, pid)
    assert not mounted(rig.mnt)  # not in this mount table
    [listed] = [c for c in json.loads(fuseclone("list", "--json").stdout)
                if c["metadata"] == rig.meta]
    assert (listed["mountpoint"], listed["image"], listed["state"], listed["other_mount_namespace"]) \
        == (real(rig.mnt), rig.image, "idle", True)
    [row] = [line for line in fuseclone("list").stdout.splitlines() if rig.meta in line]
    assert row.startswith(f"{real(rig.mnt)} (mount namespace of pid {pid}) ")
    found, _ = samples_of(fuseclone("metrics").stdout, real(rig.mnt))
    assert found["fuseclone_up"] == 1 and found["fuseclone_regions"] == 32 * MiB // 4096

    sh("nsenter", "-t", str(pid), "-m", sys.executable, "-m", "fuseclone", "unmount", rig.mnt)
    assert [c for c in json.loads(fuseclone("list", "--json").stdout)
            if c["metadata"] == rig.meta] == []


def _stop_if_alive(pid):
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)  # a clean stop, in whatever namespace


def test_a_stop_detaches_the_bind_mounts_and_keeps_their_writes(rig, random_source):
    rig.mount("--no-hydration")
    other = bind_mount(rig, "other")
    nested = str(rig.tmp / "nested")
    os.mkdir(nested)
    sh("mount", "--rbind", rig.mnt, nested)
    rig.stack.callback(lambda: sh("umount", "-l", nested, check=False))
    data = os.urandom(3 * MiB)
    with open(os.path.join(other, "image"), "r+b") as f:  # cached by the kernel, not flushed
        f.seek(5 * MiB)
        f.write(data)
    pid = daemon_pid(rig.mnt)
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    # Before: OTHER and NESTED stayed mounted, answering ENOTCONN, and led `list` and
    # `unmount` to META.
    assert not mounted(rig.mnt) and not mounted(other) and not mounted(nested)
    assert status_json(rig.meta)["clean"]
    rig.mount("--no-hydration")
    with open(rig.image, "rb") as f:
        f.seek(5 * MiB)
        assert f.read(len(data)) == data



def namespace_holder(rig, propagation):
    """A process in a mount namespace of its own, made now (copying the clone's mount), with
    PROPAGATION ("private": an unmount here does not reach its copies; "unchanged": shared
    mounts stay peers); returns it."""
    holder = subprocess.Popen(["unshare", "-m", "--propagation", propagation, "sh", "-c",
                               "echo ready; exec sleep 300"], stdout=subprocess.PIPE, text=True)
    rig.stack.callback(holder.wait)
    rig.stack.callback(holder.kill)
    assert holder.stdout.readline() == "ready\n"
    return holder


def test_copies_an_unmount_reaches_by_propagation_do_not_hold_it(rig, random_source):
    """Mounted under a shared mount (systemd makes / shared), the clone appears at its peers,
    here and in namespaces made since with their propagation unchanged: the unmount reaches
    them all, so they are no reason to refuse it."""
    shared, peer = str(rig.tmp / "shared"), str(rig.tmp / "peer")
    os.mkdir(shared)
    os.mkdir(peer)
    sh("mount", "-t", "tmpfs", "tmpfs", shared)
    rig.stack.callback(lambda: sh("umount", "-l", shared, check=False))
    sh("mount", "--make-shared", shared)
    sh("mount", "--bind", shared, peer)
    rig.stack.callback(lambda: sh("umount", "-l", peer, check=False))
    rig.mnt = os.path.join(shared, "mnt")
    os.mkdir(rig.mnt)
    rig.mount("--no-hydration")
    assert mounted(os.path.join(peer, "mnt"))
    holder = namespace_holder(rig, "unchanged")
    fuseclone("unmount", rig.mnt, "--timeout", "20")
    assert not mounted(rig.mnt) and not mounted(os.path.join(peer, "mnt"))
    assert f" {real(rig.mnt)} " not in open(f"/proc/{holder.pid}/mountinfo").read()
    assert status_json(rig.meta)["clean"]


# ---- PID namespaces ---------------------------------------------------------------------------


def test_a_background_mount_as_process_1_of_a_pid_namespace_is_refused(rig, random_source):
    rig.stack.callback(rig._force_unmount, rig.mnt)
    # Before: exit 0 and the image's path, then the kernel killed the daemon with the
    # namespace (its process 1 exited): a dead mount, META not clean.
    result = sh("unshare", "--pid", "--fork", sys.executable, "-m", "fuseclone", "mount",
                rig.src, rig.dst, rig.meta, rig.mnt, check=False)
    assert result.returncode == 1
    assert "process 1 of its PID namespace" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not mounted(rig.mnt)
    assert not os.path.exists(rig.dst) and not os.path.exists(rig.meta)


def test_a_mount_in_a_pid_namespace_is_named_by_the_pid_the_host_sees(rig, random_source):
    unshare = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", sys.executable,
                                "-m", "fuseclone", "mount", "--foreground", rig.src, rig.dst,
                                rig.meta, rig.mnt], stderr=subprocess.PIPE, text=True)
    rig.stack.callback(unshare.wait)
    rig.stack.callback(unshare.kill)
    rig.stack.callback(rig._force_unmount, rig.mnt)  # first: a clean stop
    for line in unshare.stderr:
        if line.startswith("fuseclone: serving"):
            break
    with open(f"/proc/{unshare.pid}/task/{unshare.pid}/children") as f:
        daemon = int(f.read().split()[0])  # process 1 of the namespace, as the host sees it
    # Before: 1, the daemon's own pid in its namespace (the host's init here).
    assert daemon_pid(rig.mnt) == daemon
    assert status_json(rig.mnt)["pid"] == daemon
    os.kill(daemon, signal.SIGTERM)
    assert unshare.wait(timeout=60) == 0
    assert not mounted(rig.mnt)
    assert status_json(rig.meta)["clean"]


def test_commands_without_proc_say_so_in_one_line(rig, random_source):
    """A chroot without /proc (here: unmounted in a namespace of its own). Before: every
    command failed with a traceback (FileNotFoundError: /proc/self/mountinfo)."""
    commands = [["mount", rig.src, rig.dst, rig.meta, rig.mnt], ["list"], ["status", rig.mnt],
                ["unmount", rig.mnt]]
    script = "umount -l /proc && " + " ; ".join(
        " ".join([sys.executable, "-m", "fuseclone", *command, "2>&1"]) for command in commands)
    result = sh("unshare", "-m", "--propagation", "private", "sh", "-c", script, check=False)
    lines = result.stdout.strip().splitlines()
    assert lines == ["fuseclone: error: cannot read the mount table, /proc/self/mountinfo: /proc "
                     "is not mounted here (a chroot?): mount it first (mount -t proc proc /proc)"
                     ] * len(commands)
    assert not os.path.exists(rig.dst) and not os.path.exists(rig.meta)
