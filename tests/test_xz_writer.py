"""``convert -O xz``: the real xz(1) must accept what we write, and decode it in parallel."""

from __future__ import annotations

import os

import pytest

import imageformats
from imageformats.errors import InvalidArgumentError
from imageformats.testing.sparse_random import SparseRandomDevice
from imageformats.xz import write_xz

from peers import run
from test_xz import make_source

KiB, MiB = 1024, 1024 * 1024


def robot_blocks(path):
    rows = [line.split("\t") for line in run("xz", "--robot", "-lvv", path).stdout.decode().splitlines()]
    return [r for r in rows if r[0] == "block"]


@pytest.mark.parametrize("check", ["crc32", "crc64", "sha256", "none"])
def test_cli_convert_xz_accepted_by_xz(tmp_path, check):
    src = tmp_path / "disk.raw"
    data = make_source(src, size=3 * MiB + 1234)
    out = tmp_path / "disk.xz"
    run("imageformats", "convert", "-O", "xz", "-o", f"block_size=512K,level=1,check={check}", src, out)
    run("xz", "-t", out)
    assert run("xz", "-dc", "-T2", out).stdout == data
    blocks = robot_blocks(out)
    assert len(blocks) == 7
    # xz --robot -lvv: the Block Header flags column; "cu" = both sizes present, which is
    # what xz's multi-threaded decoder (-T2 -d) needs to decode Blocks in parallel
    assert all(b[12] == "cu" for b in blocks), blocks[0]
    assert {b[9] for b in blocks} == {{"crc32": "CRC32", "crc64": "CRC64", "sha256": "SHA-256", "none": "None"}[check]}
    # and we read it back
    with imageformats.open(str(out)) as dev:
        assert dev.pread(dev.size, 0) == data


def test_nbdkit_xz_filter_reads_our_output(tmp_path):
    """nbdkit's xz filter needs a multi-block file: it is an independent random-access reader."""
    src = tmp_path / "disk.raw"
    data = make_source(src, size=3 * MiB, seed=4)
    out = tmp_path / "disk.xz"
    run("imageformats", "convert", "-O", "xz", "-o", "block_size=256K,level=0", src, out)
    copy = tmp_path / "copy.raw"
    run("nbdkit", "-U", "-", "--filter=xz", "file", out, "--run", f'nbdcopy "$uri" {copy}')
    assert copy.read_bytes() == data


def test_zero_regions_are_fast_and_tiny(tmp_path):
    src = tmp_path / "empty.raw"
    run("truncate", "-s", "1G", src)
    out = tmp_path / "empty.xz"
    before = os.times()
    run("imageformats", "convert", "-O", "xz", src, out)
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    # 64 all-zero 16 MiB Blocks: compressed once (~0.3 s), not 64 times (~20 s of CPU)
    assert cpu < 6, cpu
    assert out.stat().st_size < 64 * 4096
    run("xz", "-t", out)
    listing = robot_blocks(out)
    assert len(listing) == 64 and int(listing[-1][7]) == 16 * MiB


def test_sparse_random_roundtrip(tmp_path):
    src = SparseRandomDevice(24 * MiB, seed=3, percent=20, runlength=1 * MiB)
    out = tmp_path / "sr.xz"
    write_xz(src, str(out), {"block_size": "2M", "level": "0"})
    decoded = run("xz", "-dc", out).stdout
    assert decoded == src.pread(src.size, 0)
    # and the verifying target accepts our reader's copy
    with imageformats.open(str(out)) as dev:
        target = SparseRandomDevice(24 * MiB, seed=3, percent=20, runlength=1 * MiB, writable=True)
        imageformats.copy(dev, target)


def test_bad_options(tmp_path):
    src = tmp_path / "a.raw"
    src.write_bytes(bytes(4096))
    for opts in ({"level": "10"}, {"check": "md5"}, {"block_size": "1"}, {"colour": "blue"}):
        with pytest.raises(InvalidArgumentError):
            write_xz(imageformats.open(str(src)), str(tmp_path / "o.xz"), opts)
    proc = run("imageformats", "convert", "-O", "xz", "-o", "level=99", src, tmp_path / "o.xz", check=False)
    assert proc.returncode == 2 and b"level" in proc.stderr


def test_empty_source(tmp_path):
    src = tmp_path / "empty.raw"
    src.write_bytes(b"")
    out = tmp_path / "empty.xz"
    write_xz(imageformats.open(str(src)), str(out), {})
    run("xz", "-t", out)
    assert run("xz", "-dc", out).stdout == b""
