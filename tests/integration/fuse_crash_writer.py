"""Writer for the FUSE-level SIGKILL test: drives the mounted image with pwrite, fallocate
punch-hole and fsync, journalling like tests/engine/crash_child.py ("A kind block" before an op,
"F block" for each op completed before an fsync that returned). It runs until the daemon dies
under it (then every op fails) or it is killed."""

import ctypes
import ctypes.util
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.engine.crash_child import BLOCK, pattern, read_journal  # noqa: E402

PUNCH_HOLE_KEEP_SIZE = 0x02 | 0x01
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch(fd, offset, length):
    if libc.fallocate(fd, PUNCH_HOLE_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def main(image, journal, seed):
    attempted, _ = read_journal(journal)
    rng = random.Random(seed)
    nblocks = os.path.getsize(image) // BLOCK
    free = [b for b in range(nblocks) if b not in attempted]
    rng.shuffle(free)
    img = os.open(image, os.O_RDWR)
    log = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(log, b"S\n")
    done = []
    try:
        for block in free:
            kind = rng.choice("wwpdd" if rng.random() < 0.3 else "wp")
            os.write(log, f"A {kind} {block}\n".encode())
            if kind == "w":
                os.pwrite(img, pattern(block, "w"), block * BLOCK)
            elif kind == "p":
                os.pwrite(img, pattern(block, "p"), block * BLOCK + 100)
            else:
                punch(img, block * BLOCK, BLOCK)
            done.append(block)
            if rng.random() < 0.2:
                completed = list(done)
                os.fsync(img)
                os.write(log, "".join(f"F {b}\n" for b in completed).encode())
                done.clear()
    except OSError:
        pass  # the daemon was killed under us
    os.write(log, b"E\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
