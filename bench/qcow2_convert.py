#!/usr/bin/env python3
"""Benchmark: ``imageformats convert -O qcow2 [-c]`` against ``qemu-img convert -O qcow2 [-c]``.

Source: a 1 GiB sparse raw file, half of it allocated with random data in islands
(plus, with --compressible, islands of compressible text-like data instead).
Both tools run on the same source into the same directory, alternately (best of
--runs each); the page cache is warm for both (the source is read once before
timing).  We fsync the result (after starting writeback as we go); qemu-img
convert's default cache mode (unsafe) does not flush, so a second qemu-img figure
adds `sync FILE` (an fsync of its output) for an equally durable result.  Prints both times and
the ratio (qemu-img time / our time: >= 1.0 means we are at least as fast).

    python3 bench/qcow2_convert.py [--size 1G] [--dir /tmp] [--compressible] [--runs 1] [--together]
"""

from __future__ import annotations

import os
import sys

# The repository root instead of bench/ (whose module names, e.g. copy.py, would shadow the stdlib).
sys.path[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

import argparse  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


from imageformats.block import FileDevice  # noqa: E402
from imageformats.cli.common import parse_size  # noqa: E402
from imageformats.qcow2.writer import write_qcow2  # noqa: E402

MiB = 1 << 20


def make_source(path: str, size: int, compressible: bool, seed: int = 1) -> int:
    """Islands of 1-16 MiB of data separated by holes, about half the size allocated."""
    rng = np.random.default_rng(seed)
    words = np.array([b"alpha ", b"beta ", b"gamma ", b"delta ", b"qcow2 ", b"cluster ", b"\n", b"0123 "])
    allocated = 0
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            island = int(rng.integers(1, 17)) * MiB
            gap = island
            n = min(island, size - pos)
            if compressible:
                data = b"".join(words[rng.integers(0, len(words), n // 4)])[:n]
                data = data.ljust(n, b"x")
            else:
                data = rng.bytes(n)
            f.seek(pos)
            f.write(data)
            allocated += n
            pos += island + gap
    return allocated


CPU = {"ours": 0.0, "qemu": 0.0, "sync": 0.0}


def timed(fn, who: str) -> float:
    """Wall time of fn(); its CPU time (ours: this process, qemu: children) is added to CPU[who]."""
    r0 = resource.getrusage(resource.RUSAGE_SELF if who == "ours" else resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF if who == "ours" else resource.RUSAGE_CHILDREN)
    CPU[who] += (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--dir", default=None, help="work directory (default: a new temporary one)")
    ap.add_argument("--compressible", action="store_true", help="text-like data instead of random bytes")
    ap.add_argument("--runs", type=int, default=1, help="best of N runs")
    ap.add_argument("--compression-type", default="zlib", choices=["zlib", "zstd"])
    ap.add_argument("--together", action="store_true",
                    help="run both tools at the same time (same conditions on a machine others are loading)")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = tempfile.mkdtemp(prefix="qcow2-bench-", dir=args.dir)
    try:
        src = os.path.join(work, "src.raw")
        allocated = make_source(src, size, args.compressible)
        subprocess.run(["sync", src], check=True)
        with open(src, "rb") as f:  # warm the page cache for both tools
            while f.read(16 * MiB):
                pass
        print(f"source: {size >> 20} MiB virtual, {allocated >> 20} MiB allocated "
              f"({'compressible text' if args.compressible else 'random data'})")
        ok = True
        for compress in (False, True):
            ours_out = os.path.join(work, "ours.qcow2")
            qemu_out = os.path.join(work, "qemu.qcow2")
            opts = {"compression_type": args.compression_type}
            qemu_o = ["-o", f"compression_type={args.compression_type}"]
            if compress:
                opts["compress"] = "on"

            def ours():
                with FileDevice(src) as dev:
                    write_qcow2(dev, ours_out, dict(opts))

            def qemu():
                subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *qemu_o,
                                *(["-c"] if compress else []), src, qemu_out], check=True)

            def qemu_sync():  # qemu-img convert does not flush; this makes its output as durable as ours
                qemu()
                subprocess.run(["sync", qemu_out], check=True)

            if args.together:
                # Both at once, under the same conditions (useful on a machine others are loading).
                cmd_ours = [sys.executable, "-m", "imageformats", "convert", "-O", "qcow2",
                            *(["-c"] if compress else []), "-o", f"compression_type={args.compression_type}",
                            src, ours_out]
                cmd_qemu = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *qemu_o,
                            *(["-c"] if compress else []), src, qemu_out]
                t0 = time.perf_counter()
                procs = {"ours": subprocess.Popen(cmd_ours), "qemu": subprocess.Popen(cmd_qemu)}
                done: dict[str, float] = {}
                while len(done) < 2:
                    for who, p in procs.items():
                        if who not in done and p.poll() is not None:
                            done[who] = time.perf_counter() - t0
                    time.sleep(0.01)
                label = f"together: convert -O qcow2{' -c' if compress else ''}"
                print(f"{label:32s} imageformats {done['ours']:7.3f} s   qemu-img {done['qemu']:7.3f} s   "
                      f"ratio {done['qemu'] / done['ours']:5.2f}x")
                continue
            t_ours = t_qemu = t_qemu_sync = float("inf")
            CPU.update(ours=0.0, qemu=0.0, sync=0.0)
            for run in range(args.runs):  # alternate (order rotating), so a busy moment hits both tools alike
                for path in (ours_out, qemu_out):
                    if os.path.exists(path):
                        os.unlink(path)
                steps = [("ours", ours), ("qemu", qemu), ("sync", qemu_sync)]
                for who, fn in steps[run % 3:] + steps[: run % 3]:
                    for path in ((ours_out,) if who == "ours" else (qemu_out,)):
                        if os.path.exists(path):
                            os.unlink(path)
                    t = timed(fn, who)
                    if who == "ours":
                        t_ours = min(t_ours, t)
                    elif who == "qemu":
                        t_qemu = min(t_qemu, t)
                        subprocess.run(["sync", qemu_out], check=True)  # untimed: no dirty data left behind
                    else:
                        t_qemu_sync = min(t_qemu_sync, t)
            same = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", src, ours_out]).returncode == 0
            check = subprocess.run(["qemu-img", "check", "-q", ours_out]).returncode == 0
            ok &= same and check
            label = f"convert -O qcow2{' -c' if compress else ''} ({args.compression_type})"
            print(f"{label:32s} imageformats {t_ours:7.3f} s ({os.path.getsize(ours_out) >> 20} MiB)   "
                  f"qemu-img {t_qemu:7.3f} s ({os.path.getsize(qemu_out) >> 20} MiB)   "
                  f"ratio {t_qemu / t_ours:5.2f}x   compare {'ok' if same else 'DIFFERS'}, "
                  f"check {'ok' if check else 'FAILED'}")
            print(f"{'':32s} qemu-img + sync FILE {t_qemu_sync:7.3f} s   ratio {t_qemu_sync / t_ours:5.2f}x   "
                  f"CPU seconds per run: imageformats {CPU['ours'] / args.runs:.2f}, "
                  f"qemu-img {CPU['qemu'] / args.runs:.2f}")
        return 0 if ok else 1
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
