"""Where control sockets and default logs live, per user, and the one line a user gets for a
file they may not use."""

import os
import socket
import threading

import pytest
from click.testing import CliRunner

from fuseclone import control
from fuseclone.cli import main
from fuseclone.control import default_runtime_dir, ensure_runtime_dir
from fuseclone.errors import FusecloneError

NOBODY = 65534


@pytest.mark.parametrize("uid,environ,expected", [
    (0, {}, "/run/fuseclone"),
    (0, {"XDG_RUNTIME_DIR": "/run/user/0"}, "/run/fuseclone"),  # root keeps /run/fuseclone
    (1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}, "/run/user/1000/fuseclone"),
    (1000, {}, "/tmp/fuseclone-1000"),
    (1000, {"XDG_RUNTIME_DIR": ""}, "/tmp/fuseclone-1000"),
    (1000, {"FUSECLONE_RUNTIME_DIR": "/x", "XDG_RUNTIME_DIR": "/run/user/1000"}, "/x"),
    (0, {"FUSECLONE_RUNTIME_DIR": "/x"}, "/x"),
    (1000, {"XDG_RUNTIME_DIR": "run/user"}, "/tmp/fuseclone-1000"),  # relative: invalid (XDG)
])
def test_each_user_has_its_own_runtime_dir(uid, environ, expected):
    assert default_runtime_dir(uid, environ) == expected


def test_a_missing_runtime_dir_is_made_private(tmp_path):
    path = str(tmp_path / "run" / "fuseclone")
    assert ensure_runtime_dir(path) == path
    st = os.lstat(path)
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.geteuid()
    assert ensure_runtime_dir(path) == path  # and one of ours is used again


def test_a_relative_runtime_dir_is_refused(tmp_path, monkeypatch):
    """FUSECLONE_RUNTIME_DIR=relative/dir named one directory for the mount command and
    another for the daemon (which leaves for /) and for every command run elsewhere."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FusecloneError, match=r"^the runtime directory relative/dir is not an "
                                             r"absolute path \(FUSECLONE_RUNTIME_DIR\?\)$"):
        ensure_runtime_dir("relative/dir")
    assert os.listdir(tmp_path) == []


def _symlink(tmp_path):
    os.mkdir(tmp_path / "elsewhere", 0o700)
    os.symlink(tmp_path / "elsewhere", tmp_path / "d")


def _someone_elses(tmp_path):
    os.mkdir(tmp_path / "d", 0o700)
    os.chown(tmp_path / "d", NOBODY, NOBODY)


def _writable_by_others(tmp_path):
    os.mkdir(tmp_path / "d")
    os.chmod(tmp_path / "d", 0o777)


def _a_file(tmp_path):
    (tmp_path / "d").write_text("")


@pytest.mark.parametrize("prepare,says", [
    (_symlink, "not a directory"), (_someone_elses, "belongs to another user"),
    (_writable_by_others, "writable by other users"), (_a_file, "not a directory"),
])
def test_a_runtime_dir_someone_else_could_have_prepared_is_refused(tmp_path, prepare, says):
    if prepare is _someone_elses and os.geteuid() != 0:
        pytest.skip("needs root to give a directory away")
    prepare(tmp_path)
    with pytest.raises(FusecloneError, match=says):
        ensure_runtime_dir(str(tmp_path / "d"))


def test_a_file_the_user_may_not_use_is_one_line(tmp_path, monkeypatch):
    meta = tmp_path / "clone.meta"
    meta.write_bytes(b"")

    def refused(meta_path, req, timeout=10.0):
        raise PermissionError(13, "Permission denied", "/run/fuseclone/0123.sock")

    monkeypatch.setattr(control, "resolve_target", lambda target: target)  # no mount table
    monkeypatch.setattr(control, "request", refused)
    result = CliRunner().invoke(main, ["status", str(meta)])
    assert result.exit_code == 1, result.output
    assert result.output == "fuseclone: error: permission denied: /run/fuseclone/0123.sock\n"


@pytest.mark.parametrize("answer", [None, b'[1, 2]\n', b'{"ok": true}\n',
                                    b'{"ok": true, "status": 5}\n',
                                    b'{"ok": true, "status": {}}\n', b'\xff\n'])
@pytest.mark.parametrize("command", ["list", "metrics"])
def test_list_and_metrics_pass_over_what_is_not_a_mount_s_socket(tmp_path, monkeypatch,
                                                                   command, answer):
    """`list` and `metrics` ask every control socket in the runtime directory: one that is a
    symlink loop (ANSWER None), or whose listener answers what no fuseclone daemon does
    (another program's), ended them with a traceback, listing no clone."""
    monkeypatch.setattr(control, "RUNTIME_DIR", str(tmp_path))
    if answer is None:
        os.symlink("b.sock", tmp_path / "a.sock")
        os.symlink("a.sock", tmp_path / "b.sock")
        result = CliRunner().invoke(main, [command, "--timeout", "5"])
    else:
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(tmp_path / "other.sock"))
            listener.listen()

            def answer_once():
                conn, _ = listener.accept()
                with conn:
                    conn.recv(1024)
                    conn.sendall(answer)

            thread = threading.Thread(target=answer_once)
            thread.start()
            result = CliRunner().invoke(main, [command, "--timeout", "5"])
            thread.join(10)
    assert result.exception is None, result.output
    assert result.exit_code == 0
    assert str(tmp_path) not in result.output
