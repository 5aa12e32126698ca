"""LUKS1 header parsing and hostile/corrupt images: clear errors, never a hang or a stray exception."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from imageformats import detect
from imageformats.block import FileDevice, MemoryDevice
from imageformats.errors import (
    CorruptImageError,
    ImageFormatError,
    SecretRequiredError,
    UnsupportedFeatureError,
    WrongPassphraseError,
)
from imageformats.luks1 import LuksDevice, LuksHeader, is_luks, read_header, unlock
from imageformats.luks1.header import HEADER_SIZE, PhdrStruct
from luks_tools import PASSPHRASE, cs_format, qemu_create, secret_file
from peers import run

MiB = 1 << 20


@pytest.fixture(scope="module")
def cs_image(tmp_path_factory):
    """A small cryptsetup-made LUKS1 volume (bytes) with slots 0 and 3 in use."""
    tmp = tmp_path_factory.mktemp("luks-header")
    pw = secret_file(tmp, PASSPHRASE)
    other = secret_file(tmp, b"other", "other")
    img = tmp / "cs.luks"
    cs_format(img, pw, "aes-cbc-essiv:sha256", 128, size=MiB + 64 * 1024)
    run("cryptsetup", "luksAddKey", "-q", "--pbkdf-force-iterations", "1000", "--key-file", pw, "--key-slot", "3",
        img, other)
    return img.read_bytes()


def _patch(image: bytes, offset: int, data: bytes) -> bytearray:
    out = bytearray(image)
    out[offset : offset + len(data)] = data
    return out


SLOT0 = 208  # LUKS1 spec, PHDR layout: key slots start at byte 208, 48 bytes each


def test_roundtrip_bytes(cs_image):
    hdr = LuksHeader.from_bytes(cs_image[:HEADER_SIZE])
    assert hdr.to_bytes() == cs_image[:HEADER_SIZE]
    assert is_luks(cs_image[:8])
    assert hdr.active_slots() == [0, 3]
    assert PhdrStruct.sizeof() == 592


def test_not_luks():
    with pytest.raises(CorruptImageError, match="not a LUKS"):
        read_header(MemoryDevice(bytes(4096)))
    with pytest.raises(CorruptImageError, match="not a LUKS"):
        LuksDevice(MemoryDevice(b"hello"), passphrase=b"x")


def test_luks2_is_refused_clearly(tmp_path):
    pw = secret_file(tmp_path, PASSPHRASE)
    img = tmp_path / "l2.img"
    with open(img, "wb") as f:
        f.truncate(20 * MiB)
    run("cryptsetup", "luksFormat", "--type", "luks2", "-q", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
        "--key-file", pw, img)
    with pytest.raises(UnsupportedFeatureError, match="LUKS2 is not supported"):
        LuksDevice(FileDevice(img), passphrase=PASSPHRASE)
    with pytest.raises(UnsupportedFeatureError, match="LUKS2 is not supported"):
        detect.open(str(img), passphrase=PASSPHRASE)


def test_truncated(cs_image):
    with pytest.raises(CorruptImageError, match="truncated"):
        read_header(MemoryDevice(cs_image[:300]))
    # header intact, key material cut off
    with pytest.raises(CorruptImageError, match="outside"):
        read_header(MemoryDevice(cs_image[:100_000]))


@pytest.mark.parametrize("what,offset,data,match", [
    ("bad version", 6, b"\x00\x07", "version 7"),
    ("key bytes 0", 108, struct.pack(">I", 0), "key size"),
    ("key bytes huge", 108, struct.pack(">I", 0xFFFFFFFF), "key size"),
    ("mk iter 0", 164, struct.pack(">I", 0), "iteration"),
    ("bad slot state", SLOT0 + 48 * 2, struct.pack(">I", 0x12345678), "invalid state"),
    ("stripes", SLOT0 + 44, struct.pack(">I", 3999), "stripes"),
    ("stripes huge", SLOT0 + 48 * 5 + 44, struct.pack(">I", 0xFFFFFFFF), "stripes"),
    ("material in header", SLOT0 + 40, struct.pack(">I", 0), "overlaps the header"),
    ("material past device", SLOT0 + 48 * 7 + 40, struct.pack(">I", 0x7FFFFFFF), "runs into the payload"),
    ("overlapping slots", SLOT0 + 48 + 40, struct.pack(">I", 9), "overlap"),
    ("payload before key material", 104, struct.pack(">I", 100), "runs into the payload"),
    ("non-ascii cipher", 8, b"\xffes", "ASCII"),
])
def test_inconsistent_headers(cs_image, what, offset, data, match):
    img = _patch(cs_image, offset, data)
    with pytest.raises(CorruptImageError if "version" not in what else UnsupportedFeatureError, match=match):
        LuksDevice(MemoryDevice(img), passphrase=PASSPHRASE)


def test_payload_outside_device(cs_image):
    img = _patch(cs_image, 104, struct.pack(">I", 100_000))
    with pytest.raises(CorruptImageError, match="payload offset"):
        LuksDevice(MemoryDevice(img), passphrase=PASSPHRASE)


def test_attached_payload_overlapping_the_header_is_refused(cs_image):
    """Payload offset 0 is for detached headers; on the header's own device writes would destroy it."""
    img = _patch(cs_image, 104, struct.pack(">I", 0))
    with pytest.raises(CorruptImageError, match="overlaps the header"):
        LuksDevice(MemoryDevice(img), passphrase=PASSPHRASE, writable=True)
    # the same header as a detached header is fine
    with LuksDevice(MemoryDevice(MiB), header=MemoryDevice(img), passphrase=PASSPHRASE) as dev:
        assert dev.size == MiB


def test_hostile_iteration_count_fails_fast(cs_image):
    img = _patch(cs_image, SLOT0 + 4, struct.pack(">I", 0xFFFFFFFF))
    with pytest.raises(CorruptImageError, match="iteration"):
        unlock(MemoryDevice(img), passphrase=PASSPHRASE, key_slot=0)
    # the other slot still opens
    assert unlock(MemoryDevice(img), passphrase=b"other", key_slot=3)[1]


def test_unsupported_cipher_and_hash_are_named(cs_image):
    img = _patch(cs_image, 8, b"serpent".ljust(32, b"\0"))
    with pytest.raises(UnsupportedFeatureError, match="serpent"):
        LuksDevice(MemoryDevice(img), passphrase=PASSPHRASE)
    img = _patch(cs_image, 72, b"whirlpool".ljust(32, b"\0"))
    with pytest.raises(UnsupportedFeatureError, match="whirlpool"):
        LuksDevice(MemoryDevice(img), passphrase=PASSPHRASE)
    img = _patch(cs_image, 72, b"md4sum".ljust(32, b"\0"))
    with pytest.raises(UnsupportedFeatureError, match="md4sum"):
        LuksDevice(MemoryDevice(img), passphrase=PASSPHRASE)
    img = _patch(cs_image, 40, b"cbc-benbi".ljust(32, b"\0"))
    with pytest.raises(UnsupportedFeatureError, match="benbi"):
        LuksDevice(MemoryDevice(img), passphrase=PASSPHRASE)


def test_qemu_twofish_volume_is_refused_by_name(tmp_path):
    """qemu can make twofish volumes; no maintained Python library here provides twofish."""
    pw = secret_file(tmp_path, PASSPHRASE)
    img = tmp_path / "tf.luks"
    qemu_create(img, pw, MiB, cipher_alg="twofish-128", cipher_mode="xts")
    with pytest.raises(UnsupportedFeatureError, match="twofish"):
        detect.open(str(img), passphrase=PASSPHRASE)


def test_damaged_key_material_gives_wrong_passphrase_not_garbage(cs_image):
    img = _patch(cs_image, 8 * 512 + 1000, b"\x00\x01\x02")  # inside slot 0's key material
    with pytest.raises(WrongPassphraseError):
        unlock(MemoryDevice(img), passphrase=PASSPHRASE)
    assert unlock(MemoryDevice(img), passphrase=b"other")[1]


def test_secret_required(cs_image, tmp_path):
    path = tmp_path / "x.luks"
    path.write_bytes(cs_image)
    with pytest.raises(SecretRequiredError):
        detect.open(str(path))
    with pytest.raises(SecretRequiredError):
        LuksDevice(MemoryDevice(cs_image))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, HEADER_SIZE - 1), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 2 * MiB)))
def test_fuzzed_headers_raise_only_our_errors(cs_image, edits, cut):
    img = bytearray(cs_image)
    for pos, val in edits:
        img[pos] = val
    if cut is not None:
        del img[cut:]
    # huge but plausible PBKDF2 counts are slow, not wrong (they are capped elsewhere): keep the run short
    if len(img) >= HEADER_SIZE:
        counts = [struct.unpack_from(">I", img, 164)[0]]
        counts += [struct.unpack_from(">I", img, SLOT0 + 48 * i + 4)[0] for i in range(8)]
        assume(max(counts) <= 200_000)
    try:
        with LuksDevice(MemoryDevice(img), passphrase=PASSPHRASE) as dev:
            dev.pread(min(4096, dev.size), 0)
    except ImageFormatError:
        pass
