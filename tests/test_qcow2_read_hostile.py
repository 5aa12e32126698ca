"""Hostile and damaged qcow2 images: our own exceptions naming the problem, never a hang, a huge
allocation or wrong data.  Images are made by qemu-img/qemu-io and then damaged at known places."""

from __future__ import annotations

import struct
import time
import warnings
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qcow2_oracle import qemu_raw, sh

import imageformats
from imageformats.block import FileDevice, MemoryDevice
from imageformats.errors import (
    CorruptImageError,
    DeviceIOError,
    ImageFormatError,
    ReadOnlyError,
    SecretRequiredError,
    UnsupportedFeatureError,
)
from imageformats.qcow2 import Qcow2Device
from imageformats.testing.evil import EvilDevice

MiB = 1 << 20


def make(tmp_path, name="h.qcow2", size=2 * MiB, writes=("write -P 0x11 0 128k", "write -P 0x22 1M 64k"), opts=()):
    img = tmp_path / name
    sh("qemu-img", "create", "-f", "qcow2", *opts, img, size)
    if writes:
        args = []
        for w in writes:
            args += ["-c", w]
        sh("qemu-io", "-f", "qcow2", *args, img)
    return img


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def u64(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def l1_offset(path):
    return u64(path, 40)


def read_all(path, **opts):
    with imageformats.open(str(path), **opts) as dev:
        return dev.pread(dev.size, 0)


def test_truncated_header(tmp_path):
    img = make(tmp_path)
    data = img.read_bytes()
    for n in (10, 71, 100, 300):
        (tmp_path / "t.qcow2").write_bytes(data[:n])
        with pytest.raises(CorruptImageError):
            Qcow2Device(FileDevice(str(tmp_path / "t.qcow2")))


def test_truncated_tables(tmp_path):
    img = make(tmp_path)
    data = img.read_bytes()
    # cut inside the L2 table / data clusters
    for n in (l1_offset(img) + 8, l1_offset(img) + 65536 + 100, len(data) - 65536):
        path = tmp_path / f"t{n}.qcow2"
        path.write_bytes(data[:n])
        with pytest.raises(CorruptImageError):
            read_all(path)


def test_l1_points_outside(tmp_path):
    img = make(tmp_path)
    patch(img, l1_offset(img), struct.pack(">Q", (1 << 62) | (1 << 40)))
    with pytest.raises(CorruptImageError, match="L1 entry 0"):
        read_all(img)


def test_l2_entry_outside_and_unaligned(tmp_path):
    img = make(tmp_path)
    l2 = u64(img, l1_offset(img)) & 0x00FFFFFFFFFFFE00
    patch(img, l2, struct.pack(">Q", (1 << 63) | (1 << 45)))
    with pytest.raises(CorruptImageError, match="outside"):
        read_all(img)
    patch(img, l2, struct.pack(">Q", (1 << 63) | 0x10200))
    with pytest.raises(CorruptImageError, match="unaligned"):
        read_all(img)


def test_l1_table_too_large_or_outside(tmp_path):
    img = make(tmp_path)
    patch(img, 36, struct.pack(">I", 1 << 30))  # l1_size
    with pytest.raises(CorruptImageError, match="L1"):
        read_all(img)
    img = make(tmp_path, "b.qcow2")
    patch(img, 40, struct.pack(">Q", 1 << 50))  # l1_table_offset
    with pytest.raises(CorruptImageError, match="L1"):
        read_all(img)


def test_header_fields(tmp_path):
    cases = [
        (4, struct.pack(">I", 4), UnsupportedFeatureError, "version"),
        (20, struct.pack(">I", 30), CorruptImageError, "cluster_bits"),
        (96, struct.pack(">I", 7), CorruptImageError, "refcount_order"),
        (100, struct.pack(">I", 7), CorruptImageError, "header_length"),
        (48, struct.pack(">Q", 1 << 45), CorruptImageError, "refcount table"),
        (32, struct.pack(">I", 9), UnsupportedFeatureError, "crypt_method"),
        (16, struct.pack(">I", 5000), CorruptImageError, "backing file"),
    ]
    for i, (off, data, exc, match) in enumerate(cases):
        img = make(tmp_path, f"h{i}.qcow2", writes=())
        if off == 16:
            patch(img, 8, struct.pack(">Q", 0x1000))
        patch(img, off, data)
        with pytest.raises(exc, match=match):
            read_all(img)


def test_unknown_incompatible_bit_named(tmp_path):
    img = make(tmp_path)
    data = img.read_bytes()[:65536]
    patch(img, 72, struct.pack(">Q", 1 << 5))
    with pytest.raises(UnsupportedFeatureError, match="bit 5"):
        read_all(img)
    # the feature name table names it: retarget qemu's entry for incompatible bit 0
    pos = data.index(b"\x00\x00dirty bit")
    patch(img, pos, b"\x00\x05frobnicated clusters".ljust(48, b"\0"))
    with pytest.raises(UnsupportedFeatureError, match=r"bit 5 \(frobnicated clusters\)"):
        read_all(img)


def test_dirty_and_corrupt_flags(tmp_path):
    img = make(tmp_path)
    ref = qemu_raw(img, tmp_path)
    patch(img, 72, struct.pack(">Q", 1))  # dirty
    assert read_all(img) == ref
    with pytest.raises(ReadOnlyError, match="dirty"):
        imageformats.open(str(img), writable=True)
    patch(img, 72, struct.pack(">Q", 2))  # corrupt
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with imageformats.open(str(img), writable=True) as dev:
            assert dev.readonly
            assert dev.pread(len(ref), 0) == ref
    assert any("corrupt" in str(w.message) for w in caught)
    with imageformats.open(str(img)) as dev:
        assert dev.layer_info()["corrupt"] is True


def test_compressed_garbage_and_bomb(tmp_path):
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"hello qcow2 " * 100_000)
    img = tmp_path / "c.qcow2"
    sh("qemu-img", "convert", "-c", "-O", "qcow2", raw, img)
    l2 = u64(img, l1_offset(img)) & 0x00FFFFFFFFFFFE00
    entry = u64(img, l2)
    assert entry & (1 << 62)
    host = entry & ((1 << 54) - 1)
    # a deflate bomb: 64 MiB of zeroes in ~64 KiB; the entry claims the maximum sector count
    comp = zlib.compressobj(9, zlib.DEFLATED, -12)
    bomb = comp.compress(bytes(64 * MiB)) + comp.flush()
    end = img.stat().st_size
    patch(img, end, bomb)
    patch(img, l2, struct.pack(">Q", (1 << 62) | (0xFF << 54) | end))
    t0 = time.monotonic()
    with imageformats.open(str(img)) as dev:
        assert dev.pread(65536, 0) == bytes(65536)  # decompression stops at one cluster
    assert time.monotonic() - t0 < 2
    # garbage in the compressed stream
    patch(img, l2, struct.pack(">Q", entry))
    patch(img, host, b"\xff" * 64)
    with pytest.raises(CorruptImageError, match="compressed"):
        read_all(img)


def test_backing_loop_and_depth(tmp_path):
    for name, other in (("a.qcow2", "b.qcow2"), ("b.qcow2", "a.qcow2")):
        sh("qemu-img", "create", "-f", "qcow2", "-u", "-b", other, "-F", "qcow2", tmp_path / name, MiB)
    with pytest.raises(CorruptImageError, match="loop"):
        read_all(tmp_path / "a.qcow2")
    sh("qemu-img", "create", "-f", "qcow2", "-u", "-b", "self.qcow2", "-F", "qcow2", tmp_path / "self.qcow2", MiB)
    with pytest.raises(CorruptImageError, match="loop"):
        read_all(tmp_path / "self.qcow2")
    prev = None
    for i in range(40):
        args = ["-u", "-b", prev, "-F", "qcow2"] if prev else []
        sh("qemu-img", "create", "-f", "qcow2", *args, tmp_path / f"d{i}.qcow2", MiB)
        prev = f"d{i}.qcow2"
    with pytest.raises(CorruptImageError, match="deeper"):
        read_all(tmp_path / "d39.qcow2")


def test_missing_backing_and_data_file(tmp_path):
    sh("qemu-img", "create", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", tmp_path / "m.qcow2", MiB)
    with pytest.raises(ImageFormatError, match="gone.qcow2"):
        read_all(tmp_path / "m.qcow2")


def test_eio_from_below(tmp_path):
    img = make(tmp_path)
    dev = Qcow2Device(EvilDevice(FileDevice(str(img)), eio=[(img.stat().st_size - 65536, 65536)]))
    with pytest.raises(DeviceIOError):
        dev.pread(dev.size, 0)


def test_legacy_aes(tmp_path):
    img = tmp_path / "aes.qcow2"
    obj = ["--object", f"secret,id=s0,file={tmp_path / 'pw'}"]
    (tmp_path / "pw").write_bytes(b"legacy-pass")
    sh("qemu-img", "create", "-f", "qcow2", *obj, "-o", "encrypt.format=aes,encrypt.key-secret=s0", img, MiB)
    sh("qemu-io", *obj, "--image-opts", "-c", "write -P 0x5c 4096 70000",
       f"driver=qcow2,file.filename={img},encrypt.key-secret=s0")
    ref = qemu_raw(f"driver=qcow2,file.filename={img},encrypt.key-secret=s0", tmp_path, *obj, "--image-opts")
    assert read_all(img, passphrase=b"legacy-pass") == ref
    with pytest.raises(SecretRequiredError):
        read_all(img)
    with imageformats.open(str(img), passphrase=b"legacy-pass", writable=True) as dev:
        assert dev.readonly  # legacy AES is read-only


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 5 * 65536 - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_random_metadata_damage(tmp_path_factory, flips):
    """Random bytes in the header/L1/L2/refcount area: a clean error or some data, fast, bounded."""
    base = tmp_path_factory.getbasetemp() / "damage-src.qcow2"
    if not base.exists():
        sh("qemu-img", "create", "-f", "qcow2", "-o", "extended_l2=on", base, 4 * MiB)
        sh("qemu-io", "-c", "write -P 0x11 0 100k", "-c", "write -z 2M 64k", "-c", "snapshot_create s", base,
           check=False)
        sh("qemu-io", "-c", "write -P 0x12 3M 64k", base)
    data = bytearray(base.read_bytes())
    for off, val in flips:
        if off < len(data):
            data[off] = val
    t0 = time.monotonic()
    try:
        dev = Qcow2Device(MemoryDevice(bytes(data), writable=False), options={"backing_image": False})
        with dev:
            dev.pread(dev.size, 0)
            list(dev.extents(dev.size, 0))
    except ImageFormatError:
        pass
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_cosmic_rays_under_compressed_image(tmp_path, ctype):
    """Bit flips in every read (the evil layer): our own errors or (possibly wrong) data, never a
    crash of another kind, a hang or an unbounded allocation."""
    raw = tmp_path / "s.raw"
    raw.write_bytes(b"cosmic " * 300_000)
    img = tmp_path / "c.qcow2"
    sh("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype},cluster_size=16384", raw, img)
    outcomes = set()
    t0 = time.monotonic()
    for seed in range(25):
        try:
            with Qcow2Device(EvilDevice(FileDevice(str(img)), cosmic_rays=2e-5, seed=seed)) as dev:
                data = dev.pread(dev.size, 0)
                list(dev.extents(dev.size, 0))
                outcomes.add("same" if data == raw.read_bytes()[: len(data)] else "different")
        except ImageFormatError as exc:
            outcomes.add(type(exc).__name__)
    assert time.monotonic() - t0 < 30
    assert "CorruptImageError" in outcomes  # the damage was noticed at least once
