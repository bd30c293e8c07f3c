"""commit_path_pieces.py (docs/benchmark/commit-path.md): run from a tree's directory, with
CLONE_DIR as for commit_path_micro.py: best-of-7 timeit of each piece of a 4 KiB O_DIRECT
WRITE's and an FSYNC's work on the event loop, DST's syscalls left out."""
import os, sys, timeit
sys.path.insert(0, os.getcwd())
import trio
from fuseclone.clone import open_clone, running
from fuseclone.sources.local import LocalSource
from fuseclone.fuse import abi, codec, session as sess
from fuseclone.fuse.fs import ImageFilesystem, DIRECT_FH
import fuseclone.destination as d
d.pwrite_all = lambda fd, data, offset: None
os.fdatasync = lambda fd: None
E = os.environ.get("CLONE_DIR", "/var/tmp/commit-path")
G = {}
def best(stmt, n=20000, g=None):
    return min(timeit.repeat(stmt, number=n, repeat=7, globals=G)) / n * 1e6

async def main():
    source = await LocalSource.open(f"{E}/micro-src.img")
    engine = open_clone(source, f"{E}/micro-dst.img", f"{E}/micro-clone.meta")
    async with running(engine):
        fs = ImageFilesystem(engine)
        fs.negotiated(abi.FUSE_DIRECT_IO_ALLOW_MMAP, lambda *x: None)
        data = os.urandom(4096)
        body = abi.write_in.pack(DIRECT_FH, 1 << 20, 4096, 0, 0, os.O_DIRECT | os.O_RDWR, 0) + data
        wmsg = bytearray(abi.in_header.pack(abi.in_header.size + len(body), codec.Opcode.WRITE, 7, fs.image_id, 0, 0, 1, 0, 0) + body)
        fbody = abi.fsync_in.pack(DIRECT_FH, 1, 0)
        fmsg = bytearray(abi.in_header.pack(abi.in_header.size + len(fbody), codec.Opcode.FSYNC, 9, fs.image_id, 0, 0, 1, 0, 0) + fbody)
        wreq = codec.parse_request(memoryview(wmsg)); freq = codec.parse_request(memoryview(fmsg))
        fs.fsync_now(freq)  # a flush just now: writes go through (the commit window)
        assert fs.write_now(wreq) is not None
        s = sess.Session(os.open("/dev/null", os.O_RDWR), fs)
        s._send = lambda parts: None
        G.update(globals()); G.update(locals())
        rows = [
            ("WRITE decode (parse_request)", "codec.parse_request(memoryview(wmsg))"),
            ("WRITE data copied out of the buffer", "memoryview(bytes(wreq.data))"),
            ("WRITE fs.write_now (engine checks, aligned copy; no pwrite)", "fs.write_now(wreq)"),
            ("WRITE reply encode", "codec.encode_reply(7, codec.WriteReply(4096))"),
            ("WRITE session._answer_now (dispatch + write_now + encode)", "s._answer_now(wreq, None)"),
            ("FSYNC decode", "codec.parse_request(memoryview(fmsg))"),
            ("FSYNC fs.fsync_now (no fdatasync)", "fs.fsync_now(freq)"),
            ("FSYNC session._answer_now", "s._answer_now(freq, None)"),
            ("os.cpu_count()", "os.cpu_count()"),
            ("_cpu_to_spare()", "sess._cpu_to_spare()"),
            ("trio checkpoint", None),
        ]
        for name, stmt in rows:
            if stmt is None:
                import time
                t = time.perf_counter()
                for _ in range(20000):
                    await trio.lowlevel.checkpoint()
                print(f"{(time.perf_counter() - t) / 20000 * 1e6:6.2f} us  {name}")
                continue
            print(f"{best(stmt) if 'cpu' not in stmt else best(stmt, 2000):6.2f} us  {name}")
trio.run(main)
