"""Sequential decode to a raw file: copy()'s thread choice for read-ahead sources, FileDevice's
write sizes and the raw output's early writeback.  Oracles: `xz -dc` and the bytes we wrote."""

from __future__ import annotations

import os
import random

import pytest

from peers import run

import imageformats
from imageformats import raw
from imageformats.block import FileDevice, MemoryDevice, SliceDevice, copy
from imageformats.errors import ClosedDeviceError

MiB = 1 << 20


class CountingClone(MemoryDevice):
    """A memory source that counts its clones (copy() clones the source once per worker)."""

    clones = 0

    def clone(self):
        type(self).clones += 1
        return type(self)(self.data, writable=False)


class ReadsAhead(CountingClone):
    reads_ahead = True


def _content(size: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    out = bytearray(size)
    for _ in range(30):
        pos = rnd.randrange(0, size - 100_000)
        out[pos:pos + 100_000] = rnd.randbytes(100_000)
    return bytes(out)


@pytest.mark.parametrize("cls, clones", [(ReadsAhead, 0), (CountingClone, 2)])
def test_copy_uses_one_worker_for_a_source_that_reads_ahead(cls, clones):
    content = _content(12 * MiB, 3)
    cls.clones = 0
    dst = MemoryDevice(b"\x77" * len(content))
    copy(cls(content, writable=False), dst, chunk=MiB)
    assert cls.clones == clones  # no clone: copied on the calling thread alone
    assert bytes(dst.data) == content
    cls.clones = 0
    copy(cls(content, writable=False), MemoryDevice(len(content)), chunk=MiB, workers=2)
    assert cls.clones == 2  # an explicit worker count is obeyed


def test_a_slice_reads_ahead_when_its_backing_does():
    assert SliceDevice(ReadsAhead(MiB), 4096).reads_ahead
    assert not SliceDevice(MemoryDevice(MiB), 4096).reads_ahead


@pytest.fixture(scope="module")
def multiblock_xz(tmp_path_factory):
    """24 MiB of text, random bytes and zeroes in 1 MiB xz Blocks (xz -T2), and `xz -dc`'s output."""
    tmp = tmp_path_factory.mktemp("seqxz")
    rnd = random.Random(5)
    text = b"".join(b"line %d of the sequential copy test\n" % i for i in range(200_000))
    parts = [text[:5 * MiB], bytes(6 * MiB), rnd.randbytes(5 * MiB), bytes(3 * MiB), text[-5 * MiB:]]
    src = tmp / "disk.raw"
    src.write_bytes(b"".join(parts))
    run("xz", "-T2", "-3", "--block-size=1MiB", "-k", src)
    expected = run("xz", "-dc", f"{src}.xz").stdout
    assert len(expected) == 24 * MiB
    return tmp / "disk.raw.xz", expected


def test_xz_device_reads_ahead_and_copies_with_one_thread(multiblock_xz, tmp_path):
    xz_path, expected = multiblock_xz
    with imageformats.open(xz_path) as dev:
        assert dev.reads_ahead
        clones = []
        clone = dev.clone
        dev.clone = lambda: clones.append(1) or clone()  # copy() clones once per worker
        out = tmp_path / "out.raw"
        with FileDevice.create(out, dev.size) as dst:
            copy(dev, dst, dst_is_zero=True)
        assert clones == []
    assert out.read_bytes() == expected
    with imageformats.open(xz_path, readahead=0) as dev:
        assert not dev.reads_ahead  # read-ahead switched off: copy() goes back to two workers


def test_convert_to_raw_starts_writeback_while_copying(multiblock_xz, tmp_path, monkeypatch):
    xz_path, expected = multiblock_xz
    calls = []
    start = FileDevice.start_writeback
    monkeypatch.setattr(FileDevice, "start_writeback", lambda self: calls.append(self.path) or start(self))
    monkeypatch.setattr(raw, "WRITEBACK_EVERY", 4 * MiB)
    out = tmp_path / "out.raw"
    with imageformats.open(xz_path) as src:
        raw.write_raw(src, str(out), {})
    assert out.read_bytes() == expected
    # 24 MiB copied in 4 MiB pieces: one call per 4 MiB of progress, on the output only
    assert len(calls) == 6 and set(calls) == {str(out)}


def test_start_writeback_is_a_hint(tmp_path):
    path = tmp_path / "f.raw"
    data = random.Random(1).randbytes(3 * MiB)
    with FileDevice.create(path, len(data)) as dev:
        dev.pwrite(data, 0)
        dev.start_writeback()
        dev.flush()
    assert path.read_bytes() == data
    with FileDevice(path) as ro:
        ro.start_writeback()  # read-only: nothing to do, no error
    with pytest.raises(ClosedDeviceError):
        ro.start_writeback()


def test_file_writes_go_out_in_pieces_of_at_most_256k(tmp_path, monkeypatch):
    # Large pwrite()s make the kernel allocate large page-cache folios, slow in a VM (block.py).
    sizes = []
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, buf, off: sizes.append(len(buf)) or real(fd, buf, off))
    data = random.Random(2).randbytes(MiB + 4097)
    path = tmp_path / "f.raw"
    with FileDevice.create(path, len(data) + 10) as dev:
        dev.pwrite(data, 10)
    assert sizes == [256 * 1024] * 4 + [4097]
    assert path.read_bytes() == bytes(10) + data
