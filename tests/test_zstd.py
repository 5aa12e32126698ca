"""ZstdDevice and the seekable zstd writer against zstd(1) and pyzstd's SeekableZstdFile."""

from __future__ import annotations

import random
import struct

import pyzstd
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import imageformats
from imageformats.block import FileDevice, MemoryDevice
from imageformats.errors import CorruptImageError, ImageFormatError, InvalidArgumentError, UnsupportedFeatureError
from imageformats.testing.evil import EvilDevice
from imageformats.testing.sparse_random import SparseRandomDevice
from imageformats.zstd import ZstdDevice, write_zstd

from peers import run
from test_xz import make_source, random_reads

KiB, MiB = 1024, 1024 * 1024


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("zsrc") / "disk.raw"
    return path, make_source(path, seed=2)


def pyzstd_file(path, data, frame, checksum=False):
    option = {pyzstd.CParameter.compressionLevel: 1}
    if checksum:
        option[pyzstd.CParameter.checksumFlag] = 1
    with pyzstd.SeekableZstdFile(str(path), "w", level_or_option=option, max_frame_content_size=frame) as f:
        f.write(data)
    return run("zstd", "-dc", path).stdout  # oracle: the reference decoder


# -- reading what other tools wrote ------------------------------------------------------


@pytest.mark.parametrize("checksum", [False, True])
def test_pyzstd_seekable(tmp_path, source, checksum):
    path = tmp_path / "p.zst"
    oracle = pyzstd_file(path, source[1], 256 * KiB, checksum)
    assert oracle == source[1]
    with imageformats.open(str(path)) as dev:
        assert dev.format_name == "zstd"
        info = dev.layer_info()
        assert info["kind"] == "seekable" and info["frames"] == 12
        random_reads(dev, oracle, n=60)
        assert dev.pread(dev.size, 0) == oracle


def test_plain_zstd_single_frame_spills(tmp_path, source):
    path = tmp_path / "a.zst"
    run("zstd", "-q", "-3", source[0], "-o", path)
    oracle = run("zstd", "-dc", path).stdout
    with ZstdDevice(FileDevice(path), max_chunk_memory=512 * KiB, tmpdir=str(tmp_path)) as dev:
        info = dev.layer_info()
        assert info["kind"].startswith("plain") and info["frames"] == 1 and "large-frames" in info
        random_reads(dev, oracle, n=40)
        info = dev.layer_info()
        assert info["spilled-chunks"] == 1 and info["decoded"] == 1
        for e in dev.extents(dev.size, 0):
            if e.zero:
                assert oracle[e.start:e.end] == bytes(e.length)
    with imageformats.open(str(path)) as dev:  # default limits: decoded in memory
        random_reads(dev, oracle, n=20)


def test_plain_zstd_from_pipe_has_no_sizes(tmp_path, source):
    path = tmp_path / "pipe.zst"
    path.write_bytes(run("zstd", "-q", "-c", "-", input=source[1]).stdout)
    oracle = run("zstd", "-dc", path).stdout
    with imageformats.open(str(path), tmpdir=str(tmp_path)) as dev:
        assert "decoded at open" in dev.layer_info()["kind"]
        random_reads(dev, oracle, n=40)


def test_concatenated_frames_and_skippable_frame(tmp_path, source):
    a = run("zstd", "-q", "-c", "-1", source[0]).stdout
    b = run("zstd", "-q", "-c", "-19", "--no-check", source[0]).stdout
    skip = struct.pack("<II", 0x184D2A53, 5) + b"hello"
    path = tmp_path / "cat.zst"
    path.write_bytes(a + skip + b + a)
    oracle = run("zstd", "-dc", path).stdout
    assert len(oracle) == 3 * len(source[1])
    with imageformats.open(str(path)) as dev:
        assert dev.layer_info()["frames"] == 4  # three data frames, one skippable
        random_reads(dev, oracle, n=60)
        n = len(source[1])
        assert dev.pread(20000, n - 10000) == oracle[n - 10000:n + 10000]


# -- our writer -------------------------------------------------------------------------


@pytest.mark.parametrize("checksum", ["on", "off"])
def test_writer_interop(tmp_path, source, checksum):
    out = tmp_path / "o.zst"
    run("imageformats", "convert", "-O", "zstd", "-o", f"frame_size=300K,level=3,checksum={checksum}",
        source[0], out)
    assert run("zstd", "-dc", out).stdout == source[1]
    run("zstd", "-t", out)
    with pyzstd.SeekableZstdFile(str(out), "r") as f:
        assert f.seek_table_info[0] == 11  # frames, per pyzstd's own seek table parser
        rng = random.Random(1)
        for _ in range(30):
            off = rng.randrange(len(source[1]))
            f.seek(off)
            assert f.read(5000) == source[1][off:off + 5000]
    with imageformats.open(str(out)) as dev:
        assert dev.layer_info()["seek-table-checksums"] == (checksum == "on")
        random_reads(dev, source[1], n=30)


def test_writer_zero_regions(tmp_path):
    src = tmp_path / "empty.raw"
    run("truncate", "-s", "256M", src)
    out = tmp_path / "empty.zst"
    write_zstd(imageformats.open(str(src)), str(out), {"frame_size": "4M"})
    assert out.stat().st_size < 64 * 1024
    assert run("zstd", "-dc", out).stdout == bytes(256 * MiB)


def test_writer_sparse_random(tmp_path):
    src = SparseRandomDevice(16 * MiB, seed=5, percent=25, runlength=1 * MiB)
    out = tmp_path / "sr.zst"
    write_zstd(src, str(out), {"frame_size": "1M", "level": "1"})
    assert run("zstd", "-dc", out).stdout == src.pread(src.size, 0)


def test_writer_bad_options(tmp_path):
    src = MemoryDevice(4096, writable=False)
    for opts in ({"level": "50"}, {"frame_size": "12"}, {"checksum": "maybe"}, {"block_size": "1M"}):
        with pytest.raises(InvalidArgumentError):
            write_zstd(src, str(tmp_path / "o.zst"), opts)


# -- corruption ------------------------------------------------------------------------


def ours(tmp_path, data, frame="256K", checksum="on"):
    path = tmp_path / "c.zst"
    write_zstd(MemoryDevice(data, writable=False), str(path), {"frame_size": frame, "checksum": checksum})
    return path


def test_corrupt_frame_data(tmp_path, source):
    path = ours(tmp_path, source[1])
    data = bytearray(path.read_bytes())
    with ZstdDevice(FileDevice(path)) as dev:
        frame1 = dev._shared.chunks[1]
    for pos in (frame1.cstart + frame1.csize // 2, frame1.cstart + frame1.csize - 2):  # data, frame checksum
        bad = bytearray(data)
        bad[pos] ^= 0x04
        with ZstdDevice(MemoryDevice(bytes(bad), writable=False)) as dev:
            assert dev.pread(1000, 0) == source[1][:1000]
            with pytest.raises(CorruptImageError):
                dev.pread(1000, 256 * KiB + 5)


def test_seek_table_checksum_is_verified(tmp_path, source):
    """A frame without its own checksum is still verified against the seek table's XXH64."""
    path = tmp_path / "p.zst"
    pyzstd_file(path, source[1], 256 * KiB, checksum=False)
    data = bytearray(path.read_bytes())
    # rewrite the seek table with checksums: ours from pyzstd's data, then break one
    with ZstdDevice(FileDevice(path)) as dev:
        chunks = dev._shared.chunks
    import xxhash
    from imageformats.zstd import header as zh
    entries = [(c.csize, c.usize, xxhash.xxh64_intdigest(source[1][c.ustart:c.ustart + c.usize]) & 0xFFFFFFFF)
               for c in chunks]
    body = bytes(data[:chunks[-1].cstart + chunks[-1].csize])
    good = body + zh.build_seek_table(entries, True)
    with ZstdDevice(MemoryDevice(good, writable=False)) as dev:
        assert dev.layer_info()["seek-table-checksums"]
        assert dev.pread(dev.size, 0) == source[1]
    assert pyzstd.SeekableZstdFile(MemoryFile(good), "r").read() == source[1]  # the peer agrees
    entries[2] = (entries[2][0], entries[2][1], entries[2][2] ^ 1)
    bad = body + zh.build_seek_table(entries, True)
    with ZstdDevice(MemoryDevice(bad, writable=False)) as dev:
        dev.pread(100, 0)
        with pytest.raises(CorruptImageError, match="checksum"):
            dev.pread(100, 2 * 256 * KiB)


def MemoryFile(data):
    import io
    return io.BytesIO(data)


def test_seek_table_inconsistent(tmp_path, source):
    path = ours(tmp_path, source[1])
    data = path.read_bytes()
    for pos, xor in ((len(data) - 9, 1),      # Number_Of_Frames
                     (len(data) - 5, 0x40),   # reserved descriptor bit
                     (len(data) - 9 - 12 * 5, 1)):  # a Compressed_Size
        bad = bytearray(data)
        bad[pos] ^= xor
        with pytest.raises(ImageFormatError):
            ZstdDevice(MemoryDevice(bytes(bad), writable=False)).pread(len(source[1]), 0)
    # a Decompressed_Size moved between two frames: frame contents disagree with the table
    with ZstdDevice(MemoryDevice(data, writable=False)) as dev:
        n = dev.chunk_count()
    table = bytearray(data[-(n * 12 + 9):])
    struct.pack_into("<I", table, 4, struct.unpack_from("<I", table, 4)[0] - 1)
    struct.pack_into("<I", table, 16, struct.unpack_from("<I", table, 16)[0] + 1)
    bad = data[:-(n * 12 + 9)] + bytes(table)
    with ZstdDevice(MemoryDevice(bad, writable=False)) as dev:
        with pytest.raises(CorruptImageError):
            dev.pread(10, 0)


def test_evil_stuck_bits_never_wrong_data(tmp_path, source):
    path = ours(tmp_path, source[1], frame="128K")
    evil = EvilDevice(FileDevice(path), seed=11, stuck_bits=3e-6)
    errors = good = 0
    with ZstdDevice(evil) as dev:  # this seed leaves the seek table intact
        for off in range(0, dev.size, 128 * KiB):
            n = min(128 * KiB, dev.size - off)
            try:
                got = dev.pread(n, off)
            except CorruptImageError:
                errors += 1
                continue
            assert got == source[1][off:off + n]
            good += 1
    assert errors > 0 and good > 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(min_value=0, max_value=10**9), xor=st.integers(min_value=1, max_value=255))
def test_fuzz_single_byte_corruption(small_zst, pos, xor):
    data, oracle = small_zst
    bad = bytearray(data)
    bad[pos % len(bad)] ^= xor
    try:
        with ZstdDevice(MemoryDevice(bytes(bad), writable=False)) as dev:
            got = dev.pread(dev.size, 0)
    except ImageFormatError:
        return
    assert got == oracle


@pytest.fixture(scope="module")
def small_zst(tmp_path_factory):
    d = tmp_path_factory.mktemp("smallzst")
    raw = d / "s.raw"
    data = make_source(raw, size=300 * KiB, seed=3)
    out = d / "s.zst"
    write_zstd(MemoryDevice(data, writable=False), str(out), {"frame_size": "64K", "level": "1"})
    return out.read_bytes(), run("zstd", "-dc", out).stdout


def test_raw_zst_stacking_and_qcow2(tmp_path):
    img = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "8M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 2M 128k", img)
    oracle = tmp_path / "disk.raw"
    run("qemu-img", "convert", "-O", "raw", img, oracle)
    zst = tmp_path / "disk.qcow2.zst"
    run("imageformats", "convert", "-f", "raw", "-O", "zstd", "-o", "frame_size=64K", img, zst)
    with imageformats.open(str(zst)) as dev:
        assert [layer.format_name for layer in dev.layers()][:2] == ["qcow2", "zstd"]
        assert dev.pread(dev.size, 0) == oracle.read_bytes()
    out = tmp_path / "back.raw"
    run("imageformats", "convert", "-O", "raw", zst, out)
    assert out.read_bytes() == oracle.read_bytes()


def test_seekable_large_frames_spill_and_verify(tmp_path, source):
    """Frames bigger than max_chunk_memory (pyzstd's default is 1 GiB frames) stream into the spill file."""
    path = tmp_path / "big.zst"
    oracle = pyzstd_file(path, source[1], 1 * MiB, checksum=True)
    with ZstdDevice(FileDevice(path), max_chunk_memory=256 * KiB, tmpdir=str(tmp_path)) as dev:
        random_reads(dev, oracle, n=30)
        info = dev.layer_info()
        assert info["spilled-chunks"] == info["frames"] == 3 and info["cache-used"] == 0
    data = bytearray(path.read_bytes())
    with ZstdDevice(FileDevice(path)) as dev:
        frame1 = dev._shared.chunks[1]
    data[frame1.cstart + frame1.csize // 2] ^= 0x20
    with ZstdDevice(MemoryDevice(bytes(data), writable=False), max_chunk_memory=256 * KiB,
                    tmpdir=str(tmp_path)) as dev:
        assert dev.pread(100, 0) == oracle[:100]
        with pytest.raises(CorruptImageError):
            dev.pread(100, MiB + 10)


def test_frame_count_cap(tmp_path, source, monkeypatch):
    import imageformats.zstd.device as zdev
    path = ours(tmp_path, source[1], frame="1M")  # 3 frames
    monkeypatch.setattr(zdev, "MAX_CHUNKS", 2)
    with pytest.raises(UnsupportedFeatureError, match="3 frames"):
        ZstdDevice(FileDevice(path))
    plain = tmp_path / "cat.zst"
    one = run("zstd", "-q", "-c", "-1", source[0]).stdout
    plain.write_bytes(one * 3)
    with pytest.raises(UnsupportedFeatureError, match="more than 2 frames"):
        ZstdDevice(FileDevice(plain))
