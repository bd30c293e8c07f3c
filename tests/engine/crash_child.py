"""Child process for the SIGKILL crash test: runs the engine with a workload until killed.

Every block (4 KiB, = one region) is touched at most once over all runs, so the parent can tell
exactly what each block must hold. Before an op starts it appends "A kind block" to the journal;
after a flush returns it appends "F block" for every op that had completed before the flush
began. Journal appends survive SIGKILL (page cache), which is the crash this test makes.
"""

import os
import random
import sys

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from fuseclone import markahead  # noqa: E402
from fuseclone.clone import open_clone, running  # noqa: E402
from fuseclone.engine import Settings  # noqa: E402
from fuseclone.sources.local import LocalSource  # noqa: E402

BLOCK = 4096


def pattern(block: int, kind: str) -> bytes:
    rng = random.Random(block * 7 + ord(kind))
    n = BLOCK if kind == "w" else 1000
    return rng.randbytes(n)


def read_journal(path):
    attempted, flushed = {}, set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[0] == "A":
                    attempted[int(parts[2])] = parts[1]
                elif len(parts) == 2 and parts[0] == "F":
                    flushed.add(int(parts[1]))
    return attempted, flushed


async def flush(engine, rng):
    """A flush as the FUSE layer makes it: one fdatasync of DST in a thread when that is enough
    (`flush_now`: it runs beside the committer's commits), else a commit."""
    datasync = engine.flush_now() if rng.random() < 0.5 else None
    if datasync is None:
        await engine.flush()
    else:
        await trio.to_thread.run_sync(datasync)


async def main(src, dst, meta, journal, seed):
    attempted, _ = read_journal(journal)
    source = await LocalSource.open(src)
    nblocks = source.size // BLOCK
    rng = random.Random(seed)
    if rng.random() < 0.5:  # mark only the written chunks: 1 MiB marks would soon cover all 4 MiB
        markahead.NEIGHBOURHOOD = markahead.MAX_WINDOW = BLOCK
    free = [b for b in range(nblocks) if b not in attempted]
    rng.shuffle(free)
    engine = open_clone(source, dst, meta, region_size=BLOCK,
                        settings=Settings(hydration_batch_size=4, hydration_threshold=16,
                                          commit_interval=rng.choice([0.05, 5.0, 5.0]),
                                          max_rate=8 << 20))
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    done = []
    async with running(engine):
        os.write(fd, b"S\n")  # started: the parent may kill from now on
        for block in free:
            kind = rng.choice("wwpdd" if rng.random() < 0.3 else "wp")
            os.write(fd, f"A {kind} {block}\n".encode())
            if kind == "w":  # direct: written through to DST's disk while flushes are frequent
                await engine.write(block * BLOCK, pattern(block, "w"), direct=rng.random() < 0.3)
            elif kind == "p":
                await engine.write(block * BLOCK + 100, pattern(block, "p"))
            else:
                await engine.discard(block * BLOCK, BLOCK)
            done.append(block)
            if rng.random() < 0.2:
                completed = list(done)
                await flush(engine, rng)
                os.write(fd, "".join(f"F {b}\n" for b in completed).encode())
                done.clear()
            await trio.sleep(rng.uniform(0, 0.001))
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, *sys.argv[1:5], int(sys.argv[5]))
