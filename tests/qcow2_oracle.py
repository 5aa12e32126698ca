"""Oracles for the qcow2 tests: qemu-img convert -O raw (bytes), qemu-nbd + nbdinfo --map (NBD
base:allocation) and qemu-img map (zero-ness).  Every expected value comes from a real qemu tool."""

from __future__ import annotations

import json
import random
import subprocess

from peers import tool

import imageformats


def sh(*args, cwd=None, check=True, input=None, timeout=120) -> subprocess.CompletedProcess:
    cmd = [tool(str(args[0])), *map(str, args[1:])]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    return proc


def qemu_raw(path, tmp_path, *extra, cwd=None) -> bytes:
    out = tmp_path / f"ref-{random.getrandbits(32):08x}.raw"
    sh("qemu-img", "convert", *extra, "-O", "raw", path, out, cwd=cwd or tmp_path)
    data = out.read_bytes()
    out.unlink()
    return data


def nbd_map(path, fmt="qcow2", cwd=None, extra=()) -> list[tuple[int, int, bool, bool]]:
    """qemu-nbd's NBD base:allocation for the image, merged: (start, length, zero, hole)."""
    proc = sh("nbdinfo", "--map", "--json", "--", "[", tool("qemu-nbd"), "-r", "-f", fmt, *extra, str(path), "]",
              cwd=cwd)
    out: list[tuple[int, int, bool, bool]] = []
    for e in json.loads(proc.stdout):
        item = (e["offset"], e["length"], bool(e["type"] & 2), bool(e["type"] & 1))
        if out and out[-1][0] + out[-1][1] == item[0] and out[-1][2:] == item[2:]:
            prev = out.pop()
            item = (prev[0], prev[1] + item[1], *item[2:])
        out.append(item)
    return out


def zero_runs(items) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    for start, length, zero in items:
        if out and out[-1][0] + out[-1][1] == start and out[-1][2] == zero:
            prev = out.pop()
            start, length = prev[0], prev[1] + length
        out.append((start, length, zero))
    return out


def our_extents(dev) -> list[tuple[int, int, bool, bool]]:
    return [(e.start, e.length, e.zero, e.hole) for e in dev.extents(dev.size, 0)]


def check_image(path, tmp_path, *, opts=None, qemu_args=(), nbd=True, cwd=None, reads=40, seed=0):
    """Our whole-image read == qemu-img convert -O raw; random unaligned reads agree; extents agree
    with qemu-nbd (zero and hole) and with qemu-img map (zero)."""
    ref = qemu_raw(path, tmp_path, *qemu_args, cwd=cwd)
    with imageformats.open(str(path), **(opts or {})) as dev:
        assert dev.format_name == "qcow2"
        assert dev.size == len(ref)
        got = dev.pread(dev.size, 0)
        assert got == ref
        rnd = random.Random(seed)
        for _ in range(reads):
            off = rnd.randrange(dev.size)
            n = rnd.randrange(1, min(300_000, dev.size - off) + 1)
            assert dev.pread(n, off) == ref[off : off + n], (off, n)
        ours = our_extents(dev)
        if nbd:
            assert ours == nbd_map(path, cwd=cwd or tmp_path)
            qmap = json.loads(sh("qemu-img", "map", "--output=json", path, cwd=cwd or tmp_path).stdout)
            theirs = zero_runs((e["start"], e["length"], bool(e["zero"])) for e in qmap)
            assert zero_runs((s, n, z) for s, n, z, _ in ours) == theirs
        # the extents are truthful: zero extents read as zeroes
        for s, n, z, _h in ours:
            if z:
                assert ref[s : s + n] == bytes(n)
    return ref
