#!/usr/bin/env python3
"""LUKS1 throughput and unlock time, side by side with qemu-img, nbdkit's luks filter and cryptsetup.

    python3 bench/luks_throughput.py [--size-mib 512] [--iterations 200000] [--dir DIR]

Makes one aes-xts-plain64 (512-bit key) volume of --size-mib MiB payload with imageformats
(encrypting through LuksDevice with 1 MiB writes: the encrypt figure), then decrypts it:

* LuksDevice.readinto with 1 MiB requests, one caller (each request is split over both cores);
* LuksDevice with two clones on two threads (both cores, one request each);
* ``imageformats convert`` luks -> raw file (the CLI end to end);
* ``qemu-img convert`` luks -> raw file;
* nbdkit's luks filter read by ``nbdcopy`` into ``null:``.

Unlock: imageformats ``unlock()`` against ``cryptsetup luksOpen --test-passphrase`` for the same
slot (same PBKDF2 iteration count), best of 3 each.  Prints every figure and the ratios.
Not part of the test suite: run by hand on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# the script directory must not shadow stdlib modules (bench/copy.py): put the repository root there instead
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from imageformats.block import FileDevice  # noqa: E402
from imageformats.luks1 import LuksDevice, luks_format, unlock  # noqa: E402
from imageformats.luks1.create import layout  # noqa: E402

MiB = 1 << 20
PASSPHRASE = b"benchmark passphrase"


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        sys.exit(f"{name} is not installed (scripts/install-peers.sh)")
    return path


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512, help="payload size in MiB (default 512)")
    ap.add_argument("--iterations", type=int, default=200_000, help="PBKDF2 iterations of the key slot")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is kept")
    args = ap.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="luks-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    img = work / "bench.luks"
    pw = work / "pass"
    pw.write_bytes(PASSPHRASE)
    size = args.size_mib * MiB
    p = layout("aes-xts-plain64", 512)
    total = p.payload_offset * 512 + size
    print(f"image: {img}  payload {args.size_mib} MiB  aes-xts-plain64 512-bit  {os.cpu_count()} CPUs")

    with FileDevice.create(img, total) as f:
        luks_format(f, PASSPHRASE, iterations=args.iterations)
    block = bytearray(os.urandom(MiB))

    # -- encrypt: 1 MiB writes through LuksDevice ---------------------------------------------
    best_enc = float("inf")
    for _ in range(args.repeat):
        with LuksDevice(FileDevice(img, writable=True), passphrase=PASSPHRASE, writable=True) as dev:
            start = time.perf_counter()
            for off in range(0, size, MiB):
                block[:8] = off.to_bytes(8, "little")
                dev.pwrite(block, off)
            best_enc = min(best_enc, time.perf_counter() - start)
            dev.flush()

    # -- decrypt ---------------------------------------------------------------------------------
    dev = LuksDevice(FileDevice(img), passphrase=PASSPHRASE)
    buf = bytearray(MiB)
    dev.readinto(buf, 0)
    assert buf[:8] == (0).to_bytes(8, "little") and buf[8:] == block[8:], "decrypt mismatch"
    best_dec = float("inf")
    for _ in range(args.repeat):
        start = time.perf_counter()
        for off in range(0, size, MiB):
            dev.readinto(buf, off)
        best_dec = min(best_dec, time.perf_counter() - start)

    def two_clones() -> float:
        clones = [dev.clone(), dev.clone()]
        half = size // 2

        def work_on(c, base):
            b = bytearray(MiB)
            for off in range(base, base + half, MiB):
                c.readinto(b, off)

        threads = [threading.Thread(target=work_on, args=(c, i * half)) for i, c in enumerate(clones)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        for c in clones:
            c.close()
        return elapsed

    best_dec2 = min(two_clones() for _ in range(args.repeat))
    dev.close()

    out = work / "out.raw"
    ours_convert = []
    qemu = []
    nbdkit = []
    for _ in range(args.repeat):
        out.unlink(missing_ok=True)
        ours_convert.append(timed([sys.executable, "-m", "imageformats", "convert", "--passphrase-file", str(pw),
                                   str(img), str(out)]))
        out.unlink(missing_ok=True)
        qemu.append(timed([tool("qemu-img"), "convert", "--object", f"secret,id=s0,file={pw}", "--image-opts",
                           f"driver=luks,key-secret=s0,file.filename={img}", "-O", "raw", str(out)]))
        out.unlink(missing_ok=True)
        nbdkit.append(timed([tool("nbdcopy"), "--", "[", tool("nbdkit"), "file", str(img), "--filter=luks",
                             f"passphrase=+{pw}", "]", "null:"]))
    out.unlink(missing_ok=True)

    # -- unlock ---------------------------------------------------------------------------------
    ours_unlock = []
    for _ in range(args.repeat):
        with FileDevice(img) as f:
            start = time.perf_counter()
            unlock(f, passphrase=PASSPHRASE)
            ours_unlock.append(time.perf_counter() - start)
    cs_unlock = [timed([tool("cryptsetup"), "luksOpen", "--test-passphrase", "--key-file", str(pw), str(img)])
                 for _ in range(args.repeat)]
    cli_unlock = [timed([sys.executable, "-m", "imageformats", "luks", "dump", "--dump-volume-key",
                         "--passphrase-file", str(pw), str(img)]) for _ in range(args.repeat)]

    enc, dec, dec2 = rate(size, best_enc), rate(size, best_dec), rate(size, best_dec2)
    conv, q, n = rate(size, min(ours_convert)), rate(size, min(qemu)), rate(size, min(nbdkit))
    faster_peer = max(q, n)
    print()
    print(f"{'what':48s} {'MB/s':>9s}")
    print(f"{'imageformats LuksDevice encrypt (1 MiB writes)':48s} {enc:9.0f}")
    print(f"{'imageformats LuksDevice decrypt (1 MiB reads)':48s} {dec:9.0f}")
    print(f"{'imageformats LuksDevice decrypt (2 clones)':48s} {dec2:9.0f}")
    print(f"{'imageformats convert luks -> raw file':48s} {conv:9.0f}")
    print(f"{'qemu-img convert luks -> raw file':48s} {q:9.0f}")
    print(f"{'nbdkit luks filter -> nbdcopy null:':48s} {n:9.0f}")
    print()
    print(f"decrypt ratio LuksDevice / faster peer ({faster_peer:.0f} MB/s): {dec / faster_peer:.2f}x")
    print(f"encrypt ratio LuksDevice / faster peer's decrypt: {enc / faster_peer:.2f}x")
    print(f"convert ratio imageformats / qemu-img convert: {conv / q:.2f}x")
    print()
    ou, cu = min(ours_unlock), min(cs_unlock)
    print(f"unlock ({args.iterations} PBKDF2 iterations, sha256, 512-bit key): imageformats {ou * 1000:.0f} ms, "
          f"cryptsetup --test-passphrase {cu * 1000:.0f} ms, ratio {ou / cu:.2f}x (target <= 1.2x)")
    print(f"  (the imageformats CLI, Python start-up included: {min(cli_unlock) * 1000:.0f} ms, "
          f"ratio {min(cli_unlock) / cu:.2f}x)")
    if args.dir is None:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
