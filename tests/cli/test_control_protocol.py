"""The control protocol's request shapes and the path resolution that never looks into a
mount, without a daemon."""

import os

import pytest
from hypothesis import given, strategies as st

from fuseclone.control import REQUESTS, RequestError, parse_request
from fuseclone.fuse.mount import resolve_outside_mounts


@pytest.mark.parametrize("line, parsed", [
    (b'{"op": "status"}', {"op": "status"}),
    (b'{"op": "message", "text": "enable_hydration"}', {"op": "message", "text": "enable_hydration"}),
    (b'{"op": "wait"}', {"op": "wait", "timeout": 60}),
    (b'{"op": "wait", "timeout": 0.5}', {"op": "wait", "timeout": 0.5}),
    (b'{"op": "wait", "timeout": 100000000000000000000}', {"op": "wait", "timeout": 10**20}),
    (b'{"op": "unmount"}', {"op": "unmount", "lazy": False, "mountpoint": None}),
    (b'{"op": "unmount", "lazy": true}', {"op": "unmount", "lazy": True, "mountpoint": None}),
    (b'{"op": "unmount", "mountpoint": "/mnt/c"}', {"op": "unmount", "lazy": False, "mountpoint": "/mnt/c"}),
])
def test_valid_requests_come_back_complete(line, parsed):
    assert parse_request(line) == parsed


@pytest.mark.parametrize("line, says", [
    (b"null", "JSON object"), (b"[]", "JSON object"), (b'"x"', "JSON object"), (b"1", "JSON object"),
    (b"[" * 100_000, "JSON object"), (b"\xff\xfe", "JSON object"), (b"9" * 5000, "JSON object"),
    (b'{"op": 1}', '"op" must be one of'), (b'{"op": "nope"}', '"op" must be one of'),
    (b'{"op": "status", "lazy": true}', "status takes no field \"lazy\""),
    (b'{"op": "unmount", "lazy": "no"}', '"lazy" of unmount must be true or false'),
    (b'{"op": "unmount", "lazy": 0}', '"lazy" of unmount must be true or false'),
    (b'{"op": "unmount", "mountpoint": 1}', '"mountpoint" of unmount must be a path or null'),
    (b'{"op": "wait", "timeout": true}', '"timeout" of wait must be'),
    (b'{"op": "wait", "timeout": "5"}', '"timeout" of wait must be'),
    (b'{"op": "wait", "timeout": -0.1}', '"timeout" of wait must be'),
    (b'{"op": "wait", "timeout": 1e999}', '"timeout" of wait must be'),
    (b'{"op": "wait", "timeout": NaN}', '"timeout" of wait must be'),
    (b'{"op": "message"}', 'message needs "text"'),
    (b'{"op": "message", "text": ["a"]}', '"text" of message must be a string'),
])
def test_requests_of_another_shape_are_refused_with_the_reason(line, says):
    with pytest.raises(RequestError, match=None) as caught:
        parse_request(line)
    assert says in str(caught.value)


@given(st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
                    lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=20))
def test_any_json_value_parses_or_is_refused(value):
    import json

    try:
        req = parse_request(json.dumps(value).encode())
    except RequestError:
        return
    assert req["op"] in REQUESTS and set(req) == {"op", *REQUESTS[req["op"]]}


def test_paths_resolve_like_realpath_outside_mounts(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    os.symlink(tmp_path / "a", tmp_path / "link")
    os.symlink("a/b", tmp_path / "rel")
    os.symlink("loop", tmp_path / "loop")
    for path in ("link/b", "rel", "rel/..", "a/./b/../b", "missing/x", "link/../a"):
        full = str(tmp_path / path)
        assert resolve_outside_mounts(full, set()) == os.path.realpath(full), path
    with pytest.raises(OSError):
        resolve_outside_mounts(str(tmp_path / "loop"), set())


def test_paths_stop_at_a_mountpoint_without_looking_at_it(tmp_path):
    os.symlink(tmp_path / "mnt", tmp_path / "to-mnt")
    mnt = str(tmp_path / "mnt")  # does not even exist: nothing looks at it
    assert resolve_outside_mounts(str(tmp_path / "to-mnt"), {mnt}) == mnt
    assert resolve_outside_mounts(str(tmp_path / "to-mnt/image"), {mnt}) == mnt + "/image"
    assert resolve_outside_mounts(str(tmp_path / "to-mnt/.."), {mnt}) == str(tmp_path)
