"""The process's one handle on libc, for the calls Python's os module lacks, with their
prototypes declared once.

libc is reached through the process's own symbols: find_library("c") would run ldconfig at
every start."""

from __future__ import annotations

import ctypes

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
M_ARENA_MAX = -8  # mallopt parameter (malloc.h)
libc.malloc_trim.argtypes = [ctypes.c_size_t]

# io_uring has no wrapper in glibc: uring.py calls it by number
libc.syscall.restype = ctypes.c_long
libc.syncfs.argtypes = [ctypes.c_int]
