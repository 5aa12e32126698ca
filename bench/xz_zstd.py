#!/usr/bin/env python3
"""Seekable xz / zstd: our reader and writer side by side with the reference tools.

    python3 bench/xz_zstd.py [--size 1G] [--dir /var/tmp/xzbench] [--reads 300]
    python3 bench/xz_zstd.py --dir /var/tmp/xzb --skip-zstd --skip-writer --skip-reads --repeat 5

Builds a VM-disk-like raw image (runs of zeroes, of real text taken from the
Python standard library sources, and of random bytes; --data-percent of the
image is non-zero), then measures, each in the same run:

1. writer:  ``imageformats convert -O xz -o block_size=16M,level=6``
            vs ``xz -T2 -6 --block-size=16MiB`` (equal settings)
2. sequential decode to a new sparse raw file, fsynced on both sides:
            ``imageformats convert -O raw`` vs ``xz -d -T2 -k && sync FILE``
            (xz also writes sparse files), best of --repeat alternating runs
3. random 4 KiB reads (same seeded offsets, cold start, in one process each):
            XzDevice vs python-xz (``xz.open``) vs nbdkit's xz filter read
            through python3-libnbd (``nbdkit --filter=xz file``)
4. the same for seekable zstd: writer vs ``zstd -T2 -3``, random reads vs
   pyzstd's SeekableZstdFile.

Prints every figure and the ratio (> 1 means we are faster).  Not part of
the test suite.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = ROOT  # not bench/: bench/copy.py would shadow the stdlib copy module


from imageformats.cli.common import parse_size  # noqa: E402
from imageformats.xz import XzDevice  # noqa: E402
from imageformats.zstd import ZstdDevice  # noqa: E402
from imageformats.block import FileDevice  # noqa: E402

MiB = 1 << 20
RUN = 4 * MiB


def corpus() -> bytes:
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    out = bytearray()
    for f in files:
        with open(f, "rb") as fh:
            out += fh.read()
        if len(out) > 32 * MiB:
            break
    return bytes(out)


def make_image(path: str, size: int, data_percent: float, seed: int = 1, kind: str = "mixed") -> None:
    if kind == "sparse-random":
        from imageformats.block import copy
        from imageformats.testing.sparse_random import SparseRandomDevice
        src = SparseRandomDevice(size, seed=seed, percent=data_percent)
        with FileDevice.create(path, size) as dst:
            copy(src, dst, dst_is_zero=True)
        return
    rng = np.random.default_rng(seed)
    text = corpus()
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, RUN):
            n = min(RUN, size - off)
            r = rng.random() * 100
            if r >= data_percent:
                continue  # zeroes: left as a hole
            if r < data_percent / 2:
                start = int(rng.integers(0, len(text) - n))
                chunk = text[start:start + n]
            else:
                chunk = rng.bytes(n)
            f.seek(off)
            f.write(chunk)


def timed(cmd, **kw) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, **kw)
    return time.perf_counter() - t0


def ratio(name: str, theirs: float, ours: float, unit: str = "s") -> None:
    print(f"  {name:<44} reference {theirs:9.3f} {unit}   ours {ours:9.3f} {unit}   ratio {theirs / ours:5.2f}x")


def random_offsets(size: int, n: int, seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, size - 4096) & ~4095 for _ in range(n)]


def decode_in_process(cls, path: str, out: str) -> float:
    """XzDevice/ZstdDevice -> the raw output (copy() to a sparse file, fsync), as convert does, minus start-up."""
    from imageformats.raw import write_raw

    t0 = time.perf_counter()
    with cls(FileDevice(path)) as src:
        write_raw(src, out, {})
    elapsed = time.perf_counter() - t0
    os.unlink(out)
    return elapsed


#: cache_info() of the last reads_ours() run (how many chunks it decoded, stored pieces...).
last_cache_info: dict = {}


def reads_ours(cls, path: str, offsets: list[int]) -> float:
    t0 = time.perf_counter()
    with cls(FileDevice(path)) as dev:
        for off in offsets:
            dev.pread(4096, off)
        elapsed = time.perf_counter() - t0
        last_cache_info.clear()
        last_cache_info.update(dev.cache_info())
    return elapsed


def reads_python_xz(path: str, offsets: list[int]) -> float:
    import xz

    t0 = time.perf_counter()
    with xz.open(path) as f:
        for off in offsets:
            f.seek(off)
            f.read(4096)
    return time.perf_counter() - t0


def reads_pyzstd(path: str, offsets: list[int]) -> float:
    import pyzstd

    t0 = time.perf_counter()
    with pyzstd.SeekableZstdFile(path, "r") as f:
        for off in offsets:
            f.seek(off)
            f.read(4096)
    return time.perf_counter() - t0


NBD_CLIENT = r"""
import sys, time, nbd
uri, offsets = sys.argv[1], [int(x) for x in sys.argv[2].split(",")]
h = nbd.NBD()
h.connect_uri(uri)
t0 = time.perf_counter()
for off in offsets:
    h.pread(4096, off)
print(time.perf_counter() - t0)
h.shutdown()
"""


_nbdkit_runs = 0


def reads_nbdkit(path: str, offsets: list[int], workdir: str) -> float:
    global _nbdkit_runs
    _nbdkit_runs += 1
    sock = os.path.join(workdir, f"nbdkit{_nbdkit_runs}.sock")
    pidfile = os.path.join(workdir, f"nbdkit{_nbdkit_runs}.pid")
    for stale in (sock, pidfile):  # left by an earlier run in the same --dir: nbdkit will not bind
        if os.path.exists(stale):
            os.unlink(stale)
    subprocess.run(["nbdkit", "-U", sock, "-P", pidfile, "--filter=xz", "file", path], check=True)
    try:
        for _ in range(100):
            if os.path.exists(pidfile) and os.path.getsize(pidfile):
                break
            time.sleep(0.05)
        out = subprocess.run(["/usr/bin/python3", "-c", NBD_CLIENT, f"nbd+unix:///?socket={sock}",
                              ",".join(map(str, offsets))], check=True, capture_output=True, text=True)
        return float(out.stdout.strip())
    finally:
        with open(pidfile) as f:
            pid = int(f.read().strip())
        os.kill(pid, 15)
        for _ in range(100):  # wait until it is gone (it frees the file and the socket)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--image", choices=["mixed", "sparse-random"], default="mixed",
                    help="mixed: 4 MiB runs of zeroes, text and random bytes; sparse-random: the "
                         "project's VM-disk-shaped generator (random islands in zeroes)")
    ap.add_argument("--data-percent", type=float, default=None,
                    help="non-zero share of the image (default 50 for mixed, 10 for sparse-random)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one under /var/tmp)")
    ap.add_argument("--reads", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3,
                    help="sequential-decode and random-read runs per reader (best kept)")
    ap.add_argument("--skip-zstd", action="store_true")
    ap.add_argument("--skip-writer", action="store_true",
                    help="reuse the xz -T2 file of an earlier run in --dir instead of timing both xz writers")
    ap.add_argument("--skip-reads", action="store_true", help="no random-read figures")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    size = parse_size(args.size)
    if args.data_percent is None:
        args.data_percent = 50.0 if args.image == "mixed" else 10.0
    work = args.dir or tempfile.mkdtemp(prefix="xzbench-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    raw = os.path.join(work, "disk.raw")
    ours_xz, ref_xz = os.path.join(work, "ours.xz"), os.path.join(work, "ref.raw.xz")
    what = "half text, half random" if args.image == "mixed" else "sparse-random islands"
    print(f"image: {args.image}, {size} bytes, {args.data_percent}% data ({what}) in {work}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    try:
        if not os.path.exists(raw) or os.path.getsize(raw) != size:
            make_image(raw, size, args.data_percent, kind=args.image)

        if args.skip_writer and os.path.exists(ref_xz):
            print(f"xz writer skipped: reusing {ref_xz}")
        else:
            print("xz writer (16 MiB blocks, level 6, crc64, 2 threads)")
            t_ref = timed(["sh", "-c", f"xz -T2 -6 --block-size=16MiB -c {raw} > {ref_xz}"])
            t_ours = timed([sys.executable, "-m", "imageformats", "convert", "-O", "xz",
                            "-o", "block_size=16M,level=6,check=crc64,threads=2", raw, ours_xz])
            ratio("convert -O xz  vs  xz -T2 -6 --block-size=16MiB", t_ref, t_ours)
            print(f"  sizes: reference {os.path.getsize(ref_xz)}  ours {os.path.getsize(ours_xz)}")

        print(f"sequential decode to a new sparse raw file, fsynced (convert fsyncs its output; `sync FILE` "
              f"fsyncs xz's), best of {args.repeat} alternating runs")
        out_ref = os.path.join(work, "ref.raw")
        out_ours = os.path.join(work, "ours.raw")
        refs, ours, libs = [], [], []

        def run_ref() -> None:
            refs.append(timed(["sh", "-c", f"xz -d -T2 -k -f {ref_xz} && sync {out_ref}"]))
            os.unlink(out_ref)

        def run_ours() -> None:
            ours.append(timed([sys.executable, "-m", "imageformats", "convert", "-O", "raw", ref_xz, out_ours]))
            if len(ours) == 1:
                assert subprocess.run(["cmp", raw, out_ours]).returncode == 0, "decoded image differs"
            os.unlink(out_ours)

        def run_lib() -> None:
            libs.append(decode_in_process(XzDevice, ref_xz, out_ours))

        # Each output is deleted before the next run starts, and the order rotates: the page cache
        # of the run before (memory freed or still held) changes the next run's time noticeably.
        runs = [run_ref, run_ours, run_lib]
        for i in range(args.repeat):
            for run in runs[i % 3:] + runs[:i % 3]:
                run()
        print("  runs (s): xz -d -T2 " + " ".join(f"{t:.2f}" for t in refs) + "; convert " +
              " ".join(f"{t:.2f}" for t in ours) + "; in process " + " ".join(f"{t:.2f}" for t in libs) +
              f"; load average {os.getloadavg()[0]:.2f}")
        t_ref = min(refs)
        ratio("convert -O raw  vs  xz -d -T2", t_ref, min(ours))
        ratio("same, in process (no CLI start-up)  vs  xz -d -T2", t_ref, min(libs))

        offsets = random_offsets(size, args.reads)
        if not args.skip_reads:
            print(f"{args.reads} random 4 KiB reads, cold start, best of {args.repeat} "
                  f"(xz file written by xz -T2, 16 MiB blocks)")
            t_ours = t_pyxz = t_nbdkit = float("inf")
            for _ in range(args.repeat):  # alternate, keep the best of each: the machine's load varies
                t_ours = min(t_ours, reads_ours(XzDevice, ref_xz, offsets))
                t_pyxz = min(t_pyxz, reads_python_xz(ref_xz, offsets))
                t_nbdkit = min(t_nbdkit, reads_nbdkit(ref_xz, offsets, work))
            ratio("XzDevice  vs  python-xz", t_pyxz, t_ours)
            ratio("XzDevice  vs  nbdkit --filter=xz via libnbd", t_nbdkit, t_ours)
            print(f"  XzDevice decoded {last_cache_info['decoded']} Blocks for {args.reads} reads "
                  f"({last_cache_info['stored-pieces']} pieces read back from the file, not cached)")

        if not args.skip_zstd:
            ours_zst, ref_zst = os.path.join(work, "ours.zst"), os.path.join(work, "ref.zst")
            print("zstd writer (level 3, 2 threads; ours: seekable with 4 MiB frames)")
            t_ref = timed(["zstd", "-q", "-f", "-T2", "-3", raw, "-o", ref_zst])
            t_ours = timed([sys.executable, "-m", "imageformats", "convert", "-O", "zstd",
                            "-o", "frame_size=4M,level=3,threads=2", raw, ours_zst])
            ratio("convert -O zstd  vs  zstd -T2 -3 (not seekable)", t_ref, t_ours)
            print(f"  sizes: reference {os.path.getsize(ref_zst)}  ours {os.path.getsize(ours_zst)}")
            out_ours = os.path.join(work, "ours.raw")
            t_ref = timed(["sh", "-c", f"zstd -q -d -f {ours_zst} -o {out_ours} && sync {out_ours}"])
            os.unlink(out_ours)
            t_ours = timed([sys.executable, "-m", "imageformats", "convert", "-O", "raw", ours_zst, out_ours])
            os.unlink(out_ours)
            ratio("convert -O raw  vs  zstd -d (sparse file, synced)", t_ref, t_ours)
            t_lib = decode_in_process(ZstdDevice, ours_zst, out_ours)
            ratio("same, in process (no CLI start-up)  vs  zstd -d", t_ref, t_lib)
            t_ours = t_py = float("inf")
            for _ in range(args.repeat):
                t_ours = min(t_ours, reads_ours(ZstdDevice, ours_zst, offsets))
                t_py = min(t_py, reads_pyzstd(ours_zst, offsets))
            ratio(f"{args.reads} random 4 KiB reads: ZstdDevice vs pyzstd", t_py, t_ours)
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
