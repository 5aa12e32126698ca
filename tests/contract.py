"""The block-device contract as reusable checks, for every device type in the tree.

Format engineers call these on their own devices::

    from contract import check_device, check_writable

    def test_my_device_contract(tmp_path):
        dev = MyDevice(...)
        check_device(dev, expected=oracle_bytes)     # closes dev at the end

``expected`` is the independent oracle (bytes of the whole guest view, e.g. from
``qemu-img convert -O raw``), or a callable ``(offset, length) -> bytes`` for
devices too large to hold, or None to check self-consistency only.  Every
check raises AssertionError with a message naming what broke.
"""

from __future__ import annotations

import array
import bisect
import itertools
import random
from collections.abc import Callable

import numpy as np
import pytest

from imageformats.block import BlockDevice, Extent
from imageformats.errors import ClosedDeviceError, ImageFormatError, OutOfRangeError, ReadOnlyError

Oracle = bytes | bytearray | Callable[[int, int], bytes] | None

#: Largest single read the checks make (big devices are sampled, not read whole).
MAX_READ = 1 << 20


def _expect(expected: Oracle, offset: int, length: int) -> bytes | None:
    if expected is None:
        return None
    if callable(expected):
        return bytes(expected(offset, length))
    return bytes(expected[offset : offset + length])


def sample_ranges(size: int, rnd: random.Random, count: int = 24, max_len: int = MAX_READ) -> list[tuple[int, int]]:
    """(offset, length) pairs: the start, the end, unaligned and aligned ones, all in range."""
    if size == 0:
        return [(0, 0)]
    out = [(0, min(size, max_len)), (size - 1, 1), (max(0, size - min(size, 4096)), min(size, 4096)), (0, 1)]
    for _ in range(count):
        length = rnd.choice([1, 511, 512, 4096, 65536, rnd.randrange(1, max_len + 1)])
        length = min(length, size)
        offset = rnd.randrange(0, size - length + 1)
        if rnd.random() < 0.5:
            offset -= offset % 4096
        out.append((offset, length))
    return out


# -- reads ---------------------------------------------------------------------------------------


def check_out_of_range(dev: BlockDevice) -> None:
    size = dev.size
    bad = [(1, -1), (-1, 0), (1, size), (2, size - 1), (size + 1, 0), (0, size + 1), (1 << 62, 0)]
    for length, offset in bad:
        if length >= 0 and offset >= 0 and offset + length <= size:
            continue
        with pytest.raises(OutOfRangeError):
            dev.pread(length, offset)
        if 0 <= length <= MAX_READ:
            with pytest.raises(OutOfRangeError):
                dev.readinto(bytearray(length), offset)
        with pytest.raises(OutOfRangeError):
            list(dev.extents(length if length else 1, offset))
    assert dev.pread(0, size) == b"", "a zero-length read at the end returns b''"


def check_reads(dev: BlockDevice, expected: Oracle = None, *, seed: int = 0, count: int = 24) -> None:
    rnd = random.Random(seed)
    for offset, length in sample_ranges(dev.size, rnd, count):
        if length == 0:
            continue
        got = dev.pread(length, offset)
        assert isinstance(got, bytes) and len(got) == length, f"pread({length}, {offset}) returned {len(got)} bytes"
        want = _expect(expected, offset, length)
        if want is not None:
            if got != want:
                i = next(i for i in range(length) if got[i] != want[i])
                raise AssertionError(f"pread({length}, {offset}) differs from the oracle at offset {offset + i}")
        # readinto fills exactly the buffer it is given, whatever its type.
        sentinel = bytearray(b"\xa5" * (length + 32))
        dev.readinto(memoryview(sentinel)[16 : 16 + length], offset)
        assert sentinel[:16] == b"\xa5" * 16 and sentinel[16 + length :] == b"\xa5" * 16, "readinto wrote outside its buffer"
        assert bytes(sentinel[16 : 16 + length]) == got, f"readinto({length}, {offset}) != pread"
        arr = np.full(length, 0x5A, dtype=np.uint8)
        dev.readinto(arr, offset)
        assert arr.tobytes() == got, "readinto into a numpy array differs"
        if length % 8 == 0:
            words = array.array("Q", bytes(length))
            dev.readinto(words, offset)
            assert words.tobytes() == got, "readinto into an array('Q') differs"
        # Splitting a read at odd places gives the same bytes.
        if length > 3:
            cut = sorted({rnd.randrange(1, length) for _ in range(2)})
            pieces = [0, *cut, length]
            joined = b"".join(dev.pread(b - a, offset + a) for a, b in itertools.pairwise(pieces))
            assert joined == got, f"pieces of the read at {offset} differ from the whole"


# -- extents ------------------------------------------------------------------------------------


def check_extent_list(dev: BlockDevice, exts: list[Extent], offset: int, length: int) -> None:
    where = f"extents({length}, {offset})"
    assert exts, f"{where} returned no extent"
    assert exts[0].start == offset, f"{where}: first extent starts at {exts[0].start}"
    for a, b in itertools.pairwise(exts):
        assert a.end == b.start, f"{where}: {a} and {b} are not contiguous"
        assert (a.zero, a.hole) != (b.zero, b.hole), f"{where}: {a} and {b} are of one kind but not merged"
    for e in exts:
        assert isinstance(e, Extent), f"{where}: {e!r} is not an Extent"
        assert e.length > 0, f"{where}: empty extent {e}"
        assert not e.hole or e.zero, f"{where}: {e} is a hole that does not read as zero"
    assert exts[-1].end <= dev.size, f"{where}: last extent {exts[-1]} runs past the size {dev.size}"
    assert exts[-1].end >= offset + length, f"{where}: extents stop at {exts[-1].end}, before the range ends"


def check_extents(dev: BlockDevice, *, seed: int = 0, whole: bool = True, max_extents: int = 200_000,
                  zero_samples: int = 16) -> list[Extent]:
    """Check extents of the whole device (when ``whole``) and of sampled ranges; return the whole list."""
    rnd = random.Random(seed)
    everything: list[Extent] = []
    if dev.size == 0:
        return everything
    if whole:
        everything = list(itertools.islice(dev.extents(dev.size, 0), max_extents))
        if len(everything) < max_extents:
            check_extent_list(dev, everything, 0, dev.size)
            assert everything[-1].end == dev.size
    for offset, length in sample_ranges(dev.size, rnd, 12, max_len=max(1, dev.size)):
        if length == 0:
            continue
        exts = list(itertools.islice(dev.extents(length, offset), max_extents))
        if len(exts) < max_extents:
            check_extent_list(dev, exts, offset, length)
        one = list(dev.extents(length, offset, req_one=True))
        assert len(one) == 1, f"req_one gave {len(one)} extents"
        assert one[0].start == offset and one[0].length > 0 and one[0].end <= dev.size
        assert (one[0].zero, one[0].hole) == (exts[0].zero, exts[0].hole), "req_one disagrees with the full list"
        if whole and len(everything) < max_extents:
            # A sub-range query agrees with the whole-device map.
            starts = [w.start for w in everything]
            for e in exts:
                w = everything[bisect.bisect_right(starts, e.start) - 1]
                assert w.start <= e.start < w.end
                assert (w.zero, w.hole) == (e.zero, e.hole), f"{e} disagrees with {w} of the whole map"
    # Extents that say zero must read as zeroes (sampled, at most MAX_READ of each).
    zeros = [e for e in everything if e.zero]
    for e in rnd.sample(zeros, min(zero_samples, len(zeros))):
        n = min(e.length, MAX_READ)
        for off in {e.start, e.end - n}:
            assert not any(dev.pread(n, off)), f"{e} says zero but reads non-zero at {off}"
    return everything


# -- writes ---------------------------------------------------------------------------------------


def check_readonly(dev: BlockDevice) -> None:
    assert dev.readonly
    n = min(dev.size, 512)
    before = dev.pread(n, 0)
    with pytest.raises(ReadOnlyError):
        dev.pwrite(b"\x01" * n, 0)
    with pytest.raises(ReadOnlyError):
        dev.zero(n, 0)
    with pytest.raises(ReadOnlyError):
        dev.trim(n, 0)
    assert dev.pread(n, 0) == before, "a refused write changed the device"


def check_writable(dev: BlockDevice, *, seed: int = 0, rounds: int = 12) -> None:
    """pwrite/zero/trim against a whole-device model (the device must be small enough to read whole)."""
    assert not dev.readonly
    rnd = random.Random(seed)
    size = dev.size
    model = bytearray(dev.pread(size, 0))
    for _ in range(rounds):
        length = rnd.randrange(1, min(size, 3 * 65536) + 1)
        offset = rnd.randrange(0, size - length + 1)
        op = rnd.choice(["write", "write", "zero", "zero-trim", "fua"])
        if op in ("write", "fua"):
            data = rnd.randbytes(length)
            dev.pwrite(data, offset, fua=(op == "fua"))
            model[offset : offset + length] = data
        else:
            dev.zero(length, offset, may_trim=(op == "zero-trim"))
            model[offset : offset + length] = bytes(length)
            assert not any(dev.pread(length, offset)), f"zero({length}, {offset}) does not read back as zeroes"
    dev.flush()
    got = dev.pread(size, 0)
    assert got == bytes(model), "device content differs from the model after writes and zeroes"
    with pytest.raises(OutOfRangeError):
        dev.pwrite(b"x", size)
    with pytest.raises(OutOfRangeError):
        dev.zero(2, size - 1)
    with pytest.raises(OutOfRangeError):
        dev.pwrite(b"x", -1)


# -- handles --------------------------------------------------------------------------------------


def check_clone(dev: BlockDevice, *, seed: int = 0) -> None:
    """A clone reads the same bytes and extents, and closing it leaves the original usable."""
    rnd = random.Random(seed)
    clone = dev.clone()
    try:
        assert clone is not dev and clone.size == dev.size
        for offset, length in sample_ranges(dev.size, rnd, 6):
            assert clone.pread(length, offset) == dev.pread(length, offset), f"clone differs at {offset}"
        if dev.size:
            n = min(dev.size, 1 << 30)
            assert list(itertools.islice(clone.extents(n, 0), 1000)) == list(itertools.islice(dev.extents(n, 0), 1000))
    finally:
        clone.close()
    if dev.size:
        dev.pread(1, 0)  # the original still works


def check_close(dev: BlockDevice) -> None:
    dev.close()
    assert dev.closed
    with pytest.raises(ClosedDeviceError):
        dev.pread(1, 0)
    with pytest.raises(ClosedDeviceError):
        dev.readinto(bytearray(1), 0)
    with pytest.raises(ClosedDeviceError):
        list(dev.extents(1, 0))
    with pytest.raises(ClosedDeviceError):
        dev.flush()
    with pytest.raises(ImageFormatError):  # ClosedDeviceError, or a device that cannot clone at all
        dev.clone()
    dev.close()  # twice is fine


def check_device(dev: BlockDevice, expected: Oracle = None, *, seed: int = 0, clone: bool = True,
                 whole_extents: bool = True) -> list[Extent]:
    """Every read-side check (plus read-only refusal when the device is read-only); closes ``dev``.

    Returns the whole-device extent list (for further comparison with a peer tool's map).
    """
    try:
        assert dev.size >= 0 and isinstance(dev.size, int)
        assert len(dev.block_size) == 3 and dev.block_size[0] <= dev.block_size[1] <= dev.block_size[2]
        if dev.size:
            check_out_of_range(dev)
            check_reads(dev, expected, seed=seed)
            exts = check_extents(dev, seed=seed, whole=whole_extents)
            if dev.readonly:
                check_readonly(dev)
            if clone:
                check_clone(dev, seed=seed)
        else:
            exts = []
    except BaseException:
        dev.close()
        raise
    check_close(dev)
    return exts


__all__ = [
    "check_device",
    "check_writable",
    "check_reads",
    "check_extents",
    "check_extent_list",
    "check_out_of_range",
    "check_readonly",
    "check_clone",
    "check_close",
    "sample_ranges",
]
