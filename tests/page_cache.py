"""What of a file the page cache holds, asked without reading anything in."""
import ctypes
import mmap
import os

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def cached_pages(path: str, offset: int = 0, length: int | None = None) -> int:
    """How many of the file's pages in [offset, offset + length) are in its page cache and up
    to date: mincore(2) of a mapping, which reads none in. A read with RWF_NOWAIT is no such
    test: when it misses, it starts the read, and on a loaded host that read sometimes
    finishes before it looks again, so that it finds the pages it was meant to find absent."""
    size = os.path.getsize(path)
    length = size - offset if length is None else min(length, size - offset)
    first = offset // mmap.PAGESIZE * mmap.PAGESIZE
    pages = (offset + length - first + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    if pages <= 0:
        return 0
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        start = ctypes.c_char.from_buffer(mapped)  # ACCESS_COPY only so ctypes takes its address
        try:
            if _LIBC.mincore(ctypes.addressof(start) + first, pages * mmap.PAGESIZE, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del start
    return sum(v & 1 for v in vec)
