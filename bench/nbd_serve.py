#!/usr/bin/env python3
"""Benchmark: nbdcopy from the built-in NBD server vs nbdkit, over a Unix socket (captive servers).

    python3 bench/nbd_serve.py [--size 1G] [--cases raw,xz,luks] [--repeat 2] [--dir /var/tmp]

raw:  a fully written (random) raw file: imageformats serve FILE  vs  nbdkit file FILE
xz:   a multi-block xz of a raw image: imageformats serve F.xz  vs  nbdkit file F.xz --filter=xz
luks: a LUKS1 image made by qemu-img: imageformats serve --passphrase-file  vs  nbdkit --filter=luks
Each copy is ``nbdcopy -- [ SERVER ] null:`` (the server started by nbdcopy through
socket activation); best of --repeat runs.  Prints both rates and ours/theirs.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

IMAGEFORMATS = [sys.executable, "-m", "imageformats"]


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def timed_copy(server: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(["nbdcopy", "--", "[", *server, "]", "null:"], check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def make_random_raw(path: str, size: int) -> None:
    chunk = 16 << 20
    with open(path, "wb") as f:
        done = 0
        while done < size:
            n = min(chunk, size - done)
            f.write(os.urandom(n))
            done += n


def make_compressible_raw(path: str, size: int) -> None:
    """Half random, half text-like: xz gets ~2x, decompression work is realistic."""
    chunk = 1 << 20
    text = (b"imageformats benchmark line with some repeated words 0123456789\n" * 20000)[:chunk]
    with open(path, "wb") as f:
        for i in range(size // chunk):
            f.write(os.urandom(chunk // 2) + text[: chunk // 2] if i % 2 else text)


def report(name: str, size: int, ours: float, theirs: float, peer: str) -> None:
    mib = size / (1 << 20)
    print(f"{name:5s} imageformats serve: {ours:7.2f} s  {mib / ours:8.1f} MiB/s")
    print(f"{name:5s} {peer:18s}: {theirs:7.2f} s  {mib / theirs:8.1f} MiB/s")
    print(f"{name:5s} ratio (ours / nbdkit throughput): {theirs / ours:.2f}x")
    sys.stdout.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="guest size for raw (default 1G); xz/luks use a quarter")
    ap.add_argument("--cases", default="raw,xz,luks")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to put the images (default: a temp dir)")
    args = ap.parse_args()
    size = parse_size(args.size)
    cases = args.cases.split(",")
    work = tempfile.mkdtemp(prefix="nbd-bench-", dir=args.dir)
    try:
        if "raw" in cases:
            raw = os.path.join(work, "disk.raw")
            make_random_raw(raw, size)
            ours = timed_copy([*IMAGEFORMATS, "serve", raw], args.repeat)
            theirs = timed_copy(["nbdkit", "file", raw], args.repeat)
            report("raw", size, ours, theirs, "nbdkit file")
            os.unlink(raw)
        small = max(size // 4, 16 << 20)
        if "xz" in cases:
            raw = os.path.join(work, "x.raw")
            make_compressible_raw(raw, small)
            xz = raw + ".xz"
            with open(xz, "wb") as out:
                subprocess.run(["xz", "-T2", "-1", "--block-size=16MiB", "-c", raw], stdout=out, check=True)
            ours = timed_copy([*IMAGEFORMATS, "serve", xz], args.repeat)
            theirs = timed_copy(["nbdkit", "file", xz, "--filter=xz"], args.repeat)
            report("xz", small, ours, theirs, "nbdkit --filter=xz")
            os.unlink(raw)
            os.unlink(xz)
        if "luks" in cases:
            raw = os.path.join(work, "l.raw")
            make_random_raw(raw, small)
            secret = os.path.join(work, "pass")
            with open(secret, "w") as f:
                f.write("bench-passphrase")
            luks = os.path.join(work, "disk.luks")
            for attempt in range(5):  # qemu's PBKDF2 benchmark can fail on a loaded machine
                proc = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "luks", "--object",
                                       f"secret,id=sec0,file={secret}", "-o", "key-secret=sec0,iter-time=100",
                                       raw, luks])
                if proc.returncode == 0:
                    break
            else:
                raise SystemExit("qemu-img could not create the LUKS image")
            ours = timed_copy([*IMAGEFORMATS, "serve", "--passphrase-file", secret, luks], args.repeat)
            theirs = timed_copy(["nbdkit", "file", luks, "--filter=luks", f"passphrase=+{secret}"], args.repeat)
            report("luks", small, ours, theirs, "nbdkit --filter=luks")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
