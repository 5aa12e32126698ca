#!/usr/bin/env python3
"""Benchmark: CPU to decode every xz Block with the system liblzma vs the one imageformats picks.

    python3 bench/xz_liblzma.py [FILE.xz] [--repeat 3]

imageformats decodes Blocks with the newest liblzma it finds: the system's liblzma.so.5 or
the copy in imagecodecs' wheel (imageformats/xz/liblzma.py).  This decodes every Block of
FILE.xz (default: bench/nbd_serve.py's 256 MiB xz case) into one reused buffer, once in a
child process forced to the system library (IMAGEFORMATS_LIBLZMA=system) and once with the
default choice, and times ``xz -dc -T1 FILE`` (the system xz tool) as the outside reference.
Prints each one's CPU seconds (best of --repeat), the liblzma versions and the ratio.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import subprocess
import sys
import tempfile


def child(path: str) -> None:
    """Decode every Block once and print "<version> <cpu seconds>"."""
    from imageformats.block import FileDevice
    from imageformats.xz import liblzma
    from imageformats.xz.device import XzDevice
    from xz_decode_buffers import decode_into_one_buffer  # bench/ is sys.path[0]

    dev = XzDevice(FileDevice(path), readahead=0)
    chunks = dev._shared.chunks
    buf = mmap.mmap(-1, max(c.usize for c in chunks))
    dev._decode_chunk_into(chunks[0], dev.backing, memoryview(buf)[:chunks[0].usize])  # fault the buffer in
    print(liblzma.version_string(), decode_into_one_buffer(dev, buf))


def run_child(path: str, library: str | None) -> tuple[str, float]:
    env = dict(os.environ)
    env.pop("IMAGEFORMATS_LIBLZMA", None)
    if library:
        env["IMAGEFORMATS_LIBLZMA"] = library
    out = subprocess.run([sys.executable, __file__, "--child", path], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0], float(out[1])


def run_xz(path: str) -> float:
    from xz_decode_buffers import cpu

    c0 = cpu(resource.RUSAGE_CHILDREN)
    subprocess.run(["xz", "-dc", "-T1", path], stdout=subprocess.DEVNULL, check=True)
    return cpu(resource.RUSAGE_CHILDREN) - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", nargs="?")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.file)
        return 0
    from nbd_serve import make_xz_image  # bench/ is sys.path[0] when run as a script

    with tempfile.TemporaryDirectory(dir="/var/tmp") as work:
        path = args.file
        if path is None:
            path = make_xz_image(work, 256 << 20)  # the image bench/nbd_serve.py serves
        xz_version = subprocess.run(["xz", "--version"], capture_output=True, text=True).stdout.split("\n")[1]
        system = chosen = xz_tool = float("inf")
        for _ in range(args.repeat):  # alternate, so drift in machine speed hits all three alike
            system_version, t = run_child(path, "system")
            system = min(system, t)
            chosen_version, t = run_child(path, None)
            chosen = min(chosen, t)
            xz_tool = min(xz_tool, run_xz(path))
    print(f"xz -dc -T1 ({xz_version:<14}) : {xz_tool:6.3f} s CPU")
    print(f"system liblzma {system_version:<10}   : {system:6.3f} s CPU")
    print(f"chosen liblzma {chosen_version:<10}   : {chosen:6.3f} s CPU")
    print(f"ratio system/chosen         : {system / chosen:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
