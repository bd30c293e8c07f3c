"""Two clones opening one DST or META at the same moment: whoever loses never removes or takes
a file the other holds, and nobody runs on a file that lost its name meanwhile."""

import os

import pytest

from fuseclone import destination, metadata
from fuseclone.destination import Destination
from fuseclone.errors import DestinationError, DestinationInUseError, MetadataError
from fuseclone.metadata import Metadata
from fuseclone.regions import Geometry

SIZE = 1 << 20


def test_a_destination_created_then_claimed_by_another_clone_is_left_to_it(tmp_path, monkeypatch):
    path = str(tmp_path / "dst.img")
    real_claim = destination._claim
    other = []

    def another_clone_claims_first(fd, name, is_block_device):
        monkeypatch.setattr(destination, "_claim", real_claim)
        other.append(Destination.open(name, SIZE, create=True))
        return real_claim(fd, name, is_block_device)

    monkeypatch.setattr(destination, "_claim", another_clone_claims_first)
    with pytest.raises(DestinationInUseError):
        Destination.open(path, SIZE, create=True)
    try:
        assert os.path.exists(path)  # the other clone's DST, not ours to remove
        assert os.fstat(other[0].fd).st_nlink == 1
    finally:
        other[0].close()


def test_a_destination_removed_before_it_is_claimed_is_refused(tmp_path, monkeypatch):
    path = str(tmp_path / "dst.img")
    with open(path, "wb") as f:
        f.truncate(SIZE)
    real_claim = destination._claim

    def removed_meanwhile(fd, name, is_block_device):
        os.unlink(name)  # a clone that gave up on the file it had created
        return real_claim(fd, name, is_block_device)

    monkeypatch.setattr(destination, "_claim", removed_meanwhile)
    with pytest.raises(DestinationError, match="removed or replaced while"):
        Destination.open(path, SIZE, create=False)


def test_a_meta_removed_before_it_is_locked_is_refused(tmp_path, monkeypatch):
    path = str(tmp_path / "clone.meta")
    real_flock = metadata.fcntl.flock

    def removed_meanwhile(fd, operation):
        if os.path.exists(path):
            os.unlink(path)
        return real_flock(fd, operation)

    monkeypatch.setattr(metadata.fcntl, "flock", removed_meanwhile)
    with pytest.raises(MetadataError, match="removed or replaced while"):
        Metadata.create(path, Geometry(SIZE, 4096), {"source": {}, "destination": {}})
