#!/usr/bin/env python3
"""Benchmarks for the editable gzip (run by hand: python3 bench/gzip_partial.py [WORKDIR]).

1. partial-deflate of a 1 GiB ext4 image with real files (mke2fs -d /usr/share + /usr/bin, ~860 MB)
   vs `gzip -6` and `pigz -p 2`: time and size.
2. gzip-patch of 4 KiB on a 64 MiB and on a 4 GiB (uncompressed) file: wall time of the command
   and of the library call.
3. GzipDevice vs indexed_gzip on the `gzip -6` file: index build (vs one `zcat > /dev/null`)
   and random 4 KiB reads, both with 1 MiB access-point spacing.
"""

from __future__ import annotations

import os
import sys

# bench/ holds other scripts (copy.py) that would shadow standard modules.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import random
import shutil
import subprocess
import sysconfig
import tempfile
import time

from imageformats.block import FileDevice
from imageformats.gzip_partial.device import GzipDevice
from imageformats.gzip_partial.patch import patch_file
from imageformats.gzip_partial.writer import write_gzip

MiB = 1 << 20
GiB = 1 << 30
# The console scripts themselves (a pyenv shim in front would add its own ~100 ms).
SCRIPTS = sysconfig.get_path("scripts")
PD = os.path.join(SCRIPTS, "partial-deflate")
PATCH = os.path.join(SCRIPTS, "gzip-patch")


def timed(fn):
    t = time.perf_counter()
    r = fn()
    return time.perf_counter() - t, r


def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True)


def make_image(work: str) -> str:
    img = os.path.join(work, "ext4.img")
    if not os.path.exists(img):
        root = os.path.join(work, "root")
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        for d in ("/usr/share", "/usr/bin"):
            if os.path.isdir(d):
                sh(f"cp -a --no-preserve=ownership {d} {root}/ 2>/dev/null || true")
        sh(f"mke2fs -q -F -t ext4 -d {root} {img} 1G")
        shutil.rmtree(root)
    return img


def bench_compress(work: str, img: str) -> str:
    size = os.path.getsize(img)
    t_gzip, _ = timed(lambda: sh(f"gzip -6 -c {img} > {work}/gzip6.gz"))
    t_pigz, _ = timed(lambda: sh(f"pigz -6 -p 2 -c {img} > {work}/pigz.gz"))
    t_pd, _ = timed(lambda: sh(f"{PD} {img} {work}/pd.gz"))
    t_pd_s, _ = timed(lambda: sh(f"{PD} {img} {work}/pd_boot.gz 1M 65M"))
    s_gzip = os.path.getsize(f"{work}/gzip6.gz")
    s_pigz = os.path.getsize(f"{work}/pigz.gz")
    s_pd = os.path.getsize(f"{work}/pd.gz")
    s_pd_s = os.path.getsize(f"{work}/pd_boot.gz")
    print(f"== compress {size / GiB:.2f} GiB ext4 image (files from /usr)")
    print(f"gzip -6            {t_gzip:7.2f} s  {s_gzip:>12,} bytes")
    print(f"pigz -6 -p 2       {t_pigz:7.2f} s  {s_pigz:>12,} bytes")
    print(f"partial-deflate    {t_pd:7.2f} s  {s_pd:>12,} bytes   (no stored range)")
    print(f"partial-deflate    {t_pd_s:7.2f} s  {s_pd_s:>12,} bytes   (64 MiB stored)")
    print(f"speed vs gzip -6: {t_gzip / t_pd:.2f}x   vs pigz -p 2: {t_pigz / t_pd:.2f}x   "
          f"size vs gzip -6: {100 * (s_pd / s_gzip - 1):+.2f}%")
    return f"{work}/gzip6.gz"


def bench_patch(work: str) -> None:
    print("== gzip-patch of 4 KiB")
    base = min(timed(lambda: sh(f"{sys.executable} -c pass"))[0] for _ in range(5))
    print(f"(interpreter start alone, `python3 -c pass`: {1000 * base:.1f} ms)")
    results = {}
    for label, size in (("64 MiB", 64 * MiB), ("4 GiB", 4 * GiB)):
        raw = os.path.join(work, f"sparse-{label.replace(' ', '')}.img")
        with open(raw, "wb") as f:
            f.truncate(size)
            f.seek(size // 2)
            f.write(os.urandom(MiB))
        gz = raw + ".gz"
        with FileDevice(raw) as dev:
            write_gzip(dev, gz, [(0, 32 * MiB)])
        os.unlink(raw)
        data = os.path.join(work, "patch4k")
        with open(data, "wb") as f:
            f.write(os.urandom(4096))
        cli = []
        lib = []
        for i in range(5):
            t, _ = timed(lambda: sh(f"{PATCH} {gz} {1 * MiB + i * 8192} {data}"))
            cli.append(t)
            t, _ = timed(lambda: patch_file(gz, [(2 * MiB + i * 8192, os.urandom(4096))]))
            lib.append(t)
        sh(f"gzip -t {gz}")
        results[label] = (min(cli), min(lib))
        print(f"{label:>7} uncompressed ({os.path.getsize(gz):>10,} bytes .gz): "
              f"command {1000 * min(cli):6.1f} ms, library call {1000 * min(lib):6.2f} ms   (gzip -t ok)")
    a, b = results["64 MiB"], results["4 GiB"]
    print(f"4 GiB / 64 MiB time ratio: command {b[0] / a[0]:.2f}, library {b[1] / a[1]:.2f}")


def bench_reads(gz: str) -> None:
    import indexed_gzip

    print("== random 4 KiB reads on the gzip -6 file, access points every 1 MiB")
    t_zcat, _ = timed(lambda: sh(f"zcat {gz} > /dev/null"))
    t_ours, dev = timed(lambda: GzipDevice(FileDevice(gz), span=MiB))
    t_ig, ig = timed(lambda: indexed_gzip.IndexedGzipFile(gz, spacing=MiB))
    t_ig2, _ = timed(ig.build_full_index)
    t_ig += t_ig2
    print(f"index build: zcat {t_zcat:.2f} s, GzipDevice {t_ours:.2f} s ({t_ours / t_zcat:.2f}x zcat), "
          f"indexed_gzip {t_ig:.2f} s ({t_ig / t_zcat:.2f}x zcat)")
    size = dev.size
    rnd = random.Random(1)
    offsets = [rnd.randrange(0, size - 4096) for _ in range(400)]

    def ours():
        for off in offsets:
            dev.pread(4096, off)

    def theirs():
        for off in offsets:
            ig.seek(off)
            ig.read(4096)

    for off in offsets[:20]:
        ig.seek(off)
        assert ig.read(4096) == dev.pread(4096, off)
    t1, _ = timed(ours)
    t2, _ = timed(theirs)
    print(f"GzipDevice   {len(offsets) / t1:8.1f} reads/s")
    print(f"indexed_gzip {len(offsets) / t2:8.1f} reads/s   ratio ours/theirs {t2 / t1:.2f}x")
    dev.close()
    ig.close()


def main() -> None:
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="gzbench-")
    os.makedirs(work, exist_ok=True)
    img = make_image(work)
    gz = bench_compress(work, img)
    bench_patch(work)
    bench_reads(gz)


if __name__ == "__main__":
    main()
