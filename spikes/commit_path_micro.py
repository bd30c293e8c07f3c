"""commit_path_micro.py N [FSYNC_EVERY] (docs/benchmark/commit-path.md): run from a tree's
directory, with CLONE_DIR holding a hydrated clone micro-src.img / micro-dst.img /
micro-clone.meta (`fuseclone mount`, `wait`, `unmount`). A Session over a SOCK_SEQPACKET pair
(standing in for /dev/fuse); a client
thread sends 4 KiB O_DIRECT WRITEs at random offsets and an FSYNC after every FSYNC_EVERY,
one at a time (a chain). Prints the event loop thread's CPU (user+sys) per request."""
import os, random, resource, socket, sys, threading, time
sys.path.insert(0, os.getcwd())
import trio
from fuseclone.clone import open_clone, running
from fuseclone.sources.local import LocalSource
from fuseclone.fuse import abi, codec, session as sess
from fuseclone.fuse.fs import ImageFilesystem, DIRECT_FH

E = os.environ.get("CLONE_DIR", "/var/tmp/commit-path")
N = int(sys.argv[1]); EVERY = int(sys.argv[2]) if len(sys.argv) > 2 else 0

def client(sock, image_id, done):
    rng = random.Random(1); data = os.urandom(4096); unique = 0
    def call(opcode, body, extra=b""):
        nonlocal unique
        unique += 2
        msg = abi.in_header.pack(abi.in_header.size + len(body) + len(extra), opcode, unique, image_id, 0, 0, 1, 0, 0) + body + extra
        sock.send(msg)
        reply = sock.recv(4096)
        _, err, u = abi.out_header.unpack_from(reply)
        assert u == unique and err == 0, (u, err)
    n = 0
    t0 = time.perf_counter()
    while n < N:
        off = rng.randrange(0, 128 << 20 >> 12) << 12
        call(codec.Opcode.WRITE, abi.write_in.pack(DIRECT_FH, off, 4096, 0, 0, os.O_DIRECT | os.O_RDWR, 0), data); n += 1
        if EVERY and n % EVERY == 0:
            call(codec.Opcode.FSYNC, abi.fsync_in.pack(DIRECT_FH, 1, 0)); n += 1
    done.append(time.perf_counter() - t0)
    sock.close()

if os.environ.get("NO_DST_SYSCALLS"):  # DST's syscalls left out: the daemon's own work alone
    import fuseclone.destination as d, fuseclone.blockio as b
    d.pwrite_all = lambda fd, data, offset: None
    os.fdatasync = lambda fd: None

async def main():
    source = await LocalSource.open(f"{E}/micro-src.img")
    engine = open_clone(source, f"{E}/micro-dst.img", f"{E}/micro-clone.meta")
    async with running(engine):
        fs = ImageFilesystem(engine)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s = sess.Session(a.detach(), fs)
        fs.negotiated(abi.FUSE_DIRECT_IO_ALLOW_MMAP, lambda *x: None)
        done = []
        t = threading.Thread(target=client, args=(b, fs.image_id, done)); 
        r0 = resource.getrusage(resource.RUSAGE_THREAD)
        t.start()
        await s.run()
        r1 = resource.getrusage(resource.RUSAGE_THREAD)
        t.join()
        print(f"{os.getcwd()} N={N} fsync_every={EVERY}: loop thread cpu/request "
              f"user {(r1.ru_utime - r0.ru_utime) / N * 1e6:.1f} us sys {(r1.ru_stime - r0.ru_stime) / N * 1e6:.1f} us; "
              f"wall/request {done[0] / N * 1e6:.1f} us")
trio.run(main)
