"""sparse_random: determinism, the shape, exact extents, O(1) memory, the verifying target, 1 TiB copies."""

from __future__ import annotations

import hashlib
import itertools
import random
import time
import tracemalloc

import numpy as np
import pytest

from contract import check_device
from peers import qemu_extents_as_ours, qemu_img_map, run

import imageformats
from imageformats.block import GiB, MiB, TiB, FileDevice, copy
from imageformats.errors import ImageFormatError, InvalidArgumentError, ReadOnlyError
from imageformats.testing.evil import EvilDevice
from imageformats.testing.sparse_random import GRANULE, MismatchError, SparseRandomDevice


def digest(dev, ranges) -> str:
    h = hashlib.sha256()
    for off, n in ranges:
        h.update(dev.pread(n, off))
    return h.hexdigest()


def data_blocks_from_content(content: bytes, granule: int = GRANULE) -> np.ndarray:
    """Which granules hold a non-zero byte: computed from the bytes, not from our extents."""
    arr = np.frombuffer(content, dtype=np.uint8)
    full = len(arr) // granule * granule
    mask = arr[:full].reshape(-1, granule).any(axis=1)
    if full < len(arr):
        mask = np.append(mask, arr[full:].any())
    return mask


def data_blocks_from_extents(dev, granule: int = GRANULE) -> np.ndarray:
    n = -(-dev.size // granule)
    mask = np.zeros(n, dtype=bool)
    for e in dev.extents(dev.size, 0):
        if not e.zero:
            assert e.start % granule == 0 and (e.end % granule == 0 or e.end == dev.size)
            mask[e.start // granule : -(-e.end // granule)] = True
    return mask


def test_same_seed_same_bytes_other_seed_other_bytes():
    rnd = random.Random(1)
    ranges = [(rnd.randrange(0, TiB - MiB), MiB) for _ in range(20)]
    a = SparseRandomDevice(TiB, seed=42, percent=30)
    b = SparseRandomDevice(TiB, seed=42, percent=30)
    c = SparseRandomDevice(TiB, seed=43, percent=30)
    assert digest(a, ranges) == digest(b, ranges)
    assert list(itertools.islice(a.extents(TiB, 0), 500)) == list(itertools.islice(b.extents(TiB, 0), 500))
    assert list(itertools.islice(a.extents(TiB, 0), 50)) != list(itertools.islice(c.extents(TiB, 0), 50))
    # Same layout and key for every handle, every process (nothing depends on hash randomisation).
    island = next(a.islands())
    out = run("python3", "-c", "import sys; from imageformats.testing.sparse_random import SparseRandomDevice as S;"
              f"d=S({TiB}, seed=42, percent=30); sys.stdout.buffer.write(d.pread(4096, {island[0]}))",
              env={"PYTHONHASHSEED": "123"}).stdout
    assert out == a.pread(4096, island[0])


def test_extents_report_the_islands_exactly():
    dev = SparseRandomDevice(96 * MiB + 12345, seed=5, percent=15, runlength=512 * 1024)
    content = dev.pread(dev.size, 0)
    from_bytes = data_blocks_from_content(content)
    from_extents = data_blocks_from_extents(dev)
    assert from_bytes.any() and not from_bytes.all()
    assert np.array_equal(from_bytes, from_extents)
    # Islands are data and holes read as zero, exactly (byte resolution, not just granules).
    for e in dev.extents(dev.size, 0):
        part = np.frombuffer(content, dtype=np.uint8)[e.start : e.end]
        if e.zero:
            assert e.hole and not part.any()
        else:
            assert not e.hole and part[:16].any() and part[-16:].any()


def test_content_is_aes_ctr_keystream_checked_with_openssl():
    """The island bytes are AES-256-CTR of zeroes with counter offset // 16: openssl enc is the oracle."""
    dev = SparseRandomDevice(GiB, seed=7, percent=5, runlength=MiB)
    start, end = next(dev.islands(300 * MiB))
    start = max(start, 300 * MiB)
    offset = start + 16 * 1000  # a 16-aligned point inside the island
    n = min(65536, end - offset)
    key = hashlib.blake2b(b"sparse-random content\0" + b"i7", digest_size=32).digest()
    iv = (offset // 16).to_bytes(16, "big")
    want = run("openssl", "enc", "-aes-256-ctr", "-nosalt", "-K", key.hex(), "-iv", iv.hex(), input=bytes(n)).stdout
    assert dev.pread(n, offset) == want
    # Unaligned reads give the same bytes.
    assert dev.pread(n - 7, offset + 3) == want[3 : n - 4]


@pytest.mark.parametrize("percent", [1.0, 10.0, 50.0, 90.0])
def test_percent_is_honoured_over_1tib(percent):
    dev = SparseRandomDevice(TiB, seed=int(percent), percent=percent)
    data = sum(e.length for e in dev.extents(dev.size, 0) if not e.zero)
    assert data == dev.data_bytes()
    assert abs(data / TiB * 100 - percent) < 0.05 * percent + 0.01
    runs = [e.length for e in dev.extents(dev.size, 0) if not e.zero]
    assert 0.7 * 16 * MiB < sum(runs) / len(runs) < 1.3 * 16 * MiB or percent >= 90


def test_percent_zero_and_hundred():
    empty = SparseRandomDevice(TiB, percent=0)
    assert list(empty.extents(TiB, 0)) == [imageformats.Extent(0, TiB, True, True)]
    assert empty.pread(MiB, 12345) == bytes(MiB)
    full = SparseRandomDevice(TiB, percent=100, seed=2)
    assert list(full.extents(TiB, 0)) == [imageformats.Extent(0, TiB, False, False)]
    assert not np.any(data_blocks_from_content(full.pread(4 * MiB, 512 * GiB)) == 0)


def test_1tib_and_8tib_extents_in_constant_memory():
    for size, limit, trace in ((TiB, 15.0, True), (8 * TiB, 30.0, False)):
        dev = SparseRandomDevice(size, seed=9, percent=10)
        if trace:
            tracemalloc.start()
        t0 = time.perf_counter()
        total = count = data = 0
        for e in dev.extents(size, 0):
            total += e.length
            count += 1
            data += 0 if e.zero else e.length
        elapsed = time.perf_counter() - t0
        if trace:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert peak < 256 * 1024, f"extents walk of {size} bytes peaked at {peak} bytes"
        assert total == size and count > size // (512 * MiB)
        assert elapsed < limit


def test_verifying_target_accepts_its_own_content():
    dev = SparseRandomDevice(256 * MiB, seed=1, percent=20, runlength=MiB, writable=True)
    s, e = next(dev.islands(100 * MiB))
    lo, hi = s - 8192, min(e + 8192, dev.size)  # an island plus some sea each side
    dev.pwrite(dev.pread(hi - lo, lo), lo)
    dev.pwrite(bytes(4096), s - 4096)
    dev.zero(s - lo, lo)
    dev.trim(s - lo, lo, )
    dev.zero(hi - e, e, may_trim=True, fast=True)
    assert dev.stats.written == hi - lo + 4096
    assert dev.stats.zeroed == 2 * (s - lo) + (hi - e)


def test_verifying_target_names_the_first_wrong_offset():
    dev = SparseRandomDevice(256 * MiB, seed=1, percent=20, runlength=MiB, writable=True)
    s, e = next(dev.islands(100 * MiB))
    good = bytearray(dev.pread(65536, s))
    good[1000] ^= 0x10
    with pytest.raises(MismatchError, match=f"at offset {s + 1000} "):
        dev.pwrite(good, s)
    # Data in the sea.
    with pytest.raises(MismatchError, match=f"offset {s - 10},"):
        dev.pwrite(b"\x00" * 6 + b"\x01" + bytes(3), s - 16)
    # zero/trim over an island.
    with pytest.raises(MismatchError, match=f"data at offset {s}"):
        dev.zero(8192, s - 4096)
    with pytest.raises(MismatchError, match=f"data at offset {s + 4096}"):
        dev.trim(4096, s + 4096)
    with pytest.raises(MismatchError):
        dev.zero(dev.size, 0, may_trim=True)
    assert issubclass(MismatchError, ImageFormatError)
    assert dev.stats.written == 0 and dev.stats.zeroed == 0
    ro = SparseRandomDevice(256 * MiB, seed=1, percent=20, runlength=MiB)
    with pytest.raises(ReadOnlyError):
        ro.pwrite(ro.pread(10, s), s)


def test_copy_1tib_into_a_verifying_1tib_target_in_seconds():
    src = SparseRandomDevice(TiB, seed=2026, percent=0.01)
    dst = SparseRandomDevice(TiB, seed=2026, percent=0.01, writable=True)
    islands = src.data_bytes()
    assert 20 * MiB < islands < 400 * MiB
    t0 = time.perf_counter()
    stats = copy(src, dst)
    elapsed = time.perf_counter() - t0
    assert stats.data_bytes == islands, "work proportional to the data: exactly the island bytes were copied"
    assert stats.zero_bytes == TiB - islands
    assert dst.stats.written == islands and dst.stats.zeroed == TiB - islands
    assert elapsed < 30, f"copying 1 TiB with {islands} data bytes took {elapsed:.1f} s"


def test_a_wrong_copy_is_caught():
    src = SparseRandomDevice(TiB, seed=2026, percent=0.01)
    dst = SparseRandomDevice(TiB, seed=2026, percent=0.01, writable=True)
    with pytest.raises(MismatchError, match="differs from the content at offset"):
        copy(EvilDevice(src, seed=1, stuck_bits=1e-6), dst)
    # A copy from another seed fails at once on the first island.
    other = SparseRandomDevice(TiB, seed=2027, percent=0.01)
    with pytest.raises(MismatchError):
        copy(other, SparseRandomDevice(TiB, seed=2026, percent=0.01, writable=True), workers=1)


def test_round_trip_through_a_sparse_file(tmp_path):
    """sparse-random -> raw file (qemu-img map agrees with our islands) -> verifying target."""
    src = SparseRandomDevice(64 * MiB, seed=77, percent=25, runlength=2 * MiB)
    path = tmp_path / "sr.raw"
    with FileDevice.create(path, src.size) as f:
        copy(src, f, dst_is_zero=True)
    ours = [(e.start, e.length, e.zero, e.hole) for e in src.extents(src.size, 0)]
    assert qemu_extents_as_ours(qemu_img_map(path, "raw")) == ours
    with FileDevice(path) as f:
        stats = copy(f, SparseRandomDevice(64 * MiB, seed=77, percent=25, runlength=2 * MiB, writable=True))
    assert stats.data_bytes == src.data_bytes()


def test_contract_and_clone_share_stats():
    dev = SparseRandomDevice(32 * MiB + 3, seed="text seed", percent=40, runlength=65536, writable=True)
    clone = dev.clone()
    s, e = next(dev.islands())
    clone.pwrite(dev.pread(e - s, s), s)
    assert dev.stats.written == e - s
    clone.close()
    info = dev.layer_info()
    assert info["seed"] == "text seed" and info["percent"] == 40.0 and info["verifying-target"] is True
    check_device(dev)


def test_url_source_and_bad_parameters():
    url = "sparse-random://1G?seed=3&percent=2.5&runlength=1M"
    with imageformats.open(url) as dev:
        assert dev.size == GiB and dev.format_name == "sparse-random"
        ref = SparseRandomDevice(GiB, seed=3, percent=2.5, runlength=MiB)
        s, _ = next(ref.islands())
        assert dev.pread(MiB, s) == ref.pread(MiB, s)
        assert list(dev.extents(GiB, 0)) == list(ref.extents(GiB, 0))
    with imageformats.open("sparse-random://1M?verify=1&percent=100") as dev:
        assert not dev.readonly
    bad = ["sparse-random://1G?percent=101", "sparse-random://1G?colour=red", "sparse-random://?seed=1",
           "sparse-random://1G?runlength=100", "sparse-random://lots"]
    for url in bad:
        with pytest.raises(InvalidArgumentError):
            imageformats.open(url)
    for kwargs in ({"percent": -1}, {"runlength": 0}, {"seed": 1.5}, {"percent": "x"}):
        with pytest.raises(InvalidArgumentError):
            SparseRandomDevice(MiB, **kwargs)
    with pytest.raises(InvalidArgumentError):
        SparseRandomDevice(-1)
