#!/usr/bin/env python3
"""Benchmark: decoding xz Blocks into fresh memory vs into one reused buffer.

    python3 bench/xz_decode_buffers.py [FILE.xz] [--repeat 3]

Decodes every Block of FILE.xz (default: bench/nbd_serve.py's 256 MiB xz case, a quarter
random and three quarters text, written by ``xz -1 --block-size=16MiB``) with XzDevice's
decoder, once into a freshly mapped buffer per Block (each 4 KiB page faulted in as the decoder
writes it) and once into a single buffer reused for every Block.  Prints the process CPU seconds of each (best of --repeat) and the
ratio: what buffer reuse in the chunk cache saves.  Not part of the test suite.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import subprocess
import sys
import tempfile


def cpu(who: int = resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def decode_into_one_buffer(dev, buf) -> float:
    """Decode every Block of XzDevice DEV into BUF (as big as the largest); CPU seconds."""
    c0 = cpu()
    for c in dev._shared.chunks:
        dev._decode_chunk_into(c, dev.backing, memoryview(buf)[:c.usize])
    return cpu() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", nargs="?")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from imageformats.block import FileDevice
    from nbd_serve import make_xz_image  # bench/ is sys.path[0] when run as a script
    from imageformats.xz.device import XzDevice

    with tempfile.TemporaryDirectory(dir="/var/tmp") as work:
        path = args.file
        if path is None:
            path = make_xz_image(work, 256 << 20)  # the image bench/nbd_serve.py serves
        dev = XzDevice(FileDevice(path), readahead=0)
        chunks = dev._shared.chunks
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        fresh = reused = float("inf")
        for _ in range(args.repeat):
            c0 = cpu()
            for c in chunks:
                buf = mmap.mmap(-1, c.usize, flags=flags)
                dev._decode_chunk_into(c, dev.backing, buf)
                buf.close()
            fresh = min(fresh, cpu() - c0)
            buf = mmap.mmap(-1, max(c.usize for c in chunks), flags=flags)
            reused = min(reused, decode_into_one_buffer(dev, buf))
            buf.close()
        dev.close()
    print(f"{len(chunks)} Blocks, {sum(c.usize for c in chunks) / (1 << 20):.0f} MiB")
    print(f"fresh buffer per Block : {fresh:6.3f} s CPU")
    print(f"one reused buffer      : {reused:6.3f} s CPU")
    print(f"ratio fresh/reused     : {fresh / reused:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
