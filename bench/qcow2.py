#!/usr/bin/env python3
"""qcow2 reading, side by side with qemu-img (run by hand, not part of the test suite).

    python3 bench/qcow2.py [--size-mib 1024] [--dir /var/tmp]

1. qcow2 -> raw of an image half allocated with random data: imageformats convert vs qemu-img convert.
2. deflate-compressed qcow2 -> raw (decompression on both cores): same comparison.
3. map of a 1 TiB-virtual image holding 1 GiB of data: our extents vs qemu-img map.
Prints both times and the ratio (qemu time / our time: > 1 means we are faster).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MiB = 1 << 20


def sh(*args):
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ours_convert(src: str, dst: str) -> None:
    sh(sys.executable, "-m", "imageformats", "convert", "-O", "raw", src, dst)


def lib_convert(src: str, dst: str) -> None:
    """The same conversion in this process (no interpreter start-up, formats already imported)."""
    import imageformats
    from imageformats import detect

    with imageformats.open(src) as dev:
        detect.get_output("raw").write(dev, dst, {})


def qemu_convert(src: str, dst: str) -> None:
    sh("qemu-img", "convert", "-O", "raw", src, dst)


def drop(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)


def report(name: str, ours: float, qemu: float, extra: str = "") -> None:
    print(f"{name:<46} ours {ours:7.2f} s   qemu-img {qemu:7.2f} s   ratio {qemu / ours:5.2f}x {extra}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    size = args.size_mib * MiB
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        raw = os.path.join(d, "src.raw")
        # half allocated: alternate 16 MiB of random data and 16 MiB of hole
        with open(raw, "wb") as f:
            f.truncate(size)
            for off in range(0, size, 32 * MiB):
                f.seek(off)
                f.write(rng.integers(0, 256, 16 * MiB, dtype=np.uint8).tobytes())
        img = os.path.join(d, "half.qcow2")
        sh("qemu-img", "convert", "-O", "qcow2", raw, img)
        out = os.path.join(d, "out.raw")
        sh("sync")
        q = timed(lambda: qemu_convert(img, out))
        drop(out)
        o = timed(lambda: ours_convert(img, out))
        drop(out)
        lib_convert(img, out)  # warm-up: imports
        drop(out)
        o_lib = timed(lambda: lib_convert(img, out))
        drop(out)
        report(f"qcow2 -> raw, {args.size_mib} MiB half random (CLI)", o, q, "(goal >= 0.8x)")
        report(f"qcow2 -> raw, {args.size_mib} MiB half random (library)", o_lib, q)

        # compressible data (small alphabet: deflate ratio ~2), every cluster compressed
        with open(raw, "wb") as f:
            for off in range(0, size, 16 * MiB):
                f.write(rng.integers(0, 16, 16 * MiB, dtype=np.uint8).tobytes())
        zimg = os.path.join(d, "z.qcow2")
        sh("qemu-img", "convert", "-c", "-O", "qcow2", raw, zimg)
        drop(raw)
        q = timed(lambda: qemu_convert(zimg, out))
        drop(out)
        o = timed(lambda: ours_convert(zimg, out))
        drop(out)
        o_lib = timed(lambda: lib_convert(zimg, out))
        drop(out)
        report(f"deflate qcow2 -> raw, {args.size_mib} MiB (CLI)", o, q, "(goal >= 1.0x)")
        report(f"deflate qcow2 -> raw, {args.size_mib} MiB (library)", o_lib, q)
        drop(zimg)

        # 1 TiB virtual, 1 GiB of data in 1 MiB pieces scattered over the whole disk
        big = os.path.join(d, "big.qcow2")
        sh("qemu-img", "create", "-f", "qcow2", big, "1T")
        offsets = sorted(set(int(x) * MiB for x in rng.integers(0, (1 << 40) // MiB, 1024)))
        cmds = []
        for o_ in offsets:
            cmds += ["-c", f"write -P 7 {o_} 1M"]
        sh("qemu-io", "-f", "qcow2", *cmds, big)

        def our_map():
            import imageformats

            with imageformats.open(big) as dev:
                return sum(1 for _ in dev.extents(dev.size, 0))

        q = timed(lambda: sh("qemu-img", "map", "--output=json", big))
        o = timed(our_map)
        o_cli = timed(lambda: sh(sys.executable, "-m", "imageformats", "map", "--output", "json", big))
        report("map, 1 TiB virtual / 1 GiB data (library)", o, q, "(goal < 2 s)")
        report("map, 1 TiB virtual / 1 GiB data (CLI process)", o_cli, q)


if __name__ == "__main__":
    main()
