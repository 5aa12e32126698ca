"""The imageio-style backend adapter: stream I/O and cached whole-image extents.

Oracles: the file's bytes and ``qemu-img map`` of the file after every change.
"""

from __future__ import annotations

import os

import pytest

from imageformats.block import FileDevice
from imageformats.errors import ImageFormatError
from imageformats.nbd import imageio

from peers import qemu_extents_as_ours, qemu_img_map


def qemu_map(path):
    return qemu_extents_as_ours(qemu_img_map(path, "raw"))


def as_tuples(exts):
    return [(e.start, e.length, e.zero, e.hole) for e in exts]


def test_stream_io_and_cached_extents(tmp_path, sparse_raw):
    data = sparse_raw.read_bytes()
    with imageio.open(str(sparse_raw), "r+") as b:
        assert b.size() == len(data)
        b.seek(1 << 20)
        buf = bytearray(100_000)
        assert b.readinto(buf) == 100_000 and bytes(buf) == data[1 << 20 : (1 << 20) + 100_000]
        assert b.tell() == (1 << 20) + 100_000
        b.seek(-10, os.SEEK_END)
        assert b.readinto(buf) == 10 and bytes(buf[:10]) == data[-10:]
        assert b.readinto(buf) == 0

        assert as_tuples(b.extents()) == qemu_map(sparse_raw)
        assert as_tuples(b.extents("zero")) == qemu_map(sparse_raw)
        assert b.extents_computed == 1  # the second call came from the cache
        # range queries: clipped, binary-searched
        lo, hi = (1 << 20) + 4096, (8 << 20) + 4096
        want = [(max(s, lo), min(s + n, hi) - max(s, lo), z, h) for s, n, z, h in qemu_map(sparse_raw)
                if s < hi and s + n > lo]
        assert as_tuples(b.range_extents(lo, hi - lo)) == want
        assert b.extents_computed == 1

        # a write into a hole invalidates the cache
        b.seek(12 << 20)
        assert b.write(os.urandom(65536)) == 65536
        b.flush()
        assert as_tuples(b.extents()) == qemu_map(sparse_raw)
        assert b.extents_computed == 2
        # a write through a clone invalidates the shared cache too
        c = b.clone()
        c.seek(8 << 20)
        c.zero(1 << 20)
        c.flush()
        assert as_tuples(b.extents()) == qemu_map(sparse_raw)
        assert b.extents_computed == 3
        c.close()
        with pytest.raises(ImageFormatError):
            list(b.extents("dirty"))


def test_read_only_backend(sparse_raw):
    dev = FileDevice(sparse_raw)
    b = imageio.Backend(dev, "r")
    with pytest.raises(ImageFormatError):
        b.write(b"x")
    with pytest.raises(ImageFormatError):
        imageio.Backend(dev, "r+")
    ext = next(iter(b.extents()))
    assert ext.to_dict() == {"start": 0, "length": 1 << 20, "zero": True, "hole": True}
    b.close()
