"""qcow2 writer: convert -O qcow2 [-c] and create -f qcow2, checked by the real qemu-img.

Every image we write is checked by ``qemu-img check`` (no errors, leaks or
corruptions), ``qemu-img compare`` against the source, ``qemu-img convert -O raw``
compared byte for byte with the source, ``qemu-img map`` (holes where the source
had only zeroes, data where it had data), ``qemu-img info`` (cluster size,
compat, compression type, extended L2), and read back with imageformats.open.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imageformats
from imageformats.block import FileDevice, MemoryDevice
from imageformats.errors import InvalidArgumentError, UnsupportedFeatureError
from imageformats.qcow2 import writer as W
from peers import run

KiB, MiB = 1024, 1024 * 1024


# -- helpers ------------------------------------------------------------------------------


def make_source(path, size, islands, *, seed=0, zero_runs=()):
    """A sparse raw file of ``size`` bytes: random-data islands (start, length), and runs written with zeroes
    (allocated in the file but reading as zeroes, which must not be stored)."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for start, length in zero_runs:
            f.seek(start)
            f.write(bytes(length))
        for start, length in islands:
            f.seek(start)
            f.write(rng.bytes(length))
    return path


def compressible(n, seed=0):
    rng = np.random.default_rng(seed)
    words = [b"qcow2 ", b"cluster ", b"refcount ", b"zero ", b"\n"]
    return b"".join(words[i] for i in rng.integers(0, len(words), n))[:n].ljust(n, b".")


def check_image(path):
    """qemu-img check: exit 0 and no errors, leaks or corruptions.  Returns the JSON report."""
    proc = run("qemu-img", "check", "--output=json", "-f", "qcow2", path, check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, (proc.returncode, report, proc.stderr)
    assert report["check-errors"] == 0
    assert not report.get("leaks") and not report.get("corruptions"), report
    return report


def info(path):
    return json.loads(run("qemu-img", "info", "--output=json", "-f", "qcow2", path).stdout)


def qemu_raw(path, tmp_path, name="back.raw"):
    out = tmp_path / name
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, out)
    return out.read_bytes()


def padded(data, size):
    return data + bytes(size - len(data))


def expected_allocation(src_bytes, granule):
    """Per granule (cluster or subcluster): True when the source holds a non-zero byte there."""
    n = -(-len(src_bytes) // granule)
    arr = np.frombuffer(padded(src_bytes, n * granule), dtype=np.uint8).reshape(n, granule)
    return arr.any(axis=1)


def qemu_data_map(path, size, granule):
    """Per granule: True when qemu-img map says data; each granule must be wholly one kind."""
    out = np.zeros(-(-size // granule), dtype=np.int8) - 1
    for e in json.loads(run("qemu-img", "map", "--output=json", "-f", "qcow2", path).stdout):
        assert e["start"] % granule == 0 and (e["length"] % granule == 0 or e["start"] + e["length"] == size), e
        a, b = e["start"] // granule, -(-(e["start"] + e["length"]) // granule)
        out[a:b] = 1 if e["data"] else 0
    assert (out >= 0).all()
    return out.astype(bool)


def verify(src_path, dst_path, tmp_path, *, granule, compressed=False):
    """All the oracles for an image converted from a raw file without a backing file."""
    src = open(src_path, "rb").read()
    report = check_image(dst_path)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src_path, dst_path)
    vsize = -(-len(src) // 512) * 512
    assert info(dst_path)["virtual-size"] == vsize
    assert qemu_raw(dst_path, tmp_path) == padded(src, vsize)
    want = expected_allocation(padded(src, vsize), granule)
    got = qemu_data_map(dst_path, vsize, granule)
    # Compressed or not, a cluster is stored exactly when the source has a non-zero byte in it.
    assert (got == want).all(), (np.flatnonzero(got != want)[:10], granule, compressed)
    with imageformats.open(str(dst_path)) as dev:
        assert dev.format_name == "qcow2"
        assert dev.size == vsize
        assert dev.pread(vsize, 0) == padded(src, vsize)
    return report


def convert(src_path, dst_path, **options):
    with FileDevice(src_path) as src:
        W.write_qcow2(src, str(dst_path), {k: str(v) for k, v in options.items()})


# -- the matrix -----------------------------------------------------------------------------

LAYOUT = [(1 * MiB + 4096, 64 * KiB), (3 * MiB - 1000, 5000), (4 * MiB, 300 * KiB)]
ZEROES = [(2 * MiB, 256 * KiB)]


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 * MiB])
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_convert_plain_matrix(tmp_path, cluster_size, compat):
    size = 5 * MiB + 3584  # not a multiple of any cluster size above 512
    src = make_source(tmp_path / "src.raw", size, LAYOUT, seed=cluster_size, zero_runs=ZEROES)
    dst = tmp_path / "out.qcow2"
    convert(src, dst, cluster_size=cluster_size, compat=compat)
    verify(src, dst, tmp_path, granule=cluster_size)
    i = info(dst)
    assert i["cluster-size"] == cluster_size
    assert i["format-specific"]["data"]["compat"] == compat


@pytest.mark.parametrize("cluster_size,compat,ctype", [
    (512, "0.10", "zlib"), (4096, "1.1", "zlib"), (65536, "1.1", "zlib"), (65536, "0.10", "zlib"),
    (2 * MiB, "1.1", "zlib"), (4096, "1.1", "zstd"), (65536, "1.1", "zstd"), (2 * MiB, "1.1", "zstd"),
])
def test_convert_compressed_matrix(tmp_path, cluster_size, compat, ctype):
    size = 6 * MiB + 1536
    src = make_source(tmp_path / "src.raw", size, LAYOUT, seed=7, zero_runs=ZEROES)
    with open(src, "r+b") as f:  # a compressible island next to the random ones
        f.seek(5 * MiB + 512)
        f.write(compressible(600 * KiB))
    dst = tmp_path / "out.qcow2"
    convert(src, dst, cluster_size=cluster_size, compat=compat, compression_type=ctype, compress="on")
    report = verify(src, dst, tmp_path, granule=cluster_size, compressed=True)
    assert report.get("compressed-clusters", 0) > 0
    i = info(dst)
    assert i["cluster-size"] == cluster_size
    if compat == "1.1":
        assert i["format-specific"]["data"]["compression-type"] == ctype
    if cluster_size <= 65536:
        # Random data does not shrink: those clusters are stored uncompressed (fewer compressed than allocated).
        assert report["compressed-clusters"] < report["allocated-clusters"]


@pytest.mark.parametrize("compress", [False, True])
def test_convert_extended_l2(tmp_path, compress):
    size = 4 * MiB + 512
    # Islands smaller than a subcluster (64K/32 = 2K) and straddling subclusters.
    src = make_source(tmp_path / "src.raw", size, [(100 * KiB + 100, 700), (1 * MiB, 6 * KiB), (3 * MiB + 2048, 2048)],
                      seed=3)
    dst = tmp_path / "out.qcow2"
    convert(src, dst, extended_l2="on", compress="on" if compress else "off")
    # qemu-img map reports allocation per 2 KiB subcluster for standard clusters.
    verify(src, dst, tmp_path, granule=65536 if compress else 2048, compressed=compress)
    assert info(dst)["format-specific"]["data"]["extended-l2"] is True


def test_convert_lazy_refcounts_and_refcount_bits(tmp_path):
    src = make_source(tmp_path / "src.raw", 2 * MiB, [(0, 100 * KiB)], seed=4)
    dst = tmp_path / "out.qcow2"
    convert(src, dst, lazy_refcounts="on", refcount_bits=64, cluster_size="4K")
    verify(src, dst, tmp_path, granule=4096)
    data = info(dst)["format-specific"]["data"]
    assert data["lazy-refcounts"] is True and data["refcount-bits"] == 64


def test_many_refcount_blocks(tmp_path):
    # 512-byte clusters with 64-bit refcounts: one refcount block covers 64 clusters, so ~5 MiB of
    # data needs ~170 blocks (written in batches of 64) and a multi-cluster refcount table.
    src = make_source(tmp_path / "src.raw", 6 * MiB, [(4096, 5 * MiB)], seed=16)
    dst = tmp_path / "out.qcow2"
    convert(src, dst, cluster_size=512, refcount_bits=64)
    verify(src, dst, tmp_path, granule=512)


def test_compressed_packing_respects_refcount_width(tmp_path):
    # 16K clusters of 0xff deflate to ~33 bytes: ~500 would share one host cluster, more than 8-bit refcounts count.
    src = tmp_path / "src.raw"
    src.write_bytes(b"\xff" * (300 * 16 * KiB) + bytes(16 * KiB))
    dst = tmp_path / "out.qcow2"
    convert(src, dst, cluster_size="16K", refcount_bits=8, compress="on")
    report = verify(src, dst, tmp_path, granule=16 * KiB, compressed=True)
    assert report["compressed-clusters"] == 300
    assert info(dst)["format-specific"]["data"]["refcount-bits"] == 8


def test_source_size_not_sector_multiple(tmp_path):
    src = make_source(tmp_path / "src.raw", 1 * MiB + 1000, [(1 * MiB - 10, 1010)], seed=5)
    dst = tmp_path / "out.qcow2"
    convert(src, dst)
    verify(src, dst, tmp_path, granule=65536)
    assert info(dst)["virtual-size"] == 1 * MiB + 1024


def test_all_zero_and_empty_sources(tmp_path):
    src = make_source(tmp_path / "src.raw", 3 * MiB, [], zero_runs=[(0, 3 * MiB)])
    dst = tmp_path / "out.qcow2"
    convert(src, dst, compress="on")
    report = verify(src, dst, tmp_path, granule=65536)
    assert report.get("allocated-clusters", 0) == 0
    empty = make_source(tmp_path / "empty.raw", 0, [])
    convert(empty, tmp_path / "empty.qcow2")
    check_image(tmp_path / "empty.qcow2")
    assert info(tmp_path / "empty.qcow2")["virtual-size"] == 0


def test_many_l2_tables_and_large_virtual_size(tmp_path):
    # 512-byte clusters: one L2 table maps only 32 KiB, so data every 40 KiB touches many tables;
    # the 64 GiB hole costs nothing (sparse source, unallocated clusters).
    size = 64 * 1024 * MiB
    islands = [(i * 40 * KiB + 7, 600) for i in range(60)] + [(size - 4096, 4096)]
    src = make_source(tmp_path / "src.raw", size, islands, seed=6)
    dst = tmp_path / "out.qcow2"
    convert(src, dst, cluster_size=65536)
    check_image(dst)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, dst)
    assert os.path.getsize(dst) < 4 * MiB  # ~38 data clusters + metadata
    small = make_source(tmp_path / "small.raw", 3 * MiB, islands[:60], seed=6)
    convert(small, tmp_path / "small.qcow2", cluster_size=512, compress="on")
    verify(small, tmp_path / "small.qcow2", tmp_path, granule=512, compressed=True)


# -- backing files -----------------------------------------------------------------------


def test_create_empty_like_qemu_img(tmp_path):
    out = tmp_path / "new.qcow2"
    assert W.create_qcow2(str(out), 10 * MiB + 100, {"cluster_size": "4K"}) == 10 * MiB + 512
    check_image(out)
    i = info(out)
    assert i["virtual-size"] == 10 * MiB + 512 and i["cluster-size"] == 4096
    assert json.loads(run("qemu-img", "map", "--output=json", out).stdout) == [
        {"start": 0, "length": 10 * MiB + 512, "depth": 0, "present": False, "zero": True, "data": False}]
    # Writable by qemu: write through qemu-io, then check and read back.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 64K", out)
    check_image(out)
    with imageformats.open(str(out)) as dev:
        assert dev.pread(64 * KiB, 1 * MiB) == b"\xab" * 64 * KiB
        assert dev.pread(4096, 0) == bytes(4096)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_create_with_backing(tmp_path, compat):
    base = make_source(tmp_path / "base.raw", 3 * MiB, [(0, 100 * KiB), (2 * MiB, 4097)], seed=8)
    top = tmp_path / "top.qcow2"
    # Relative name, size taken from the backing file.
    size = W.create_qcow2(str(top), None, {"backing_file": "base.raw", "backing_fmt": "raw", "compat": compat})
    assert size == 3 * MiB
    check_image(top)
    i = info(top)
    assert i["backing-filename"] == "base.raw" and i["backing-filename-format"] == "raw"
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", base, top)
    with imageformats.open(str(top)) as dev:
        assert dev.pread(3 * MiB, 0) == base.read_bytes()
    # The backing-format extension (0xe2792aca) is in the header, as qemu writes it.
    assert bytes.fromhex("e2792aca") in top.read_bytes()[:4096]


def test_create_over_qcow2_chain_and_convert_sparse_random(tmp_path):
    # A qemu-made compressed qcow2 base; our overlay takes its size and reads through it.
    raw = make_source(tmp_path / "raw", 2 * MiB, [(4096, 300 * KiB)], seed=14)
    base = tmp_path / "base.qcow2"
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, base)
    top = tmp_path / "top.qcow2"
    cli("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 4K", top)
    check_image(top)
    want = bytearray(raw.read_bytes())
    want[1 * MiB : 1 * MiB + 4096] = b"\x5a" * 4096
    assert qemu_raw(top, tmp_path) == want
    # A synthetic source given as a URL; the raw output of the same URL is the oracle.
    url = "sparse-random://8M?seed=3&percent=20"
    cli("convert", "-O", "qcow2", "-c", "-o", "cluster_size=4K", url, tmp_path / "sr.qcow2")
    cli("convert", "-O", "raw", url, tmp_path / "sr.raw")
    check_image(tmp_path / "sr.qcow2")
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", tmp_path / "sr.raw", tmp_path / "sr.qcow2")


@pytest.mark.parametrize("compat,extended_l2,compress", [
    ("1.1", "off", "off"), ("0.10", "off", "off"), ("1.1", "on", "off"), ("1.1", "off", "on"), ("0.10", "off", "on"),
    ("1.1", "on", "on"),
])
def test_convert_over_backing_keeps_zeroes(tmp_path, compat, extended_l2, compress):
    """Where the source reads zeroes but the backing file has data, the image must still read zeroes."""
    size = 4 * MiB
    base = make_source(tmp_path / "base.raw", size, [(0, 4 * MiB)], seed=9)  # all data
    src = make_source(tmp_path / "src.raw", size, [(1 * MiB, 64 * KiB), (2 * MiB + 100, 1000)], seed=10,
                      zero_runs=[(3 * MiB, 64 * KiB)])
    dst = tmp_path / "out.qcow2"
    convert(src, dst, backing_file="base.raw", backing_fmt="raw", compat=compat, extended_l2=extended_l2,
            compress=compress)
    check_image(dst)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, dst)
    assert run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", base, dst, check=False).returncode == 1
    assert qemu_raw(dst, tmp_path) == src.read_bytes()
    with imageformats.open(str(dst)) as dev:
        assert dev.pread(size, 0) == src.read_bytes()
    entries = json.loads(run("qemu-img", "map", "--output=json", dst).stdout)
    if compat == "1.1":
        # Zero flags, not stored zeroes: the zero areas are not data in the top layer.
        zero_top = [e for e in entries if e["zero"] and e["depth"] == 0 and not e["data"]]
        assert sum(e["length"] for e in zero_top) >= 3 * MiB


def test_convert_over_backing_with_zero_backing_leaves_holes(tmp_path):
    base = make_source(tmp_path / "base.raw", 4 * MiB, [(0, 64 * KiB)], seed=11)
    src = make_source(tmp_path / "src.raw", 4 * MiB, [(2 * MiB, 64 * KiB)], seed=12)
    dst = tmp_path / "out.qcow2"
    convert(src, dst, backing_file=str(base), compat="0.10")
    check_image(dst)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, dst)
    report = check_image(dst)
    # Only the island and the zeroes over the backing file's data are stored, not the zero-over-zero rest.
    assert report["allocated-clusters"] == 2


# -- CLI ---------------------------------------------------------------------------------


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "imageformats", *map(str, args)], capture_output=True)
    if check:
        assert proc.returncode == 0, proc.stderr.decode()
    return proc


def test_cli_convert_and_create(tmp_path):
    src = make_source(tmp_path / "src.raw", 3 * MiB, [(512 * KiB, 200 * KiB)], seed=13)
    with open(src, "r+b") as f:
        f.seek(2 * MiB)
        f.write(compressible(300 * KiB))
    dst = tmp_path / "out.qcow2"
    cli("convert", "-O", "qcow2", "-c", "-o", "cluster_size=4K,compression_type=zstd", src, dst)
    verify(src, dst, tmp_path, granule=4096, compressed=True)
    assert info(dst)["format-specific"]["data"]["compression-type"] == "zstd"
    # qcow2 -> qcow2 through our reader, then qemu compares the two.
    again = tmp_path / "again.qcow2"
    cli("convert", "-O", "qcow2", "-o", "compat=0.10", dst, again)
    check_image(again)
    run("qemu-img", "compare", dst, again)
    # create -f qcow2 with -b/-F and no size, and create -f raw.
    top = tmp_path / "top.qcow2"
    cli("create", "-f", "qcow2", "-b", "src.raw", "-F", "raw", top)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, top)
    raw = tmp_path / "new.raw"
    cli("create", "-f", "raw", raw, "5M")
    assert os.path.getsize(raw) == 5 * MiB and raw.read_bytes() == bytes(5 * MiB)
    # -c to an output that cannot compress is refused clearly.
    proc = cli("convert", "-O", "raw", "-c", src, tmp_path / "x.raw", check=False)
    assert proc.returncode == 2 and b"compress" in proc.stderr


@pytest.mark.parametrize("opts,exc", [
    ({"cluster_size": "3000"}, InvalidArgumentError),
    ({"cluster_size": "4M"}, InvalidArgumentError),
    ({"compat": "2"}, InvalidArgumentError),
    ({"extended_l2": "on", "cluster_size": "4K"}, InvalidArgumentError),
    ({"compression_type": "zstd", "compat": "0.10"}, InvalidArgumentError),
    ({"compression_type": "lzo"}, InvalidArgumentError),
    ({"preallocation": "full"}, UnsupportedFeatureError),
    ({"encrypt.format": "luks"}, UnsupportedFeatureError),
    ({"refcount_bits": "1"}, UnsupportedFeatureError),
    ({"bogus": "1"}, InvalidArgumentError),
    ({"lazy_refcounts": "maybe"}, InvalidArgumentError),
])
def test_bad_options(tmp_path, opts, exc):
    with pytest.raises(exc):
        W.write_qcow2(MemoryDevice(1 * MiB), str(tmp_path / "x.qcow2"), opts)
    assert not (tmp_path / "x.qcow2").exists()


def test_cli_errors(tmp_path):
    proc = cli("create", "-f", "qcow2", tmp_path / "x.qcow2", check=False)
    assert proc.returncode == 2 and b"size" in proc.stderr
    proc = cli("create", "-f", "qcow2", "-b", "missing.raw", tmp_path / "y.qcow2", check=False)
    assert proc.returncode == 11 and b"missing.raw" in proc.stderr  # NotFoundError
    # -u: no check of the backing file (a size is then required).
    cli("create", "-f", "qcow2", "-u", "-b", "missing.raw", "-F", "raw", tmp_path / "z.qcow2", "1M")
    assert info(tmp_path / "z.qcow2")["backing-filename"] == "missing.raw"
    raw = make_source(tmp_path / "s.raw", 1 * MiB, [(0, 4096)])
    proc = cli("convert", "-O", "qcow2", raw, tmp_path / "no-such-dir" / "out.qcow2", check=False)
    assert proc.returncode == 11 and b"no-such-dir" in proc.stderr


def test_own_backing_file_refused(tmp_path):
    W.create_qcow2(str(tmp_path / "a.qcow2"), 1 * MiB, {})
    before = (tmp_path / "a.qcow2").read_bytes()
    with pytest.raises(InvalidArgumentError, match="own backing file"):
        W.create_qcow2(str(tmp_path / "a.qcow2"), None, {"backing_file": "./a.qcow2"})
    assert (tmp_path / "a.qcow2").read_bytes() == before


def test_destination_is_source_refused(tmp_path):
    src = make_source(tmp_path / "src.raw", 1 * MiB, [(0, 4096)], seed=15)
    before = src.read_bytes()
    proc = cli("convert", "-O", "qcow2", src, src, check=False)
    assert proc.returncode == 2 and b"source" in proc.stderr
    with FileDevice(src) as dev, pytest.raises(InvalidArgumentError, match="destination is the source"):
        W.write_qcow2(dev, str(src), {})
    assert src.read_bytes() == before


@pytest.mark.parametrize("compress", ["off", "on"])
def test_source_read_error_removes_the_output(tmp_path, compress):
    from imageformats.errors import DeviceIOError
    from imageformats.testing.evil import EvilDevice

    src = make_source(tmp_path / "src.raw", 8 * MiB, [(0, 8 * MiB)], seed=17)
    dst = tmp_path / "out.qcow2"
    with EvilDevice(FileDevice(src), eio=[(6 * MiB, 4096)]) as dev, pytest.raises(DeviceIOError):
        W.write_qcow2(dev, str(dst), {"compress": compress})
    assert not dst.exists()


def test_too_large_for_cluster_size(tmp_path):
    with pytest.raises(InvalidArgumentError, match="cluster_size"):
        W.create_qcow2(str(tmp_path / "x.qcow2"), 1 << 50, {"cluster_size": "512"})


# -- property test --------------------------------------------------------------------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    islands=st.lists(st.tuples(st.integers(0, 3 * MiB), st.integers(1, 200 * KiB)), max_size=6),
    tail=st.integers(0, 511).map(lambda n: n * 512 + 0),
    cluster_bits=st.sampled_from([9, 12, 16, 21]),
    compress=st.booleans(),
    ctype=st.sampled_from(["zlib", "zstd"]),
)
def test_random_layouts(tmp_path_factory, islands, tail, cluster_bits, compress, ctype):
    tmp = tmp_path_factory.mktemp("prop")
    size = 3 * MiB + tail
    islands = [(s, min(n, size - s)) for s, n in islands if s < size]
    src = make_source(tmp / "src.raw", size, islands, seed=len(islands))
    dst = tmp / "out.qcow2"
    convert(src, dst, cluster_size=1 << cluster_bits, compress="on" if compress else "off", compression_type=ctype)
    verify(src, dst, tmp, granule=1 << cluster_bits, compressed=compress)
