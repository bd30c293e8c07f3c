"""The pieces of list, metrics and systemd notify that need no mount."""

import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fuseclone.metrics import Sample, exposition, parse_listen_address
from fuseclone.notify import SystemdNotifier
from fuseclone.status import Status, human_bytes, public_source


def status(**changes):
    fields = dict(hydrated_regions=3, total_regions=10, hydrating_regions=1, region_size=4096,
                  image_size=40960, features=[], hydration_threshold=8, hydration_batch_size=4,
                  hydration_enabled=True, hydration_error=None, metadata_mode="rw",
                  bytes_per_second=1 << 20, eta_seconds=7.0, source="s", destination="d",
                  metadata="m", live=True)
    return Status(**{**fields, **changes})


@pytest.mark.parametrize("source, shown", [
    ("/srv/golden.img", "/srv/golden.img"),
    ("https://user:pw@example.com:8443/disk.img?X-Amz-Signature=abc#frag", "https://example.com:8443/disk.img"),
    ("https://u:***@host/x", "https://host/x"),
    ("nbd://[::1]:10809/export", "nbd://[::1]:10809/export"),
    ("nbd+unix:///export?socket=/run/nbd.sock", "nbd+unix:///export"),
    ("http://host:notaport/x", "http://..."),
])
def test_sources_are_shown_without_secrets(source, shown):
    assert public_source(source) == shown


@pytest.mark.parametrize("changes, state", [
    ({}, "hydrating"),
    ({"hydration_enabled": False}, "idle"),
    ({"hydrated_regions": 10}, "complete"),
    ({"hydration_error": "stopped after 8 failures: EIO"}, "stopped: stopped after 8 failures: EIO"),
    ({"metadata_error": "a failed write"}, "stopped: metadata in fail mode (a failed write)"),
])
def test_state(changes, state):
    assert status(**changes).state == state


def test_progress_line():
    assert status().progress_line() == "30.0% (3/10 regions), 1.0 MiB/s, hydrating"


def test_exposition_escapes_labels_and_marks_silent_clones_down():
    odd = '/mnt/a "b"\\c\nd'
    text = exposition([Sample(odd, "/m.meta", status(user_read_bytes=5)), Sample("/x", "/x.meta", None)])
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families["fuseclone_user_read_bytes"].type == "counter"
    up = {sample.labels["mountpoint"]: sample.value for sample in families["fuseclone_up"].samples}
    assert up == {odd: 1, "/x": 0}
    reads = families["fuseclone_user_read_bytes"].samples
    assert [(s.labels, s.value) for s in reads] == [({"mountpoint": odd, "metadata": "/m.meta"}, 5)]
    assert "# TYPE fuseclone_hydrated_regions gauge\n" in text


@pytest.mark.parametrize("text, address", [
    ("127.0.0.1:9100", ("127.0.0.1", 9100)), ("[::1]:9100", ("::1", 9100)), (":9100", (None, 9100)),
    ("localhost:1", ("localhost", 1)),
])
def test_listen_addresses(text, address):
    assert parse_listen_address(text) == address


@pytest.mark.parametrize("text", ["9100", "host:", "host:0", "host:65536", "host:http"])
def test_bad_listen_addresses(text):
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen_address(text)


def test_notify_reaches_an_abstract_socket_and_leaves_the_environment():
    name = "fuseclone-unit-notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        environ = {"NOTIFY_SOCKET": "@" + name}
        notifier = SystemdNotifier.from_environment(environ)
        assert environ == {}
        notifier.ready("0.0%")
        notifier.status("0.0%")  # unchanged: not sent again
        notifier.status("1.0%")
        notifier.stopping()
        notifier.close()
        assert sock.recv(100) == b"READY=1\nSTATUS=0.0%"
        assert sock.recv(100) == b"STATUS=1.0%"
        assert sock.recv(100).startswith(b"STOPPING=1\n")
    assert SystemdNotifier.from_environment({}) is None
    assert SystemdNotifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1"}) is None


@pytest.mark.parametrize("size, shown", [(1023, "1023 B"), (64 << 40, "64.0 TiB"),
                                         (2**63 - 1, "8.0 EiB"), (3 << 50, "3.0 PiB")])
def test_sizes_up_to_the_largest_image_are_shown_in_their_unit(size, shown):
    """The largest image (2^63-1 bytes) showed as "8388608.0 TiB"."""
    assert human_bytes(size) == shown
