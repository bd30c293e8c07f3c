"""What a block device holds, as libblkid's low-level probe (`blkid -p`) names it: a filesystem,
a partition table, an LVM, RAID or LUKS member, swap. Only signatures are looked for: a device
holding data in no format libblkid knows reads as holding nothing.

libblkid (util-linux's, which every Linux system has) is loaded at the first probe: only a new
clone into a block device needs it."""

from __future__ import annotations

import ctypes
import errno
import functools

_NOTHING_FOUND = 1  # blkid_do_safeprobe's answers
_AMBIGUOUS = -2
_SUBLKS_TYPE_AND_USAGE = (1 << 5) | (1 << 7)  # BLKID_SUBLKS_TYPE | BLKID_SUBLKS_USAGE


class SignatureProbeError(OSError):
    """The device could not be probed (libblkid missing, or the device unreadable)."""


@functools.cache
def _libblkid() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libblkid.so.1", use_errno=True)
    except OSError as exc:
        raise SignatureProbeError(errno.ENOENT, f"libblkid is not installed ({exc})") from None
    lib.blkid_new_probe.restype = ctypes.c_void_p
    lib.blkid_new_probe.argtypes = []
    lib.blkid_free_probe.argtypes = [ctypes.c_void_p]
    lib.blkid_probe_set_device.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                                           ctypes.c_int64]
    lib.blkid_probe_set_superblocks_flags.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.blkid_probe_enable_partitions.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.blkid_do_safeprobe.argtypes = [ctypes.c_void_p]
    lib.blkid_probe_lookup_value.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                             ctypes.POINTER(ctypes.c_char_p),
                                             ctypes.POINTER(ctypes.c_size_t)]
    return lib


def signature(fd: int) -> str | None:
    """What the block device open at FD holds ("a filesystem (ext4)", "a partition table (gpt)",
    "a signature (LVM2_member)"), or None when libblkid finds no signature on it. Raises
    SignatureProbeError when it cannot tell."""
    lib = _libblkid()
    probe = lib.blkid_new_probe()
    if not probe:
        raise SignatureProbeError(errno.ENOMEM, "libblkid could not start a probe")
    try:
        if lib.blkid_probe_set_device(probe, fd, 0, 0) != 0:  # the whole device
            raise SignatureProbeError(ctypes.get_errno() or errno.EIO, "libblkid cannot read it")
        lib.blkid_probe_set_superblocks_flags(probe, _SUBLKS_TYPE_AND_USAGE)  # probed by default
        lib.blkid_probe_enable_partitions(probe, 1)
        found = lib.blkid_do_safeprobe(probe)
        if found == _NOTHING_FOUND:
            return None
        if found == _AMBIGUOUS:  # more than one signature: `blkid -p` lists them
            return "more than one signature (`blkid -p` names them)"
        if found < 0:
            raise SignatureProbeError(ctypes.get_errno() or errno.EIO, "libblkid cannot read it")
        return _described(_value(lib, probe, "TYPE"), _value(lib, probe, "USAGE"),
                          _value(lib, probe, "PTTYPE"))
    finally:
        lib.blkid_free_probe(probe)


def _value(lib: ctypes.CDLL, probe: int, name: str) -> str | None:
    data = ctypes.c_char_p()
    if lib.blkid_probe_lookup_value(probe, name.encode(), ctypes.byref(data), None) != 0:
        return None
    return data.value.decode(errors="replace") if data.value else None


def _described(kind: str | None, usage: str | None, table: str | None) -> str:
    if kind is None:
        return f"a partition table ({table})" if table else "a partition table"
    return f"a filesystem ({kind})" if usage == "filesystem" else f"a signature ({kind})"
