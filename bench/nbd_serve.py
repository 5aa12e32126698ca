#!/usr/bin/env python3
"""Benchmark: nbdcopy from the built-in NBD server vs nbdkit, over a Unix socket (captive servers).

    python3 bench/nbd_serve.py [--size 1G] [--cases raw,xz,luks] [--repeat 5] [--dir /var/tmp]
                               [--serve-args "--workers 4"] [--same-liblzma]

raw:  a fully written (random) raw file: imageformats serve FILE  vs  nbdkit file FILE
xz:   a multi-block xz of a raw image: imageformats serve F.xz  vs  nbdkit file F.xz --filter=xz
      (prints the liblzma each side decodes with; --same-liblzma adds nbdkit run with ours)
luks: a LUKS1 image made by qemu-img: imageformats serve --passphrase-file  vs  nbdkit --filter=luks
Each server listens on a Unix socket; each copy is ``nbdcopy nbd+unix:///?socket=S null:``
(4 connections, 64 requests in flight, 256 KiB requests).  --repeat runs of each server,
alternating, each with a freshly started server (no cache warmed by an earlier run); the
server's start-up is not counted.  Prints the best and median rates, the servers' CPU seconds
during the copy, and the ratios (throughput best and median, and CPU efficiency = nbdkit CPU /
our CPU, which depends less on what else the machine is doing).
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

IMAGEFORMATS = [sys.executable, "-m", "imageformats"]


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_copy(server: list[str], sock: str) -> tuple[float, float]:
    """Start SERVER (listening on the Unix socket SOCK), copy from it once with nbdcopy, stop it.

    Returns (wall seconds, server CPU seconds) of the copy.  Server start-up (Python imports,
    LUKS key derivation) is not counted.
    """
    if os.path.exists(sock):
        os.unlink(sock)
    proc = subprocess.Popen(server)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {server}")
            time.sleep(0.02)
        time.sleep(0.2)  # let the server finish starting up before the clock starts
        c0 = cpu_seconds(proc.pid)
        t0 = time.perf_counter()
        subprocess.run(["nbdcopy", f"nbd+unix:///?socket={sock}", "null:"], check=True)
        return time.perf_counter() - t0, cpu_seconds(proc.pid) - c0
    finally:
        proc.terminate()
        proc.wait()


def timed_copies(ours: list[str], theirs: list[str], sock: str, repeat: int, *more: list[str]) -> list[list]:
    """REPEAT copies from each server, alternating (so a slow spell of the machine hits all),
    each from a freshly started server (no run profits from a cache warmed by another)."""
    servers = [ours, theirs, *more]
    runs: list[list] = [[] for _ in servers]
    for _ in range(repeat):
        for server, done in zip(servers, runs):
            done.append(one_copy(server, sock))
    return runs


def liblzma_versions() -> tuple[str, str, str]:
    """(ours, nbdkit's, ours' file): the liblzma our server decodes with and the one nbdkit's xz
    filter loads (with no LD_LIBRARY_PATH), so the figures say what each side ran."""
    ours = subprocess.run([sys.executable, "-c", "from imageformats.xz import liblzma; "
                           "print(liblzma.version_string(), liblzma.library_path())"],
                          capture_output=True, text=True, check=True).stdout.split()
    config = subprocess.run(["nbdkit", "--dump-config"], capture_output=True, text=True, check=True).stdout
    filterdir = dict(line.split("=", 1) for line in config.splitlines() if "=" in line)["filterdir"]
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    ldd = subprocess.run(["ldd", os.path.join(filterdir, "nbdkit-xz-filter.so")], env=env,
                         capture_output=True, text=True, check=True).stdout
    path = re.search(r"liblzma\.so\.5 => (\S+)", ldd).group(1)
    lib = ctypes.CDLL(path)
    lib.lzma_version_string.restype = ctypes.c_char_p
    return ours[0], lib.lzma_version_string().decode(), ours[1]


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


def make_xz_image(work: str, size: int) -> str:
    """The xz case's image in WORK: make_compressible_raw, written by ``xz -T2 -1
    --block-size=16MiB`` (the raw file is removed).  Returns the .xz path."""
    raw = os.path.join(work, "x.raw")
    make_compressible_raw(raw, size)
    xz = raw + ".xz"
    with open(xz, "wb") as out:
        subprocess.run(["xz", "-T2", "-1", "--block-size=16MiB", "-c", raw], stdout=out, check=True)
    os.unlink(raw)
    return xz


def report(name: str, size: int, ours: list, theirs: list, peer: str) -> None:
    """Best and median of each side's runs, and the ratios of both."""
    mib = size / (1 << 20)
    for label, runs in (("imageformats serve", ours), (peer, theirs)):
        walls = sorted(w for w, _ in runs)
        best = min(runs)
        print(f"{name:5s} {label:20s}: best {best[0]:6.2f} s {mib / best[0]:8.1f} MiB/s (server CPU {best[1]:5.2f} s), "
              f"median {statistics.median(walls):6.2f} s, server CPU median {statistics.median(c for _, c in runs):5.2f} s")
    best_ratio = min(theirs)[0] / min(ours)[0]
    median_ratio = statistics.median(w for w, _ in theirs) / statistics.median(w for w, _ in ours)
    cpu_ratio = statistics.median(c for _, c in theirs) / max(statistics.median(c for _, c in ours), 1e-9)
    print(f"{name:5s} ratio ours/nbdkit: throughput best {best_ratio:.2f}x, median {median_ratio:.2f}x; "
          f"CPU efficiency (medians) {cpu_ratio:.2f}x")
    sys.stdout.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="guest size for raw (default 1G); xz/luks use a quarter")
    ap.add_argument("--cases", default="raw,xz,luks")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to put the images (default: a temp dir)")
    ap.add_argument("--serve-args", default="", help="extra arguments for imageformats serve (e.g. '--workers 1')")
    ap.add_argument("--same-liblzma", action="store_true",
                    help="xz: also run nbdkit with the liblzma our server uses (when they differ)")
    args = ap.parse_args()
    extra = args.serve_args.split()
    size = parse_size(args.size)
    cases = args.cases.split(",")
    work = tempfile.mkdtemp(prefix="nbd-bench-", dir=args.dir)
    sock = os.path.join(work, "nbd.sock")
    try:
        if "raw" in cases:
            raw = os.path.join(work, "disk.raw")
            make_random_raw(raw, size)
            ours, theirs = timed_copies([*IMAGEFORMATS, "serve", *extra, raw, "--socket", sock],
                                        ["nbdkit", "-f", "-U", sock, "file", raw], sock, args.repeat)
            report("raw", size, ours, theirs, "nbdkit file")
            os.unlink(raw)
        small = max(size // 4, 16 << 20)
        if "xz" in cases:
            xz = make_xz_image(work, small)
            ours_version, nbdkit_version, ours_path = liblzma_versions()
            print(f"xz    liblzma: ours {ours_version}, nbdkit's xz filter {nbdkit_version}")
            nbdkit_xz = ["nbdkit", "-f", "-U", sock, "file", xz, "--filter=xz"]
            more = []
            if args.same_liblzma and ours_version != nbdkit_version:
                # nbdkit again, its xz filter loading our liblzma (a liblzma.so.5 link found first)
                link_dir = os.path.join(work, "liblzma")
                os.makedirs(link_dir, exist_ok=True)
                os.symlink(ours_path, os.path.join(link_dir, "liblzma.so.5"))
                more = [["env", f"LD_LIBRARY_PATH={link_dir}", *nbdkit_xz]]
            ours, theirs, *same = timed_copies([*IMAGEFORMATS, "serve", *extra, xz, "--socket", sock],
                                               nbdkit_xz, sock, args.repeat, *more)
            report("xz", small, ours, theirs, "nbdkit --filter=xz")
            if same:
                report("xz", small, ours, same[0], f"nbdkit, liblzma {ours_version}")
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
            ours, theirs = timed_copies(
                [*IMAGEFORMATS, "serve", *extra, "--passphrase-file", secret, luks, "--socket", sock],
                ["nbdkit", "-f", "-U", sock, "file", luks, "--filter=luks", f"passphrase=+{secret}"], sock, args.repeat)
            report("luks", small, ours, theirs, "nbdkit --filter=luks")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
