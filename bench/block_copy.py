#!/usr/bin/env python3
"""Sparse copy of a raw file: imageformats.copy() vs `qemu-img convert -O raw` vs `cp --sparse=always`.

    python3 bench/block_copy.py [SIZE_MIB]        (default 1024: a 1 GiB file, half data, half holes)

The source alternates 4 MiB of random data with 4 MiB holes, plus one 4 MiB run of
*allocated* zeroes every 64 MiB (which a sparse copy must turn into a hole).  Each
tool copies it to a fresh file in the same directory; every output is checked with
cmp and its allocated size is printed.  Best of 3 runs, warm page cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from imageformats.block import MiB, FileDevice, copy  # noqa: E402


def make_source(path: str, size: int) -> None:
    chunk = 4 * MiB
    with open(path, "wb") as f:
        f.truncate(size)
        for i, off in enumerate(range(0, size, 2 * chunk)):
            f.seek(off)
            f.write(bytes(chunk) if i % 8 == 7 else os.urandom(min(chunk, size - off)))


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    size = int(sys.argv[1]) * MiB if len(sys.argv) > 1 else 1024 * MiB
    tmp = tempfile.mkdtemp(prefix="bench-copy-", dir=os.environ.get("BENCH_DIR"))
    try:
        src = os.path.join(tmp, "src.raw")
        make_source(src, size)
        subprocess.run(["cat", src], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        outs = {name: os.path.join(tmp, f"{name}.raw") for name in ("ours", "ours-1thread", "qemu-img", "cp")}

        def ours(workers: int, out: str):
            def go():
                with FileDevice(src) as s, FileDevice.create(out, s.size) as d:
                    copy(s, d, dst_is_zero=True, workers=workers)
                    d.flush()
            return go

        def qemu():
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", src, outs["qemu-img"]], check=True)
            os.sync()

        def cp():
            subprocess.run(["cp", "--sparse=always", src, outs["cp"]], check=True)
            subprocess.run(["sync", outs["cp"]], check=True)

        results = {
            "ours": best_of(3, ours(2, outs["ours"])),
            "ours-1thread": best_of(3, ours(1, outs["ours-1thread"])),
            "qemu-img": best_of(3, qemu),
            "cp": best_of(3, cp),
        }
        print(f"source: {size // MiB} MiB, {os.stat(src).st_blocks * 512 // MiB} MiB allocated")
        for name, secs in results.items():
            subprocess.run(["cmp", src, outs[name]], check=True)
            alloc = os.stat(outs[name]).st_blocks * 512 // MiB
            print(f"{name:14s} {secs:7.3f} s  {size / MiB / secs:8.0f} MiB/s  output allocated {alloc} MiB")
        print(f"ratio ours / qemu-img convert:   {results['ours'] / results['qemu-img']:.2f}x the time")
        print(f"ratio ours / cp --sparse=always: {results['ours'] / results['cp']:.2f}x the time")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
