"""CRC combine algebra (imageformats.gzip_partial.crc) against whole-message CRCs from zlib and crcmod."""

from __future__ import annotations

import ctypes
import ctypes.util
import zlib

import crcmod
from hypothesis import given, settings, strategies as st

from imageformats.gzip_partial.crc import CRC32, CRC64, crc32_combine, crc64

# Independent CRC-64/XZ (crcmod's pure table code, not our algebra); check value from the xz spec.
_crc64_ref = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, rev=True, xorOut=0xFFFFFFFFFFFFFFFF)
_libz = ctypes.CDLL(ctypes.util.find_library("z"))
_libz.crc32_combine64.argtypes = [ctypes.c_ulong, ctypes.c_ulong, ctypes.c_int64]
_libz.crc32_combine64.restype = ctypes.c_ulong


def test_check_values():
    assert zlib.crc32(b"123456789") == 0xCBF43926
    assert crc64(b"123456789") == 0x995DC9BBDF1939FA == _crc64_ref(b"123456789")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_crc32_combine_matches_whole_message(a, b):
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2000), st.binary(max_size=2000))
def test_crc64_combine_matches_whole_message(a, b):
    assert CRC64.combine(_crc64_ref(a), _crc64_ref(b), len(b)) == _crc64_ref(a + b)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=4000), st.data())
def test_patch_delta_matches_whole_message(msg, data):
    start = data.draw(st.integers(0, len(msg) - 1))
    length = data.draw(st.integers(0, len(msg) - start))
    new = data.draw(st.binary(min_size=length, max_size=length))
    patched = msg[:start] + new + msg[start + length:]
    tail = len(msg) - start - length
    old = msg[start:start + length]
    assert zlib.crc32(msg) ^ CRC32.patch_delta(old, new, tail) == zlib.crc32(patched)
    assert _crc64_ref(msg) ^ CRC64.patch_delta(old, new, tail) == _crc64_ref(patched)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 1 << 45))
def test_combine_huge_lengths_matches_libz(c1, c2, n):
    # zlib's own C crc32_combine64 as the oracle for lengths no test can hash (> 4 GiB, ISIZE wraps).
    assert crc32_combine(c1, c2, n) == _libz.crc32_combine64(c1, c2, n)
