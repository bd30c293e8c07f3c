"""Region arithmetic and the in-core region map.

The image is cut into fixed-size regions (the last one may be partial). The map holds one bit per
region: 1 = the destination holds valid data for it ("hydrated"). Bits only ever go from 0 to 1
(SPEC invariant 2); the map offers no way to clear one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from bitarray import bitarray

from .errors import ImageTooLargeError, RegionSizeError

MIN_REGION_SIZE = 4 * 1024
MAX_REGION_SIZE = 1024 * 1024 * 1024
DEFAULT_REGION_SIZE = 4 * 1024
# Linux's largest file (MAX_LFS_FILESIZE): no DST file, and no image FUSE serves, is larger.
MAX_IMAGE_SIZE = 2**63 - 1


def validate_region_size(region_size: int) -> int:
    if (
        region_size < MIN_REGION_SIZE
        or region_size > MAX_REGION_SIZE
        or region_size & (region_size - 1)
    ):
        raise RegionSizeError(
            f"region size {region_size} is not a power of two between 4 KiB and 1 GiB"
        )
    return region_size


def validate_image_size(image_size: int) -> int:
    if image_size > MAX_IMAGE_SIZE:
        raise ImageTooLargeError(
            f"the source is {image_size} bytes, more than Linux's largest file (2^63-1 bytes): "
            "no destination or image can be that large")
    return image_size


@dataclass(frozen=True)
class Geometry:
    """How an image of `image_size` bytes is cut into regions of `region_size` bytes."""

    image_size: int
    region_size: int

    def __post_init__(self) -> None:
        validate_region_size(self.region_size)
        if self.image_size < 0:
            raise ValueError("negative image size")

    @property
    def shift(self) -> int:
        return self.region_size.bit_length() - 1

    @property
    def nr_regions(self) -> int:
        return (self.image_size + self.region_size - 1) >> self.shift

    def region_of(self, offset: int) -> int:
        return offset >> self.shift

    def region_start(self, region: int) -> int:
        return region << self.shift

    def region_end(self, region: int) -> int:
        """One past the last byte of `region` (short for a partial last region)."""
        return min((region + 1) << self.shift, self.image_size)

    def region_span(self, offset: int, length: int) -> range:
        """Regions touched by the byte range [offset, offset+length)."""
        if length <= 0:
            return range(0)
        return range(offset >> self.shift, ((offset + length - 1) >> self.shift) + 1)

    def covered_span(self, offset: int, length: int) -> range:
        """Regions entirely inside [offset, offset+length); a partial last region counts as
        covered when the range reaches the end of the image."""
        end = min(offset + length, self.image_size)
        first = (offset + self.region_size - 1) >> self.shift
        last = end >> self.shift  # exclusive
        if end == self.image_size and end & (self.region_size - 1):
            last += 1
        return range(first, max(first, last))

    def byte_range(self, regions: range) -> tuple[int, int]:
        """(offset, length) of a run of regions, clipped to the image."""
        start = self.region_start(regions.start)
        return start, self.region_end(regions.stop - 1) - start


class RegionMap:
    """One bit per region, backed by a bitarray. Bits can be set, never cleared."""

    def __init__(self, nr_regions: int, bits: bitarray | None = None) -> None:
        if bits is None:
            bits = bitarray(nr_regions, endian="little")
            bits.setall(0)
        if len(bits) != nr_regions:
            raise ValueError(f"bitmap holds {len(bits)} bits, expected {nr_regions}")
        self._bits = bits
        self._hydrated = bits.count(1)

    def __len__(self) -> int:
        return len(self._bits)

    @property
    def bits(self) -> bitarray:
        """The live bitarray (read it, do not write it)."""
        return self._bits

    @property
    def hydrated_count(self) -> int:
        return self._hydrated

    @property
    def complete(self) -> bool:
        return self._hydrated == len(self)

    def is_hydrated(self, region: int) -> bool:
        return bool(self._bits[region])

    def all_hydrated(self, regions: range) -> bool:
        if not regions:
            return True
        return self._bits.count(1, regions.start, regions.stop) == len(regions)

    def all_unhydrated(self, regions: range) -> bool:
        return not regions or self._bits.count(1, regions.start, regions.stop) == 0

    def count_hydrated(self, regions: range) -> int:
        return self._bits.count(1, regions.start, regions.stop) if regions else 0

    def set_hydrated(self, regions: range) -> int:
        """Mark regions hydrated; returns how many were newly set."""
        if not regions:
            return 0
        newly = len(regions) - self._bits.count(1, regions.start, regions.stop)
        self._bits[regions.start : regions.stop] = 1
        self._hydrated += newly
        return newly

    def next_unhydrated(self, start: int, stop: int | None = None) -> int:
        """Index of the first 0 bit in [start, stop), or -1."""
        stop = len(self._bits) if stop is None else stop
        if start >= stop:
            return -1
        return self._bits.find(0, start, stop)

    def next_hydrated(self, start: int, stop: int) -> int:
        """Index of the first 1 bit in [start, stop), or -1."""
        if start >= stop:
            return -1
        return self._bits.find(1, start, stop)

    def runs(self, regions: range) -> Iterator[tuple[bool, range]]:
        """Split `regions` into maximal runs of equal state: (hydrated, run)."""
        pos, stop = regions.start, regions.stop
        while pos < stop:
            state = self._bits[pos]
            nxt = self._bits.find(not state, pos, stop)
            end = stop if nxt < 0 else nxt
            yield bool(state), range(pos, end)
            pos = end


class CompleteMap(RegionMap):
    """Stands in for the bitmap once hydration is complete, so its memory can be released."""

    def __init__(self, nr_regions: int) -> None:  # noqa: D107 - no bitarray kept
        self._n = nr_regions
        self._hydrated = nr_regions

    def __len__(self) -> int:
        return self._n

    @property
    def bits(self) -> bitarray:
        bits = bitarray(self._n, endian="little")
        bits.setall(1)
        return bits

    def is_hydrated(self, region: int) -> bool:
        return True

    def all_hydrated(self, regions: range) -> bool:
        return True

    def all_unhydrated(self, regions: range) -> bool:
        return not regions

    def set_hydrated(self, regions: range) -> int:
        return 0

    def count_hydrated(self, regions: range) -> int:
        return len(regions)

    def next_unhydrated(self, start: int, stop: int | None = None) -> int:
        return -1

    def next_hydrated(self, start: int, stop: int) -> int:
        return start if start < stop else -1

    def runs(self, regions: range) -> Iterator[tuple[bool, range]]:
        if regions:
            yield True, regions
