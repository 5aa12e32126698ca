"""evil: persistent stuck bits, transient cosmic rays, EIO ranges; writes pass through."""

from __future__ import annotations

import time

import numpy as np
import pytest

from contract import check_device, check_writable

from imageformats.block import MiB, MemoryDevice, SliceDevice
from imageformats.errors import DeviceIOError, InvalidArgumentError
from imageformats.testing.evil import EvilDevice

SIZE = 4 * MiB


def bits_set(data: bytes) -> np.ndarray:
    """Global bit indexes (byte*8 + bit) that are 1."""
    return np.flatnonzero(np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little"))


def bits_clear(data: bytes) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little") == 0)


def test_no_faults_is_transparent():
    rnd = np.random.default_rng(1)
    content = rnd.integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    dev = EvilDevice(MemoryDevice(bytearray(content)), seed=3)
    assert dev.pread(SIZE, 0) == content
    check_device(dev, content)
    dev = EvilDevice(MemoryDevice(bytearray(content)), seed=3)
    check_writable(dev)


def test_stuck_bits_are_persistent_and_reconstructed_from_the_seed():
    p = 1e-4
    dev = EvilDevice(MemoryDevice(SIZE), seed=11, stuck_bits=p)
    first = dev.pread(SIZE, 0)
    high = bits_set(first)  # over zeroes, only stuck-high bits show
    nbits = 8 * SIZE
    # Expected number of stuck bits: p * nbits (3355), half of them high.
    assert abs(len(high) - p * nbits / 2) < 6 * np.sqrt(p * nbits / 2)
    assert dev.pread(SIZE, 0) == first, "a stuck bit reads the same every time"
    clone = dev.clone()
    assert clone.pread(SIZE, 0) == first, "clones see the same stuck bits"
    again = EvilDevice(MemoryDevice(SIZE), seed=11, stuck_bits=p)
    assert again.pread(SIZE, 0) == first, "the map is a function of the seed and the offset only"
    # Any read alignment sees the same bits.
    for offset, length in [(1, 4095), (4095, 2), (123457, 300001), (SIZE - 5000, 5000)]:
        assert dev.pread(length, offset) == first[offset : offset + length]
    other = EvilDevice(MemoryDevice(SIZE), seed=12, stuck_bits=p).pread(SIZE, 0)
    overlap = np.intersect1d(bits_set(other), high)
    assert len(overlap) < len(high) // 10, "a different seed gives a different map"


def test_stuck_bits_survive_writes_and_have_both_polarities():
    p = 2e-4
    backing = MemoryDevice(SIZE)
    dev = EvilDevice(backing, seed=5, stuck_bits=p)
    high = bits_set(dev.pread(SIZE, 0))
    dev.pwrite(b"\xff" * SIZE, 0)  # writes pass through unchanged...
    assert backing.data == b"\xff" * SIZE
    low = bits_clear(dev.pread(SIZE, 0))  # ...but the stuck-low bits still read 0
    assert len(high) and len(low)
    assert len(np.intersect1d(high, low)) == 0, "a bit is stuck high or low, never both"
    total = len(high) + len(low)
    assert abs(total - p * 8 * SIZE) < 6 * np.sqrt(p * 8 * SIZE)
    # The map the device exposes matches what reads show.
    b = int(high[0]) // 8 // dev.block
    positions, values = dev.stuck_map(b)
    mapped_high = {b * dev.block * 8 + int(pos) for pos, v in zip(positions, values) if v == 1}
    shown = {int(x) for x in high if x // 8 // dev.block == b}
    assert shown == mapped_high


def test_stuck_probability_below_one_varies_only_at_stuck_bits():
    dev = EvilDevice(MemoryDevice(SIZE), seed=8, stuck_bits=1e-4, stuck_probability=0.5)
    always = set(bits_set(EvilDevice(MemoryDevice(SIZE), seed=8, stuck_bits=1e-4).pread(SIZE, 0)).tolist())
    seen = [set(bits_set(dev.pread(SIZE, 0)).tolist()) for _ in range(4)]
    assert all(s <= always for s in seen)
    assert len(set.union(*seen)) > len(seen[0])  # different subsets on different reads
    assert 0.3 * len(always) < len(seen[0]) < 0.7 * len(always)


def test_cosmic_rays_are_transient():
    p = 1e-5
    rnd = np.random.default_rng(2)
    content = rnd.integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    dev = EvilDevice(MemoryDevice(bytearray(content)), seed=1, cosmic_rays=p)
    reads = [dev.pread(SIZE, 0) for _ in range(3)]
    ref = np.frombuffer(content, dtype=np.uint8)
    flips = [np.flatnonzero(np.unpackbits(np.frombuffer(r, dtype=np.uint8) ^ ref)) for r in reads]
    for f in flips:
        assert abs(len(f) - p * 8 * SIZE) < 6 * np.sqrt(p * 8 * SIZE) + 2
    assert len(np.intersect1d(flips[0], flips[1])) < len(flips[0]) // 5, "flips are not persistent"
    # Seeded: a fresh device with the same seed replays the same sequence.
    replay = EvilDevice(MemoryDevice(bytearray(content)), seed=1, cosmic_rays=p)
    assert replay.pread(SIZE, 0) == reads[0]


def test_eio_ranges():
    backing = MemoryDevice(bytes(range(256)) * 4096)
    dev = EvilDevice(backing, eio=[(100_000, 10), (500_000, 4096)])
    assert dev.pread(100_000, 0) == backing.pread(100_000, 0)
    assert dev.pread(1000, 100_010) == backing.pread(1000, 100_010)
    with pytest.raises(DeviceIOError, match="at offset 100009"):
        dev.pread(1, 100_009)
    with pytest.raises(DeviceIOError, match="at offset 100000"):
        dev.pread(200_000, 50_000)
    with pytest.raises(DeviceIOError, match="at offset 500000"):
        dev.pread(MiB - 200_000, 200_000)
    dev.pwrite(b"\x01" * 20, 99_995)  # writes pass unless eio_writes
    assert backing.pread(20, 99_995) == b"\x01" * 20
    strict = EvilDevice(backing, eio=[(100_000, 10)], eio_writes=True)
    with pytest.raises(DeviceIOError):
        strict.pwrite(b"\x02" * 20, 99_995)
    with pytest.raises(DeviceIOError):
        strict.zero(4096, 98_000)
    with pytest.raises(DeviceIOError):
        strict.trim(4096, 98_000)
    assert backing.pread(20, 99_995) == b"\x01" * 20, "a failed write changed nothing"
    strict.pwrite(b"\x03", 100_010)
    assert backing.pread(1, 100_010) == b"\x03"
    # Through a clone and over a slice too.
    sliced = EvilDevice(SliceDevice(backing, 4096, 200_000), eio=[(0, 1)]).clone()
    with pytest.raises(DeviceIOError):
        sliced.pread(10, 0)
    assert sliced.pread(10, 1) == backing.pread(10, 4097)


def test_cheap_without_faults_and_fast_for_mib_reads():
    backing = MemoryDevice(16 * MiB)
    for p, limit in ((0.0, 0.01), (1e-8, 0.02), (1e-4, 0.2)):
        dev = EvilDevice(backing, seed=4, stuck_bits=p)
        t0 = time.perf_counter()
        for i in range(16):
            dev.pread(MiB, i * MiB)
        per_read = (time.perf_counter() - t0) / 16
        assert per_read < limit, f"stuck_bits={p}: {per_read * 1000:.1f} ms per MiB read"


def test_bad_parameters():
    mem = MemoryDevice(10)
    for kwargs in ({"stuck_bits": 1.5}, {"cosmic_rays": -0.1}, {"block": 0}, {"eio": [(1,)]},
                   {"eio": [(-1, 5)]}, {"seed": "x"}, {"stuck_probability": 2}):
        with pytest.raises(InvalidArgumentError):
            EvilDevice(mem, **kwargs)
    info = EvilDevice(mem, seed=3, stuck_bits=1e-6, eio=[(1, 2)]).layer_info()
    assert info["seed"] == 3 and info["stuck-bits"] == 1e-6 and info["eio"] == [[1, 2]]
