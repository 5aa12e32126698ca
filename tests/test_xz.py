"""XzDevice against files written by the real xz(1), byte-compared with ``xz -dc`` output."""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import imageformats
from imageformats.block import FileDevice, MemoryDevice
from imageformats.errors import (CorruptImageError, ImageFormatError, OutOfRangeError, ReadOnlyError,
                                 UnsupportedFeatureError)
from imageformats.testing.evil import EvilDevice
from imageformats.xz import XzDevice
from imageformats.xz import header as h
from imageformats.xz import liblzma

from peers import run

KiB, MiB = 1024, 1024 * 1024


def make_source(path, size=3 * MiB, seed=1) -> bytes:
    """Disk-like content: random runs, zero runs, text runs (an independent model: plain bytes)."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        kind = rng.randrange(3)
        n = rng.randrange(4 * KiB, 400 * KiB)
        if kind == 0:
            out += rng.randbytes(n)
        elif kind == 1:
            out += bytes(n)
        else:
            out += b"".join(b"line %d of some text %d\n" % (i, rng.randrange(99)) for i in range(n // 24))
    data = bytes(out[:size])
    path.write_bytes(data)
    return data


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("xzsrc") / "disk.raw"
    return path, make_source(path)


def xz_file(tmp_path, source, *args, name="disk.raw.xz"):
    src, _ = source
    out = tmp_path / name
    out.write_bytes(run("xz", "-c", *args, src).stdout)
    oracle = run("xz", "-dc", out).stdout  # the reference decoder's output is the oracle
    return out, oracle


def random_reads(dev, oracle, n=60, seed=0):
    rng = random.Random(seed)
    assert dev.size == len(oracle)
    for _ in range(n):
        off = rng.randrange(len(oracle))
        length = min(rng.choice([1, 512, 4096, 65536, 700 * KiB]), len(oracle) - off)
        assert dev.pread(length, off) == oracle[off:off + length], (off, length)


XZ_VARIANTS = [
    ["-T2", "--block-size=256KiB"],
    ["-T2", "-0"],                      # xz -T2 default block size (3 x dict = 768 KiB at -0)
    ["--block-size=300000", "-1"],
    ["--block-list=100KiB,1MiB,50KiB,2MiB", "-1"],
    ["--check=crc32", "--block-size=512KiB", "-1"],
    ["--check=crc64", "--block-size=512KiB", "-1"],
    ["--check=sha256", "--block-size=512KiB", "-1"],
    ["--check=none", "--block-size=512KiB", "-1"],
    ["--x86", "--lzma2=preset=1", "--block-size=1MiB"],
    ["--arm", "--lzma2=preset=1", "--block-size=1MiB"],
    ["--arm64", "--lzma2=preset=1", "--block-size=1MiB"],
    ["--delta=dist=4", "--lzma2=preset=1", "--block-size=1MiB"],
    ["-1"],                             # single Block (what xz wrote by default before 5.6)
]


@pytest.mark.parametrize("args", XZ_VARIANTS, ids=[" ".join(a) for a in XZ_VARIANTS])
def test_random_reads_match_xz(tmp_path, source, args):
    path, oracle = xz_file(tmp_path, source, *args)
    with imageformats.open(str(path)) as dev:
        assert dev.format_name == "xz"
        assert dev.readonly
        random_reads(dev, oracle)
        assert dev.pread(dev.size, 0) == oracle
        info = dev.layer_info()
        listing = run("xz", "--robot", "-lvv", path).stdout.decode()
        blocks = [line for line in listing.splitlines() if line.startswith("block\t")]
        assert info["blocks"] == len(blocks)


def test_concatenated_streams_with_padding(tmp_path, source):
    a, _ = xz_file(tmp_path, source, "-T2", "--block-size=200KiB", "-0", name="a.xz")
    b, _ = xz_file(tmp_path, source, "--check=sha256", "-1", name="b.xz")
    c, _ = xz_file(tmp_path, source, "--check=crc32", "--block-size=1MiB", "-0", name="c.xz")
    cat = tmp_path / "cat.xz"
    cat.write_bytes(a.read_bytes() + bytes(4) + b.read_bytes() + c.read_bytes() + bytes(12))
    oracle = run("xz", "-dc", cat).stdout
    with imageformats.open(str(cat)) as dev:
        assert dev.layer_info()["streams"] == 3
        assert dev.layer_info()["check"] == "crc32,crc64,sha256"
        random_reads(dev, oracle, n=80)
        # reads spanning stream boundaries
        n = len(source[1])
        for off in (n - 5000, 2 * n - 7, 3 * n - 4096):
            assert dev.pread(10000 if off + 10000 <= 3 * n else 3 * n - off, off) == oracle[off:off + 10000]


def test_bad_stream_padding(tmp_path, source):
    a, _ = xz_file(tmp_path, source, "-0")
    bad = tmp_path / "bad.xz"
    bad.write_bytes(a.read_bytes() + bytes(4) + b"\x01\x00\x00\x00")
    with pytest.raises(CorruptImageError):
        XzDevice(FileDevice(bad))
    bad.write_bytes(a.read_bytes() + bytes(2))
    with pytest.raises(CorruptImageError, match="multiple of four"):
        XzDevice(FileDevice(bad))


def test_single_block_spills_to_sparse_temp_file(tmp_path, source):
    path, oracle = xz_file(tmp_path, source, "-1")
    with XzDevice(FileDevice(path), max_chunk_memory=256 * KiB, tmpdir=str(tmp_path)) as dev:
        assert "large-blocks" in dev.layer_info()
        random_reads(dev, oracle, n=40)
        info = dev.layer_info()
        assert info["spilled-chunks"] == 1 and info["decoded"] == 1  # decoded exactly once
        assert info["cache-used"] == 0
        # zero runs of the decoded data are holes of the temporary file: extents report them
        exts = list(dev.extents(dev.size, 0))
        assert any(e.zero for e in exts)
        for e in exts:
            if e.zero:
                assert oracle[e.start:e.end] == bytes(e.length)
        assert info["spill-file-bytes"] < len(oracle)
        c = dev.clone()
        assert c.pread(4096, 12345) == oracle[12345:12345 + 4096]
        c.close()


def test_probe_decodes_only_the_head_of_a_big_single_block(tmp_path, source):
    """Opening a file xz wrote as one Block probes the guest's first bytes for a format inside;
    that must not decode (and spill) the whole Block, and the head must be xz's own bytes."""
    path, oracle = xz_file(tmp_path, source, "-1")
    with imageformats.open(str(path), max_chunk_memory=256 * KiB, tmpdir=str(tmp_path)) as dev:
        info = dev.cache_info()
        assert info["decoded"] == 0 and info["spilled-chunks"] == 0
        assert dev.head(4096) == oracle[:4096]
        assert dev.head(len(oracle) + 10) == oracle  # longer than the device: all of it


def test_extents_report_zero_blocks(tmp_path):
    raw = tmp_path / "z.raw"
    data = bytes(1 * MiB) + random.Random(5).randbytes(1 * MiB) + bytes(2 * MiB)
    raw.write_bytes(data)
    path = tmp_path / "z.xz"
    path.write_bytes(run("xz", "-c", "-T2", "--block-size=1MiB", "-0", raw).stdout)
    with XzDevice(FileDevice(path)) as dev:
        # before decoding nothing is known: data everywhere
        assert [(e.zero) for e in dev.extents(dev.size, 0)] == [False]
        dev.pread(dev.size, 0)
        exts = [(e.start, e.length, e.zero) for e in dev.extents(dev.size, 0)]
        assert exts == [(0, MiB, True), (MiB, MiB, False), (2 * MiB, 2 * MiB, True)]


def test_cache_is_bounded_and_clones_share_it(tmp_path, source):
    path, oracle = xz_file(tmp_path, source, "-T2", "--block-size=128KiB", "-0")
    with XzDevice(FileDevice(path), cache_size=512 * KiB, readahead=0) as dev:
        assert dev.pread(dev.size, 0) == oracle
        info = dev.layer_info()
        assert info["cache-used"] <= 512 * KiB
        assert info["decoded"] == info["blocks"]
        c = dev.clone()
        c.pread(4096, dev.size - 4096)  # the last block is cached: no new decode
        assert dev.layer_info()["decoded"] == info["decoded"]
        c.close()


def test_threads_with_clones(tmp_path, source):
    """Readers on four threads, a cache of four Blocks: constant eviction, and evicted Block
    buffers are reused for new decodes while other threads may still be copying from them."""
    path, oracle = xz_file(tmp_path, source, "-T2", "--block-size=256KiB", "-0")
    errors = []
    with XzDevice(FileDevice(path), cache_size=1 * MiB) as dev:
        def worker(seed):
            try:
                with dev.clone() as c:
                    random_reads(c, oracle, n=150, seed=seed)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert dev.cache_info()["reused-buffers"] > 0, "the test did not exercise buffer reuse"
    assert not errors, errors


def text_xz(tmp_path, blocks=12):
    """An xz of text in 256 KiB Blocks (no zero or stored pieces: each decoded Block is kept as
    one buffer)."""
    rng = random.Random(5)
    raw = tmp_path / "text.raw"
    raw.write_bytes(b"".join(b"line %d: %d\n" % (i, rng.randrange(10**9)) for i in range(blocks * 16000))
                    [:blocks * 256 * KiB])
    out = tmp_path / "text.raw.xz"
    out.write_bytes(run("xz", "-c", "-T2", "--block-size=256KiB", "-0", raw).stdout)
    return out, run("xz", "-dc", out).stdout


def test_memory_range_view_outlives_eviction(tmp_path):
    """A view from memory_range() keeps its bytes while its Block is evicted and buffers are
    recycled for new decodes (a server may still be sending it)."""
    path, oracle = text_xz(tmp_path)
    block = 256 * KiB
    with XzDevice(FileDevice(path), cache_size=block, readahead=0) as dev:
        view = dev.memory_range(64 * KiB, block + 4096)
        assert bytes(view) == oracle[block + 4096:block + 4096 + 64 * KiB]
        assert dev.memory_range(8192, block - 4096) is None  # spans two Blocks: no single view
        for i in range(2, 12):  # each decode evicts the one before; Block 1's buffer is pinned
            assert dev.pread(4096, i * block) == oracle[i * block:i * block + 4096]
        assert dev.cache_info()["reused-buffers"] > 0, "the test did not exercise buffer reuse"
        assert bytes(view) == oracle[block + 4096:block + 4096 + 64 * KiB]
        del view


def test_sequential_scan_evicts_what_it_passed(tmp_path):
    """A sequential reader keeps only the last Blocks it passed, so a scan reuses a few buffers
    instead of filling the cache, and decodes nothing twice."""
    path, oracle = text_xz(tmp_path)
    with XzDevice(FileDevice(path), readahead=2) as dev:  # the default cache would hold all 12
        step = 64 * KiB
        for off in range(0, dev.size, step):
            assert dev.pread(step, off) == oracle[off:off + step]
        info = dev.cache_info()
        assert info["decoded"] == 12
        assert info["cached-chunks"] == 3  # the Block being read and the two before it
        assert info["reused-buffers"] > 0


def test_two_sequential_readers_decode_each_block_once(tmp_path):
    """Two readers, each scanning one half (as nbdcopy splits a disk between connections): the
    first half's reader must not read ahead into the second half, which the other reader has
    already consumed and whose Blocks were evicted behind it."""
    path, oracle = text_xz(tmp_path)
    block, step = 256 * KiB, 64 * KiB
    with XzDevice(FileDevice(path), readahead=2) as dev:
        for off in range(0, 6 * block, step):
            for start in (0, 6 * block):
                assert dev.pread(step, start + off) == oracle[start + off:start + off + step]
        dev._shared.pool.shutdown(wait=True)  # let read-ahead started by the last reads finish
        assert dev.cache_info()["decoded"] == 12


def test_block_split_between_two_readers_is_decoded_once(tmp_path):
    """Two readers split the disk in the middle of a Block: the second starts there, the first
    reaches the Block's start much later.  The Block stays cached for it (not evicted as
    passed), so it is decoded once."""
    path, oracle = text_xz(tmp_path)
    block, step = 256 * KiB, 64 * KiB
    half = 5 * block + 2 * step
    with XzDevice(FileDevice(path), readahead=2) as dev:
        for off in range(0, 6 * block + 2 * step, step):
            for start, end in ((0, half), (half, 12 * block)):
                if start + off < end:
                    assert dev.pread(step, start + off) == oracle[start + off:start + off + step]
        dev._shared.pool.shutdown(wait=True)
        assert dev.cache_info()["decoded"] == 12


class _RecordingPool:
    """Stands in for the read-ahead thread pool: records which Blocks would be decoded ahead."""

    def __init__(self):
        self.submitted = []

    def submit(self, fn, index):
        self.submitted.append(index)

    def shutdown(self, **kwargs):
        pass


def test_read_ahead_is_shared_between_sequential_readers(tmp_path):
    """A lone sequential reader has both read-ahead slots (two Blocks ahead, so two decodes run
    at once); two readers one each (so decode buffers are read and reused sooner)."""
    path, oracle = text_xz(tmp_path)
    block, step = 256 * KiB, 64 * KiB
    with XzDevice(FileDevice(path), readahead=2) as dev:
        pool = dev._shared.pool = _RecordingPool()
        dev._shared.prefetch_backing = dev.backing.clone()
        for off in range(0, block + step, step):  # into Block 1
            dev.pread(step, off)
        assert pool.submitted[:2] == [1, 2]
        pool.submitted.clear()
        for off in range(0, 2 * block, step):  # a second reader, interleaved with the first
            dev.pread(step, 6 * block + off)
            dev.pread(step, 2 * block + off)
        assert sorted(set(pool.submitted)) == [3, 4, 7, 8]  # never two ahead of either reader
        assert all(dev.pread(step, i * block) == oracle[i * block:i * block + step] for i in range(12))


def test_idle_buffers_kept_within_the_cache_budget():
    """Evicted decode buffers are kept for reuse while the cache leaves room (a scan keeps it
    nearly empty), and dropped again as cached chunks need the room."""
    from imageformats.xz.chunked import _MAX_SPARE_BUFFERS, _Shared
    size = 1 * MiB
    shared = _Shared([], 0, cache_size=6 * size, max_chunk_memory=size, readahead=0, tmpdir=None)
    for _ in range(5):
        shared.give_back(bytearray(size))
    assert len(shared.spare) == 5 and shared.idle_bytes == 5 * size
    shared.give_back(bytearray(size))
    shared.give_back(bytearray(size))  # past the budget: not kept
    assert len(shared.spare) == 6
    with shared.lock:
        shared.cache_bytes = 3 * size  # cached chunks take room: idle buffers give it back
        shared.trim_idle_locked()
    assert len(shared.spare) == 3 and shared.idle_bytes == 3 * size
    with shared.lock:
        shared.cache_bytes = 6 * size
        shared.trim_idle_locked()
    assert len(shared.spare) == _MAX_SPARE_BUFFERS  # these few are kept whatever the budget
    assert shared.take_buffer(size) is not None and shared.idle_bytes == (_MAX_SPARE_BUFFERS - 1) * size


def text_and_random_xz(tmp_path, *filters):
    """1 MiB Blocks, each a quarter text (LZMA chunks) and three quarters random (stored
    uncompressed: at least its last two 256 KiB pieces)."""
    rng = random.Random(9)
    raw = bytearray()
    for i in range(8):
        text = b"".join(b"record %d of block %d\n" % (rng.randrange(10**6), i) for _ in range(12000))
        raw += text[:256 * KiB] + rng.randbytes(768 * KiB)
    src = tmp_path / "mixed.raw"
    src.write_bytes(raw)
    out = tmp_path / "mixed.raw.xz"
    out.write_bytes(run("xz", "-c", "-T2", "--block-size=1MiB", *filters, src).stdout)
    return out, run("xz", "-dc", out).stdout


def test_stored_pieces_are_read_from_the_file(tmp_path):
    """Incompressible data, which LZMA2 stores verbatim, is not kept in memory once its Block is
    verified: reads take it from the file, and the bytes are xz's own output."""
    path, oracle = text_and_random_xz(tmp_path, "-1")
    with XzDevice(FileDevice(path), readahead=0) as dev:
        random_reads(dev, oracle, n=200, seed=3)
        assert dev.pread(dev.size, 0) == oracle
        info = dev.cache_info()
        assert info["stored-pieces"] > 0
        # at least half of each Block costs (almost) nothing
        assert info["cache-used"] <= info["cached-chunks"] * 520 * KiB


def test_stored_piece_changed_after_verification_is_an_error(tmp_path):
    """A stored piece is checked against the CRC-32 of the verified decode on every read: bytes
    changed in the file afterwards raise CorruptImageError, never come out as data."""
    path, oracle = text_and_random_xz(tmp_path, "-1")
    with XzDevice(FileDevice(path), readahead=0) as dev:
        at = 900 * KiB  # in Block 0's random part
        assert dev.pread(4096, at) == oracle[at:at + 4096]
        assert dev.cache_info()["stored-pieces"] > 0
        where = path.read_bytes().find(oracle[at:at + 64])  # where xz stored those bytes
        assert where > 0
        with open(path, "r+b") as f:
            f.seek(where)
            f.write(bytes(64))
        with pytest.raises(CorruptImageError, match="changed since"):
            dev.pread(4096, at)


def test_stored_chunks_behind_a_bcj_filter_stay_in_memory(tmp_path):
    """With a BCJ filter before LZMA2 the stored bytes are filtered, not the guest's: no stored pieces."""
    path, oracle = text_and_random_xz(tmp_path, "--x86", "--lzma2=preset=1")
    with XzDevice(FileDevice(path), readahead=0) as dev:
        random_reads(dev, oracle, n=100, seed=4)
        assert dev.cache_info()["stored-pieces"] == 0


def test_readonly_and_range(tmp_path, source):
    path, oracle = xz_file(tmp_path, source, "-0")
    with imageformats.open(str(path)) as dev:
        with pytest.raises(ReadOnlyError):
            dev.pwrite(b"x", 0)
        with pytest.raises(OutOfRangeError):
            dev.pread(2, dev.size - 1)


# -- corruption -------------------------------------------------------------------------


def block_offsets(path):
    """(compressed offset, unpadded size, check size) of each Block, from xz --robot -lvv."""
    out = []
    for line in run("xz", "--robot", "-lvv", path).stdout.decode().splitlines():
        f = line.split("\t")
        if f[0] == "block":
            out.append((int(f[4]), int(f[6]), f[10]))  # comp offset, total size, check value
    return out


@pytest.mark.parametrize("check", ["crc32", "crc64", "sha256"])
def test_flipped_byte_in_block_data_or_check(tmp_path, source, check):
    path, oracle = xz_file(tmp_path, source, "-T2", f"--check={check}", "--block-size=512KiB", "-0")
    blocks = block_offsets(path)
    data = path.read_bytes()
    csize = h.check_size(h.CHECK_BY_NAME[check])
    for target, what in ((blocks[1][0] + blocks[1][1] - csize // 2 - 1, "check"),
                         (blocks[1][0] + blocks[1][1] // 2, "data"),
                         (blocks[1][0] + 5, "header")):
        bad = bytearray(data)
        bad[target] ^= 0x10
        p = tmp_path / f"bad-{what}.xz"
        p.write_bytes(bytes(bad))
        with imageformats.open(str(p)) as dev:
            assert dev.pread(4096, 0) == oracle[:4096]  # block 0 is intact
            with pytest.raises(CorruptImageError):
                dev.pread(4096, 512 * KiB + 100)  # block 1
            with pytest.raises(CorruptImageError):  # never cached as good
                dev.pread(1, 512 * KiB)


def test_index_and_footer_corruption(tmp_path, source):
    path, _ = xz_file(tmp_path, source, "-T2", "--block-size=512KiB", "-0")
    data = path.read_bytes()
    for pos in (len(data) - 3, len(data) - 8, len(data) - 20, 7):  # footer magic, backward size, index, header
        bad = bytearray(data)
        bad[pos] ^= 0x01
        with pytest.raises(CorruptImageError):
            XzDevice(MemoryDevice(bytes(bad), writable=False))
    for cut in (len(data) - 4, 24, 12):
        with pytest.raises(CorruptImageError):
            XzDevice(MemoryDevice(data[:cut], writable=False))


def test_index_sizes_must_match_block_headers(tmp_path, source):
    """An Index record whose uncompressed size disagrees with the Block Header is caught."""
    path, _ = xz_file(tmp_path, source, "-T2", "--block-size=512KiB", "-0")
    dev = XzDevice(FileDevice(path))
    chunks = dev._shared.chunks
    # Rebuild the file with an Index that moves 1 byte from block 0 to block 1 (CRC made valid).
    data = path.read_bytes()
    backward, check = h.parse_stream_footer(data[-12:])
    records = h.parse_index(data[-12 - backward:-12], max_records=10**6)
    records[0] = (records[0][0], records[0][1] - 1)
    records[1] = (records[1][0], records[1][1] + 1)
    index = h.build_index(records)
    bad = data[:len(data) - 12 - backward] + index + h.build_stream_footer(check, len(index))
    dev.close()
    with XzDevice(MemoryDevice(bad, writable=False)) as dev:
        assert dev.size == sum(c.usize for c in chunks)
        with pytest.raises(CorruptImageError, match="Block Header says"):
            dev.pread(10, 0)


@pytest.mark.parametrize("spill", [False, True])
def test_index_sizes_checked_when_block_headers_omit_them(tmp_path, source, spill):
    """Single-threaded xz writes Block Headers without sizes; then only the decoder can tell
    that a Block yields more (or fewer) bytes than its Index record says.  Both the in-memory
    decode and the streaming one (spilled Blocks) must refuse, never return shifted data."""
    path, _ = xz_file(tmp_path, source, "-T1", "--block-size=512KiB", "-0")
    data = path.read_bytes()
    backward, check = h.parse_stream_footer(data[-12:])
    records = h.parse_index(data[-12 - backward:-12], max_records=10**6)
    first = XzDevice(MemoryDevice(data, writable=False))
    header = h.parse_block_header(data[first._shared.chunks[0].cstart:][:(data[12] + 1) * 4])
    assert header.uncompressed_size is None, "xz -T1 was expected to leave sizes out of Block Headers"
    first.close()
    records[0] = (records[0][0], records[0][1] - 1)
    records[1] = (records[1][0], records[1][1] + 1)
    index = h.build_index(records)
    bad = data[:len(data) - 12 - backward] + index + h.build_stream_footer(check, len(index))
    options = {"max_chunk_memory": 4096} if spill else {}
    with XzDevice(MemoryDevice(bad, writable=False), **options) as dev:
        with pytest.raises(CorruptImageError):
            dev.pread(10, 0)  # Block 0 decodes to one byte more than recorded
        with pytest.raises(CorruptImageError):
            dev.pread(10, records[0][1] + 5)  # Block 1 decodes to one byte less


def test_evil_stuck_bits_never_wrong_data(tmp_path, source):
    path, oracle = xz_file(tmp_path, source, "-T2", "--block-size=256KiB", "-0")
    evil = EvilDevice(FileDevice(path), seed=7, stuck_bits=2e-6)
    errors = good = 0
    with XzDevice(evil) as dev:  # this seed leaves the Index intact
        for off in range(0, dev.size, 256 * KiB):
            n = min(256 * KiB, dev.size - off)
            try:
                got = dev.pread(n, off)
            except CorruptImageError:
                errors += 1
                continue
            assert got == oracle[off:off + n]
            good += 1
    assert errors > 0 and good > 0  # the seed corrupts some blocks but not all


def test_evil_eio_is_reported(tmp_path, source):
    path, oracle = xz_file(tmp_path, source, "-T2", "--block-size=256KiB", "-0")
    blocks = block_offsets(path)
    evil = EvilDevice(FileDevice(path), eio=((blocks[2][0] + 100, 10),))
    with XzDevice(evil) as dev:
        assert dev.pread(100, 0) == oracle[:100]
        with pytest.raises(ImageFormatError):
            dev.pread(100, 2 * 256 * KiB)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(min_value=0, max_value=10**9), xor=st.integers(min_value=1, max_value=255))
def test_fuzz_single_byte_corruption(small_xz, pos, xor):
    data, oracle = small_xz
    bad = bytearray(data)
    bad[pos % len(bad)] ^= xor
    try:
        with XzDevice(MemoryDevice(bytes(bad), writable=False)) as dev:
            got = dev.pread(dev.size, 0)
    except ImageFormatError:
        return
    assert got == oracle  # every byte of an xz file is covered by a CRC or the block check


@pytest.fixture(scope="module")
def small_xz(tmp_path_factory):
    d = tmp_path_factory.mktemp("smallxz")
    raw = d / "s.raw"
    make_source(raw, size=300 * KiB, seed=3)
    data = run("xz", "-c", "-T2", "--block-size=64KiB", "-0", raw).stdout
    return data, run("xz", "-dc", input=data).stdout


# -- stacking ---------------------------------------------------------------------------


def test_qcow2_inside_xz(tmp_path):
    img = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "8M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 64k", "-c", "write -P 0x11 5M 1M", img)
    oracle = tmp_path / "disk.raw"
    run("qemu-img", "convert", "-O", "raw", img, oracle)
    xzpath = tmp_path / "disk.qcow2.xz"
    xzpath.write_bytes(run("xz", "-c", "-T2", "--block-size=256KiB", "-0", img).stdout)
    with imageformats.open(str(xzpath)) as dev:
        assert [layer.format_name for layer in dev.layers()][:2] == ["qcow2", "xz"]
        assert dev.pread(dev.size, 0) == oracle.read_bytes()


def test_cli_info_and_cat(tmp_path, source):
    path, oracle = xz_file(tmp_path, source, "-T2", "--block-size=512KiB", "-0")
    doc = json.loads(run("imageformats", "info", "--output", "json", path).stdout)
    assert doc["stack"] == ["file", "xz"]
    assert doc["layers"][0]["blocks"] == len(block_offsets(path)) == 6
    raw = tmp_path / "out.raw"
    run("imageformats", "convert", "-O", "raw", path, raw)
    assert raw.read_bytes() == oracle


def test_hostile_index_sizes_are_not_allocated(tmp_path, source):
    """An Index claiming a 1 TiB Block: nothing that size is allocated; the read fails cleanly."""
    path, _ = xz_file(tmp_path, source, "-0")  # one Block, no sizes in its header
    data = path.read_bytes()
    backward, check = h.parse_stream_footer(data[-12:])
    records = h.parse_index(data[-12 - backward:-12], max_records=10)
    records[0] = (records[0][0], 1 << 40)
    index = h.build_index(records)
    bad = tmp_path / "huge.xz"
    bad.write_bytes(data[:len(data) - 12 - backward] + index + h.build_stream_footer(check, len(index)))
    with XzDevice(FileDevice(bad), tmpdir=str(tmp_path)) as dev:
        assert dev.size == 1 << 40
        with pytest.raises(ImageFormatError):
            dev.pread(4096, 0)


def test_memlimit(tmp_path, source):
    path, oracle = xz_file(tmp_path, source, "-T2", "--block-size=1MiB", "-6")  # 8 MiB dictionary
    with XzDevice(FileDevice(path), memlimit=1 << 20) as dev:
        with pytest.raises(UnsupportedFeatureError, match="memlimit"):
            dev.pread(10, 0)
    with XzDevice(FileDevice(path), memlimit=64 << 20) as dev:
        assert dev.pread(4096, 0) == oracle[:4096]


def _version(text: str) -> tuple[int, ...]:
    return tuple(map(int, re.search(r"(\d+)\.(\d+)\.(\d+)", text).groups()))


def test_decoder_uses_the_newest_liblzma_at_hand():
    """Debian 12's liblzma is 5.4.1; imagecodecs' wheel bundles a newer one (5.6 sped up LZMA
    decoding): the decoder takes whichever is newer.  Oracles: the versions the xz tool and
    imagecodecs each report for their own library."""
    import imagecodecs

    system = _version(run("xz", "--version").stdout.decode().splitlines()[1])  # "liblzma 5.4.1"
    bundled = _version(imagecodecs.lzma_version())                              # "liblzma 5.8.2"
    assert _version(liblzma.version_string()) == max(system, bundled)


DECODE_AND_REPORT = """
import hashlib, sys
from imageformats.block import FileDevice
from imageformats.xz import XzDevice, liblzma
with XzDevice(FileDevice(sys.argv[1])) as dev:
    print(liblzma.version_string(), hashlib.sha256(dev.pread(dev.size, 0)).hexdigest())
"""


@pytest.mark.parametrize("choice", ["system", "", "bundled"])
def test_every_liblzma_choice_decodes_what_xz_decodes(tmp_path, source, choice):
    """IMAGEFORMATS_LIBLZMA=system forces the system library, a path forces that file; either
    way the bytes are xz's (the system xz tool is the oracle)."""
    import imagecodecs

    path, oracle = xz_file(tmp_path, source, "-T2", "--block-size=256KiB", "--x86", "--lzma2=preset=6")
    if choice == "bundled":
        choice = liblzma._bundled_paths()[0]
    proc = run(sys.executable, "-c", DECODE_AND_REPORT, path, env={liblzma.LIBRARY_ENV: choice})
    version, digest = proc.stdout.decode().split()
    assert digest == hashlib.sha256(oracle).hexdigest()
    expected = {"system": run("xz", "--version").stdout.decode().splitlines()[1],
                "": liblzma.version_string()}.get(choice, imagecodecs.lzma_version())
    assert _version(version) == _version(expected)


@pytest.mark.parametrize("library", ["nope.so", "libc.so.6"])
def test_unusable_liblzma_named_in_one_line(tmp_path, source, library):
    """A missing file, or a library that is not liblzma: one line naming it, no traceback."""
    path, _ = xz_file(tmp_path, source, "-1")
    choice = str(tmp_path / library) if library == "nope.so" else library
    proc = run("imageformats", "info", path, check=False, env={liblzma.LIBRARY_ENV: choice})
    assert proc.returncode != 0
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "IMAGEFORMATS_LIBLZMA" in err and library in err, err


def test_serve_qcow2_xz_over_nbd(tmp_path):
    """`imageformats serve disk.qcow2.xz`: nbdcopy and nbdinfo read the guest view through NBD."""
    img = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "8M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 3M 192k", img)
    oracle = tmp_path / "disk.raw"
    run("qemu-img", "convert", "-O", "raw", img, oracle)
    xzpath = tmp_path / "disk.qcow2.xz"
    run("imageformats", "convert", "-f", "raw", "-O", "xz", "-o", "block_size=1M,level=0", img, xzpath)
    out = tmp_path / "out.raw"
    run("imageformats", "serve", xzpath, "--run", f'nbdcopy "$uri" {out}')
    assert out.read_bytes() == oracle.read_bytes()


def test_block_count_cap(tmp_path, source, monkeypatch):
    """A hostile Index cannot make us build millions of Block records (the cap is 4 Mi)."""
    import imageformats.xz.device as xzdev
    path, _ = xz_file(tmp_path, source, "-T2", "--block-size=512KiB", "-0")  # 6 Blocks
    monkeypatch.setattr(xzdev, "MAX_CHUNKS", 5)
    with pytest.raises(UnsupportedFeatureError, match="more than 5 Blocks"):
        XzDevice(FileDevice(path))
    monkeypatch.setattr(xzdev, "MAX_CHUNKS", 6)
    XzDevice(FileDevice(path)).close()


def test_lzma2_uncompressed_chunks_walk(tmp_path):
    """The LZMA2 chunk-header walk finds where xz stored bytes verbatim (checked against xz -dc's
    output) and rejects headers that do not add up."""
    path, oracle = text_and_random_xz(tmp_path, "-1")
    data = path.read_bytes()
    read = lambda n, off: data[off:off + n]  # noqa: E731
    with XzDevice(FileDevice(path)) as dev:
        chunk = dev._shared.chunks[1]
        check, unpadded = chunk.extra
        start = chunk.cstart + (data[chunk.cstart] + 1) * 4
        end = chunk.cstart + unpadded - h.check_size(check)
        runs = h.lzma2_uncompressed_chunks(read, start, end, chunk.usize)
    assert sum(n for _, _, n in runs) >= 512 * KiB
    for rel, at, n in runs:
        assert data[at:at + n] == oracle[chunk.ustart + rel:chunk.ustart + rel + n]
    with pytest.raises(CorruptImageError, match="decode to"):
        h.lzma2_uncompressed_chunks(read, start, end, chunk.usize + 1)
    with pytest.raises(CorruptImageError, match="past the Block"):
        h.lzma2_uncompressed_chunks(read, start, end - 1000, chunk.usize)
    bad = bytes([0x40]) + data[start + 1:end]
    with pytest.raises(CorruptImageError, match="invalid control byte"):
        h.lzma2_uncompressed_chunks(lambda n, off: bad[off:off + n], 0, len(bad), chunk.usize)
