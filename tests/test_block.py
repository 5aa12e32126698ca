"""The block-device contract on every device type, a model-based test, FileDevice sparseness, copy()."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from contract import check_device, check_writable
from peers import qemu_extents_as_ours, qemu_img_map, run

from imageformats.block import (
    MiB,
    TiB,
    BlockDevice,
    Extent,
    FileDevice,
    MemoryDevice,
    SliceDevice,
    copy,
    is_zero,
    merge_extents,
    zero_runs,
)
from imageformats.errors import (
    DeviceIOError,
    InvalidArgumentError,
    NotFoundError,
    NotFastError,
    OutOfRangeError,
    ReadOnlyError,
)
from imageformats.testing.evil import EvilDevice
from imageformats.testing.sparse_random import SparseRandomDevice

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


def file_holes(path) -> list[tuple[int, int]]:
    """(start, end) of data runs of a file, straight from SEEK_DATA/SEEK_HOLE (the kernel is the oracle)."""
    out = []
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, SEEK_HOLE)
            out.append((data, hole))
            pos = hole
    finally:
        os.close(fd)
    return out


def make_file(path, size: int, pieces: list[tuple[int, bytes]]) -> bytes:
    """A sparse file of ``size`` bytes with ``pieces`` written with dd; returns its whole content."""
    run("truncate", "-s", size, path)
    for offset, data in pieces:
        run("dd", f"of={path}", "bs=4096", f"seek={offset}", "oflag=seek_bytes", "conv=notrunc", "status=none",
            input=data)
    with open(path, "rb") as f:
        return f.read()


# -- the contract on every device type ------------------------------------------------------------------

DEVICE_KINDS = ["file", "memory", "slice-file", "slice-memory", "sparse-random", "sparse-random-1T", "evil-none",
                "evil-slice"]


def build(kind: str, tmp_path, writable: bool):
    """(device, oracle bytes or callable)."""
    rnd = random.Random(kind)
    if kind in ("file", "slice-file"):
        path = tmp_path / "dev.raw"
        content = make_file(path, 3 * MiB + 4096, [(65536, rnd.randbytes(200_000)), (2 * MiB, rnd.randbytes(4096))])
        dev = FileDevice(path, writable=writable)
        if kind == "slice-file":
            return SliceDevice(dev, 12345, 2 * MiB + 17), content[12345 : 12345 + 2 * MiB + 17]
        return dev, content
    if kind in ("memory", "slice-memory", "evil-none", "evil-slice"):
        content = bytearray(2 * MiB)
        content[4096:70000] = rnd.randbytes(70000 - 4096)
        oracle = bytes(content)
        dev = MemoryDevice(content, writable=writable)
        if kind == "slice-memory":
            return SliceDevice(dev, 511, MiB + 3), oracle[511 : 511 + MiB + 3]
        if kind == "evil-none":
            return EvilDevice(dev, seed=5), oracle
        if kind == "evil-slice":
            return EvilDevice(SliceDevice(dev, 4096, MiB), seed=5, eio=[(MiB - 1, 0)]), oracle[4096 : 4096 + MiB]
        return dev, oracle
    if kind == "sparse-random":  # writable = a verifying target
        return SparseRandomDevice(64 * MiB + 100, seed=3, percent=20, runlength=256 * 1024, writable=writable), None
    if kind == "sparse-random-1T":
        return SparseRandomDevice(TiB, seed=4, percent=1, writable=writable), None
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", DEVICE_KINDS)
@pytest.mark.parametrize("writable", [False, True], ids=["ro", "rw"])
def test_contract(kind, writable, tmp_path):
    dev, oracle = build(kind, tmp_path, writable)
    assert dev.readonly == (not writable)
    check_device(dev, oracle)


WRITABLE_KINDS = ["file", "memory", "slice-file", "slice-memory", "evil-none", "evil-slice"]


@pytest.mark.parametrize("kind", WRITABLE_KINDS)
def test_writable_contract(kind, tmp_path):
    dev, oracle = build(kind, tmp_path, True)
    with dev:
        assert dev.pread(dev.size, 0) == oracle
        check_writable(dev, seed=len(kind))


def test_readonly_file_refuses_writes_and_keeps_bytes(tmp_path):
    path = tmp_path / "ro.raw"
    content = make_file(path, MiB, [(0, b"\x42" * 8192)])
    with FileDevice(path) as dev:
        for call in (lambda: dev.pwrite(b"x", 0), lambda: dev.zero(4096, 0), lambda: dev.trim(4096, 0)):
            with pytest.raises(ReadOnlyError):
                call()
    assert path.read_bytes() == content


def test_slice_rejects_windows_outside_the_backing():
    mem = MemoryDevice(1000)
    for offset, length in [(-1, 10), (0, 1001), (999, 2), (1001, None)]:
        with pytest.raises(OutOfRangeError):
            SliceDevice(mem, offset, length)


def test_missing_file_or_directory_is_our_error(tmp_path):
    with pytest.raises(NotFoundError, match="no such file"):
        FileDevice(tmp_path / "nope.raw")
    assert issubclass(NotFoundError, InvalidArgumentError)
    with pytest.raises(InvalidArgumentError, match="is a directory"):
        FileDevice(tmp_path)
    with pytest.raises(NotFoundError):
        FileDevice.create(tmp_path / "no" / "dir.raw", 10)


# -- model-based test against a bytearray -----------------------------------------------------------------

SIZE = 256 * 1024
offsets = st.one_of(st.integers(0, SIZE), st.integers(0, SIZE // 4096).map(lambda b: b * 4096))
lengths = st.one_of(st.integers(0, 70000), st.integers(0, 16).map(lambda b: b * 4096))


class DeviceModel(RuleBasedStateMachine):
    """Random pwrite/zero/trim/pread/extents against a bytearray model.

    After trim() a range's content is unspecified (NBD_CMD_TRIM), so the model
    marks it unknown until the next write or zero.
    """

    kind = "memory"

    @initialize()
    def setup(self):
        self.model = bytearray(SIZE)
        self.known = bytearray(b"\x01" * SIZE)
        self.tmpdir = tempfile.mkdtemp(prefix="imageformats-model-")
        if self.kind == "memory":
            self.dev = MemoryDevice(SIZE)
        elif self.kind == "file":
            self.dev = FileDevice.create(os.path.join(self.tmpdir, "f.raw"), SIZE)
        elif self.kind == "slice":
            inner = FileDevice.create(os.path.join(self.tmpdir, "f.raw"), SIZE + 3 * 4096 + 7)
            inner.pwrite(b"\xee" * 4096, 0)
            inner.pwrite(b"\xee" * (2 * 4096 + 7), SIZE + 4096)
            self.dev = SliceDevice(inner, 4096, SIZE)
        else:
            raise AssertionError(self.kind)

    def teardown(self):
        if hasattr(self, "dev"):
            self.dev.close()
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _fit(self, offset, length):
        offset = min(offset, SIZE)
        return offset, min(length, SIZE - offset)

    @rule(offset=offsets, length=lengths, byte=st.integers(1, 255), data=st.binary(min_size=0, max_size=64))
    def pwrite(self, offset, length, byte, data):
        offset, length = self._fit(offset, length)
        payload = (data or bytes([byte])) * (length // max(1, len(data or b"x")) + 1)
        payload = payload[:length]
        self.dev.pwrite(payload, offset)
        self.model[offset : offset + length] = payload
        self.known[offset : offset + length] = b"\x01" * length

    @rule(offset=offsets, length=lengths, may_trim=st.booleans())
    def zero(self, offset, length, may_trim):
        offset, length = self._fit(offset, length)
        self.dev.zero(length, offset, may_trim=may_trim)
        self.model[offset : offset + length] = bytes(length)
        self.known[offset : offset + length] = b"\x01" * length

    @rule(offset=offsets, length=lengths)
    def trim(self, offset, length):
        offset, length = self._fit(offset, length)
        self.dev.trim(length, offset)
        self.known[offset : offset + length] = bytes(length)

    @rule(offset=offsets, length=lengths)
    def pread(self, offset, length):
        offset, length = self._fit(offset, length)
        got = self.dev.pread(length, offset)
        for i in range(0, length):
            if self.known[offset + i]:
                assert got[i] == self.model[offset + i], f"byte at {offset + i}"

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, SIZE))
    def extents(self, offset, length):
        length = min(length, SIZE - offset)
        exts = list(self.dev.extents(length, offset))
        assert exts[0].start == offset and exts[-1].end >= offset + length and exts[-1].end <= SIZE
        for a, b in zip(exts, exts[1:]):
            assert a.end == b.start and (a.zero, a.hole) != (b.zero, b.hole)
        for e in exts:
            if e.zero:
                lo, hi = e.start, e.end
                for i in range(lo, hi):
                    if self.known[i]:
                        assert self.model[i] == 0, f"{e} says zero but the model has data at {i}"

    @rule(offset=offsets)
    def out_of_range(self, offset):
        with pytest.raises(OutOfRangeError):
            self.dev.pread(SIZE - min(offset, SIZE) + 1, offset)

    @invariant()
    def size_is_fixed(self):
        if hasattr(self, "dev"):
            assert self.dev.size == SIZE

    @precondition(lambda self: hasattr(self, "dev"))
    @rule()
    def whole(self):
        got = self.dev.pread(SIZE, 0)
        for i in range(0, SIZE, 4096):
            known = self.known[i : i + 4096]
            if known == b"\x01" * len(known):
                assert got[i : i + 4096] == self.model[i : i + 4096], f"block at {i}"


MODEL_SETTINGS = settings(max_examples=15, stateful_step_count=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])


class MemoryModel(DeviceModel):
    kind = "memory"


class FileModel(DeviceModel):
    kind = "file"


class SliceModel(DeviceModel):
    kind = "slice"


TestMemoryModel = MemoryModel.TestCase
TestMemoryModel.settings = MODEL_SETTINGS
TestFileModel = FileModel.TestCase
TestFileModel.settings = MODEL_SETTINGS
TestSliceModel = SliceModel.TestCase
TestSliceModel.settings = MODEL_SETTINGS


# -- helpers: is_zero, zero_runs, merge_extents ---------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40000), st.integers(0, 255)), max_size=6), st.integers(0, 70000))
def test_is_zero_and_zero_runs(pokes, n):
    buf = bytearray(n)
    for pos, val in pokes:
        if pos < n:
            buf[pos] = val
    assert is_zero(buf) == (buf.count(0) == n)
    runs = zero_runs(buf, 4096)
    if n == 0:
        assert runs == []
        return
    assert runs[0][0] == 0 and sum(r[1] for r in runs) == n
    for (s1, l1, d1), (s2, _, d2) in zip(runs, runs[1:]):
        assert s1 + l1 == s2 and d1 != d2
    for start, length, is_data in runs:
        for g in range(start, start + length, 4096):
            block = buf[g : min(g + 4096, n)]
            assert (block.count(0) != len(block)) == is_data


def test_merge_extents():
    exts = [Extent(0, 10, True, True), Extent(10, 5, True, True), Extent(15, 0, False, False),
            Extent(15, 5, False, False), Extent(20, 5, True, False), Extent(25, 5, True, False)]
    assert list(merge_extents(exts)) == [Extent(0, 15, True, True), Extent(15, 5, False, False),
                                          Extent(20, 10, True, False)]


# -- FileDevice sparseness ---------------------------------------------------------------------------------


def test_file_zero_may_trim_punches_holes(tmp_path):
    path = tmp_path / "punch.raw"
    make_file(path, 4 * MiB, [(0, os.urandom(4 * MiB))])
    assert file_holes(path) == [(0, 4 * MiB)]
    blocks_before = os.stat(path).st_blocks
    with FileDevice(path, writable=True) as dev:
        early_clone = dev.clone()  # made while the file had no holes
        assert list(early_clone.extents(dev.size, 0)) == [Extent(0, 4 * MiB, False, False)]
        dev.zero(MiB, MiB, may_trim=True)
        dev.flush()
        assert file_holes(path) == [(0, MiB), (2 * MiB, 4 * MiB)], "the kernel sees a hole"
        assert list(dev.extents(dev.size, 0)) == [Extent(0, MiB, False, False), Extent(MiB, MiB, True, True),
                                                  Extent(2 * MiB, 2 * MiB, False, False)]
        # the clone learns of the hole too (the fully-allocated shortcut is shared)
        assert list(early_clone.extents(dev.size, 0)) == list(dev.extents(dev.size, 0))
        early_clone.close()
        assert dev.pread(MiB, MiB) == bytes(MiB)
        dev.trim(MiB, 3 * MiB)
        assert file_holes(path) == [(0, MiB), (2 * MiB, 3 * MiB)]
    assert os.stat(path).st_blocks <= blocks_before - 2 * MiB // 512
    # qemu-img agrees with our map.
    assert qemu_extents_as_ours(qemu_img_map(path, "raw")) == [
        (0, MiB, False, False), (MiB, MiB, True, True), (2 * MiB, MiB, False, False), (3 * MiB, MiB, True, True)]


def test_file_range_points_at_the_bytes(tmp_path):
    """file_range() names a descriptor and offset holding exactly the device's bytes (the
    NBD server sends them with sendfile); devices that transform bytes answer None."""
    path = tmp_path / "range.raw"
    data = os.urandom(3 * MiB)
    path.write_bytes(data)
    with FileDevice(path) as dev:
        fd, at = dev.file_range(4096, MiB + 512)
        assert os.pread(fd, 4096, at) == data[MiB + 512 : MiB + 4608]
        window = SliceDevice(dev.clone(), MiB, MiB)
        fd, at = window.file_range(1000, 24)
        assert os.pread(fd, 1000, at) == data[MiB + 24 : MiB + 1024]
        with pytest.raises(OutOfRangeError):
            window.file_range(2, MiB - 1)
        window.close()
    assert MemoryDevice(data).file_range(10, 0) is None


def test_file_fast_zero(tmp_path):
    path = tmp_path / "fast.raw"
    make_file(path, 2 * MiB, [(0, b"\x77" * (2 * MiB))])
    with FileDevice(path, writable=True) as dev:
        dev.zero(MiB + 4096, 4096, fast=True)
        got = dev.pread(2 * MiB, 0)
    assert got == b"\x77" * 4096 + bytes(MiB + 4096) + b"\x77" * (MiB - 8192)
    assert path.read_bytes() == got


class SlowZeroDevice(BlockDevice):
    """A device with only a write hook: zero() falls back to writing, so fast zero must refuse."""

    format_name = "slowzero"

    def __init__(self, size):
        self.data = bytearray(b"\x11" * size)
        self.size = size
        self.readonly = False
        self.writes = 0

    def _readinto(self, buf, offset):
        buf[:] = self.data[offset : offset + len(buf)]

    def _pwrite(self, buf, offset):
        self.writes += 1
        self.data[offset : offset + len(buf)] = buf


def test_fast_zero_refused_without_a_fast_path():
    dev = SlowZeroDevice(3 * MiB)
    with pytest.raises(NotFastError):
        dev.zero(MiB, 0, fast=True)
    assert dev.data == b"\x11" * (3 * MiB) and dev.writes == 0
    dev.zero(2 * MiB + 5, 7)  # the slow fallback writes zeroes
    assert dev.data == b"\x11" * 7 + bytes(2 * MiB + 5) + b"\x11" * (MiB - 12)
    assert MemoryDevice(10).can_fast_zero
    MemoryDevice(b"\x01" * 10).zero(10, 0, fast=True)


# -- copy ---------------------------------------------------------------------------------------------------


@pytest.fixture
def mixed_raw(tmp_path):
    """16 MiB: random data, an allocated run of zero bytes, holes, data at the very end."""
    path = tmp_path / "mixed.raw"
    rnd = random.Random(9)
    content = make_file(path, 16 * MiB, [
        (MiB, rnd.randbytes(3 * MiB)),
        (5 * MiB, bytes(2 * MiB)),                                  # allocated zeroes
        (8 * MiB, rnd.randbytes(65536) + bytes(65536) + rnd.randbytes(4096)),
        (16 * MiB - 4096, rnd.randbytes(4096)),
    ])
    return path, content


def test_copy_sparse_to_fresh_file(mixed_raw, tmp_path):
    src_path, content = mixed_raw
    dst_path = tmp_path / "out.raw"
    with FileDevice(src_path) as src, FileDevice.create(dst_path, src.size) as dst:
        stats = copy(src, dst, dst_is_zero=True)
    assert dst_path.read_bytes() == content
    run("cmp", src_path, dst_path)
    # Holes stay holes; the allocated zeroes and the zero 64 KiB inside data become holes too.
    data = [(0, MiB, True), (MiB, 3 * MiB, False), (4 * MiB, 4 * MiB, True), (8 * MiB, 65536, False),
            (8 * MiB + 65536, 65536, True), (8 * MiB + 131072, 4096, False),
            (8 * MiB + 135168, 8 * MiB - 135168 - 4096, True), (16 * MiB - 4096, 4096, False)]
    expected_map = [(s, n, z, z) for s, n, z in data]
    assert qemu_extents_as_ours(qemu_img_map(dst_path, "raw")) == expected_map
    assert file_holes(dst_path) == [(s, s + n) for s, n, z in data if not z]
    assert stats.data_bytes == 3 * MiB + 65536 + 4096 + 4096
    assert stats.data_bytes + stats.zero_bytes == 16 * MiB


def test_copy_over_old_data_punches_holes(mixed_raw, tmp_path):
    src_path, content = mixed_raw
    dst_path = tmp_path / "old.raw"
    make_file(dst_path, 16 * MiB + 4096, [(0, b"\xdd" * (16 * MiB + 4096))])
    with FileDevice(src_path) as src, FileDevice(dst_path, writable=True) as dst:
        copy(src, dst)  # not dst_is_zero: zero regions must be zeroed (punched)
    out = dst_path.read_bytes()
    assert out[: 16 * MiB] == content and out[16 * MiB :] == b"\xdd" * 4096
    holes = [e for e in qemu_extents_as_ours(qemu_img_map(dst_path, "raw")) if e[3]]
    assert (0, MiB, True, True) in holes and (4 * MiB, 4 * MiB, True, True) in holes


class CountingClone(MemoryDevice):
    clones = 0
    threads: set = set()

    def clone(self):
        type(self).clones += 1
        return CountingClone(self.data, writable=not self.readonly)

    def _readinto(self, buf, offset):
        type(self).threads.add(threading.get_ident())
        super()._readinto(buf, offset)


def test_copy_threads_equal_single_thread():
    rnd = random.Random(11)
    content = bytearray(24 * MiB)
    for _ in range(40):
        pos = rnd.randrange(0, 24 * MiB - 70000)
        content[pos : pos + 70000] = rnd.randbytes(70000)
    src = CountingClone(bytes(content), writable=False)
    outs = []
    for workers in (1, 2):
        CountingClone.clones, CountingClone.threads = 0, set()
        dst = MemoryDevice(b"\x99" * (24 * MiB))
        progress = []
        stats = copy(src, dst, lambda d, t: progress.append((d, t)), workers=workers, chunk=MiB)
        outs.append((bytes(dst.data), stats))
        assert progress[-1] == (24 * MiB, 24 * MiB) and [d for d, _ in progress] == sorted(d for d, _ in progress)
        if workers == 2:
            assert CountingClone.clones == 2 and threading.main_thread().ident not in CountingClone.threads
        else:
            assert CountingClone.clones == 0
    assert outs[0][0] == outs[1][0] == bytes(content)
    assert outs[0][1] == outs[1][1]


def test_copy_refuses_small_or_readonly_destination():
    src = MemoryDevice(4096)
    with pytest.raises(InvalidArgumentError):
        copy(src, MemoryDevice(4095))
    with pytest.raises(ReadOnlyError):
        copy(src, MemoryDevice(4096, writable=False))


@pytest.mark.parametrize("workers", [1, 2])
def test_copy_propagates_read_errors(workers):
    src = EvilDevice(MemoryDevice(b"\x01" * (12 * MiB), writable=False), eio=[(9 * MiB + 5, 1)])
    dst = MemoryDevice(12 * MiB)
    with pytest.raises(DeviceIOError, match=f"at offset {9 * MiB + 5}"):
        copy(src, dst, workers=workers, chunk=MiB)
    assert dst.data[: MiB] == b"\x01" * MiB  # pieces before the error were copied
    assert not src.closed and not dst.closed  # the caller's handles stay open (clones are closed)


def test_ordered_results_keeps_order_and_bounds_the_window():
    """Jobs that finish in reverse order still come out in submission order, and no more than
    ``window`` are submitted ahead of the one being consumed."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from imageformats.block import ordered_results

    started = []
    lock = threading.Lock()

    def job(i):
        with lock:
            started.append(i)
        time.sleep(0.002 * (8 - i % 8))  # later jobs finish first
        return i * i

    seen_ahead = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        out = []
        for value in ordered_results(pool, job, ((i,) for i in range(24)), 4):
            out.append(value)
            with lock:
                seen_ahead.append(len(started) - len(out))
    assert out == [i * i for i in range(24)]
    assert max(seen_ahead) <= 3
