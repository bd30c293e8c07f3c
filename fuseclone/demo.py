"""`fuseclone demo`: the whole story in one command, cleaned up even on Ctrl-C.

Builds a sample ext4 image full of files, serves it through nbdkit with added latency and a
bandwidth cap (a deliberately slow source), clones it with hydration off, loop-mounts the clone
and uses the files at once, runs fstrim so free space is never copied, enables hydration and
shows progress to the end, then checks the destination alone by mounting it directly.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack

from rich.console import Console

from .control import remove_logs
from .errors import FusecloneError
from .status import human_bytes

console = Console(highlight=False)
MIN_SIZE = 16 << 20  # the sample files' fixed part (about 3 MiB) and ext4's own fit


def sh(*args: str, check: bool = True, capture: bool = True) -> str:
    result = subprocess.run(args, check=False, capture_output=capture, text=True)
    if check and result.returncode:
        raise FusecloneError(f"{' '.join(args)} failed ({result.returncode}): {(result.stderr or '').strip()}")
    return result.stdout or ""


def fuseclone(*args: str, capture: bool = True) -> str:
    return sh(sys.executable, "-m", "fuseclone", *args, capture=capture)


def step(text: str) -> None:
    console.print(f"\n[bold cyan]==>[/] [bold]{text}[/]")


def make_sample_files(root: str, total: int) -> dict[str, str]:
    """Files of random content (a quarter of the image), returns name -> sha256."""
    rng = random.Random(42)
    os.makedirs(os.path.join(root, "docs"))
    sums = {}
    budget = total // 4
    sizes = [budget // 2] + [budget // 16] * 6 + [4096 * rng.randint(1, 32) for _ in range(40)]
    for i, size in enumerate(sizes):
        name = f"docs/file{i:03d}.bin" if i else "big.bin"
        data = rng.randbytes(size)
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    with open(os.path.join(root, "README.txt"), "w") as f:
        f.write("Hello from a clone that is still being copied.\n")
    sums["README.txt"] = hashlib.sha256(b"Hello from a clone that is still being copied.\n").hexdigest()
    return sums


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_tree(root: str, sums: dict[str, str]) -> int:
    return sum(1 for name, digest in sums.items() if sha256_file(os.path.join(root, name)) != digest)


def start_slow_source(work: str, image: str, rate: int, latency_ms: float, stack: ExitStack) -> str:
    """nbdkit serving the image with latency and a bandwidth cap; falls back to the local file
    when nbdkit is missing."""
    if shutil.which("nbdkit") is None:
        console.print("[yellow]nbdkit not found: using the local image as the source[/]")
        return image
    sock = os.path.join(work, "nbd.sock")
    proc = subprocess.Popen(["nbdkit", "--exit-with-parent", "-f", "-r", "-U", sock,
                             "--filter=delay", "--filter=rate", "file", image,
                             f"rdelay={latency_ms}ms", f"rate={rate * 8}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stack.callback(lambda: (proc.terminate(), proc.wait()))
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise FusecloneError(f"nbdkit did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
        time.sleep(0.05)
    return f"nbd+unix:///?socket={sock}"


def run_demo(size: int, rate: int, latency_ms: float, keep: bool) -> int:
    if os.geteuid() != 0:
        console.print("[red]the demo needs root (loop devices and mount)[/]")
        return 1
    work = tempfile.mkdtemp(prefix="fuseclone-demo-", dir="/var/tmp")
    with ExitStack() as stack:
        if not keep:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
            stack.callback(remove_logs, os.path.join(work, "clone.meta"))  # its mount's log
        try:
            return _demo(work, size, rate, latency_ms, stack)
        except KeyboardInterrupt:
            console.print("\n[yellow]interrupted: cleaning up[/]")
            return 130
        finally:
            if keep:
                console.print(f"\nwork directory kept: {work}")


def _demo(work: str, size: int, rate: int, latency_ms: float, stack: ExitStack) -> int:
    image, dst, meta = (os.path.join(work, n) for n in ("source.img", "dest.img", "clone.meta"))
    mnt, fs_mnt, dst_mnt = (os.path.join(work, n) for n in ("mnt", "fs", "dst-fs"))
    for d in (mnt, fs_mnt, dst_mnt):
        os.mkdir(d)

    step(f"building a {human_bytes(size)} ext4 image full of files")
    tree = os.path.join(work, "tree")
    sums = make_sample_files(tree, size)
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", tree, "-E", "nodiscard", image, str(size // 1024) + "k")
    console.print(f"{len(sums)} files, {human_bytes(sum(os.path.getsize(os.path.join(tree, n)) for n in sums))} of data")

    source = start_slow_source(work, image, rate, latency_ms, stack)
    step(f"slow source: {source}  ({latency_ms:g} ms per read, {human_bytes(rate)}/s)")

    t0 = time.monotonic()
    step("fuseclone mount (hydration off for now, like dm-clone's example)")
    image_path = fuseclone("mount", source, dst, meta, mnt, "--no-hydration").strip()
    stack.callback(lambda: sh(sys.executable, "-m", "fuseclone", "unmount", mnt, check=False))
    console.print(f"image at {image_path}")
    loop = sh("losetup", "-f", "--show", image_path).strip()
    stack.callback(lambda: sh("losetup", "-d", loop, check=False))
    sh("mount", loop, fs_mnt)
    stack.callback(lambda: sh("umount", fs_mnt, check=False))
    readme = open(os.path.join(fs_mnt, "README.txt")).read().strip()
    console.print(f"[green]usable after {time.monotonic() - t0:.2f} s[/]: {loop} mounted at {fs_mnt}")
    console.print(f"  cat README.txt -> {readme!r}")
    console.print(f"  ls: {', '.join(sorted(os.listdir(fs_mnt))[:6])}, ...")

    step("fstrim: free space is marked hydrated and never copied")
    console.print("  " + sh("fstrim", "-v", fs_mnt).strip())
    fuseclone("status", mnt, capture=False)

    step("enable_hydration, and watch it finish while the files stay in use")
    fuseclone("message", mnt, "enable_hydration")
    bad = verify_tree(fs_mnt, sums)
    console.print(f"  read every file through the clone while hydrating: {len(sums) - bad}/{len(sums)} match")
    fuseclone("status", mnt, "--watch", capture=False)
    fuseclone("wait", mnt)

    step("unmount, and use the destination alone")
    sh("umount", fs_mnt)
    sh("losetup", "-d", loop)
    fuseclone("unmount", mnt)
    fuseclone("check", meta, capture=False)
    sh("mount", "-o", "ro,loop", dst, dst_mnt)
    try:
        bad_dst = verify_tree(dst_mnt, sums)
    finally:
        sh("umount", dst_mnt)
    sparse = os.stat(dst).st_blocks * 512
    console.print(f"destination alone: {len(sums) - bad_dst}/{len(sums)} files match; "
                  f"it occupies {human_bytes(sparse)} of {human_bytes(size)} (free space was never copied)")
    ok = bad == 0 and bad_dst == 0
    console.print("[bold green]demo complete[/]" if ok else "[bold red]demo found differences[/]")
    return 0 if ok else 1
