#!/usr/bin/env python3
"""Writing a new file in large pwrite()s vs FileDevice's 256 KiB pieces (block._MAX_PWRITE).

    python3 bench/pwrite_size.py [--size 512M] [--dir /var/tmp] [--idle 8] [--repeat 3]

Linux sizes page-cache folios after the length of a write.  A large folio needs a large
free block of memory, and in a VM with virtio-balloon free page reporting those blocks are
the ones the host has taken back, so every first touch faults in the host as well.  Each run
writes --size bytes of random data to a fresh file, after --idle seconds of idleness (time for
the guest to report the memory freed by the previous run), in 4 MiB, 1 MiB and 256 KiB
os.pwrite() calls and through FileDevice.pwrite() of 4 MiB buffers.  Page cache only: no
fsync.  Prints the best time of each and the ratio to 4 MiB pwrites (> 1: faster).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = ROOT

from imageformats.block import FileDevice, MiB  # noqa: E402
from imageformats.cli.common import parse_size  # noqa: E402


def write_raw_calls(path: str, data: memoryview, size: int, piece: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, size, piece):
            os.pwrite(fd, data[:piece], off)
    finally:
        os.close(fd)


def write_file_device(path: str, data: memoryview, size: int) -> None:
    with FileDevice.create(path, size) as dev:
        for off in range(0, size, len(data)):
            dev.pwrite(data, off)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512M")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--idle", type=float, default=8.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    size = parse_size(args.size) // (4 * MiB) * (4 * MiB)
    data = memoryview(os.urandom(4 * MiB))
    workdir = tempfile.mkdtemp(prefix="pwrite-bench-", dir=args.dir)
    path = os.path.join(workdir, "out.raw")
    ways = {
        "os.pwrite 4 MiB": lambda: write_raw_calls(path, data, size, 4 * MiB),
        "os.pwrite 1 MiB": lambda: write_raw_calls(path, data, size, MiB),
        "os.pwrite 256 KiB": lambda: write_raw_calls(path, data, size, 256 * 1024),
        "FileDevice.pwrite 4 MiB": lambda: write_file_device(path, data, size),
    }
    best = {name: float("inf") for name in ways}
    print(f"{size // MiB} MiB per run, {args.idle} s idle before each, best of {args.repeat}; "
          f"load average {os.getloadavg()[0]:.2f}")
    try:
        for _ in range(args.repeat):
            order = list(ways)
            random.shuffle(order)
            for name in order:
                time.sleep(args.idle)
                t0 = time.perf_counter()
                ways[name]()
                best[name] = min(best[name], time.perf_counter() - t0)
                os.unlink(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(workdir)
    ref = best["os.pwrite 4 MiB"]
    for name, t in best.items():
        print(f"  {name:<26} {t:7.3f} s   ratio {ref / t:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
