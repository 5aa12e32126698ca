"""CRC combine algebra in GF(2) for reflected CRCs (CRC-32 of gzip, CRC-64/XZ of xz).

A reflected CRC register is a polynomial over GF(2) stored with x^0 in the top
bit.  Processing a message M of n bytes from register value r gives
``r * x^(8n) + L(M)`` (mod P), where ``L`` is linear in the message bits.  The
standard CRCs start from an all-ones register and invert the result, which
makes ``crc(M)`` an *affine* function of M for a fixed length.  Two identities
follow, and they are all gzip-patch needs:

* combine: ``crc(A || B) = crc(A) * x^(8|B|) + crc(B)``  (zlib's crc32_combine)
* patch:   for equal-length messages M and M' that differ only in bytes
  ``[u, u+d)`` with difference ``D = old XOR new``:
  ``crc(M') = crc(M) + L(D) * x^(8 * (len(M) - u - d))``

``x^(8n) mod P`` is computed by square-and-multiply from the table
``x^(2^k) mod P``, so both cost O(log n) polynomial products of ``width``
steps each: microseconds, independent of the file size.
"""

from __future__ import annotations

import zlib

import crcmod

__all__ = ["CrcAlgebra", "CRC32", "CRC64", "crc32_combine", "crc64"]


class CrcAlgebra:
    """Arithmetic modulo a reflected CRC polynomial of ``width`` bits.

    ``poly`` is the reflected polynomial without its x^width term (0xEDB88320
    for CRC-32).  ``func(data, crc=0) -> crc`` computes the standard CRC with
    an all-ones initial register and final inversion (zlib.crc32 semantics).
    """

    def __init__(self, name: str, width: int, poly: int, func):
        self.name = name
        self.width = width
        self.poly = poly
        self.mask = (1 << width) - 1
        self.top = 1 << (width - 1)
        self.func = func
        # _x2n[k] = x^(2^k) mod P; x^1 is the second-highest bit in reflected form.
        self._x2n = [self.top >> 1]
        for _ in range(1, 64 + 3):
            prev = self._x2n[-1]
            self._x2n.append(self.multmodp(prev, prev))

    def multmodp(self, a: int, b: int) -> int:
        """a * b mod P (reflected representation)."""
        m = self.top
        p = 0
        poly = self.poly
        while a:
            if a & m:
                p ^= b
                a ^= m
            m >>= 1
            b = (b >> 1) ^ poly if b & 1 else b >> 1
        return p

    def xpow8n(self, n: int) -> int:
        """x^(8n) mod P, for any n >= 0 (square-and-multiply over the x^(2^k) table)."""
        if n < 0:
            raise ValueError("negative length")
        p = self.top  # x^0
        k = 3  # 8n = n << 3
        while n:
            if k >= len(self._x2n):
                prev = self._x2n[-1]
                self._x2n.append(self.multmodp(prev, prev))
            if n & 1:
                p = self.multmodp(self._x2n[k], p)
            n >>= 1
            k += 1
        return p

    def shift(self, value: int, nbytes: int) -> int:
        """value * x^(8 nbytes) mod P: the effect of ``nbytes`` zero bytes on a pure-linear term."""
        if nbytes == 0 or value == 0:
            return value
        return self.multmodp(self.xpow8n(nbytes), value)

    def combine(self, crc1: int, crc2: int, len2: int) -> int:
        """CRC of A||B from crc(A), crc(B) and len(B)."""
        return self.shift(crc1, len2) ^ crc2

    def linear(self, data) -> int:
        """L(data): the CRC register contribution of ``data`` alone (zero initial register, no inversion)."""
        return self.func(data, self.mask) ^ self.mask

    def patch_delta(self, old, new, tail: int) -> int:
        """XOR to apply to a message's CRC when ``old`` becomes ``new`` with ``tail`` bytes after them."""
        if len(old) != len(new):
            raise ValueError("old and new must have the same length")
        if not len(old):
            return 0
        diff = (int.from_bytes(old, "little") ^ int.from_bytes(new, "little")).to_bytes(len(old), "little")
        return self.shift(self.linear(diff), tail)

    def __repr__(self) -> str:
        return f"<CrcAlgebra {self.name}>"


def _crc32(data, crc: int = 0) -> int:
    return zlib.crc32(data, crc)


#: CRC-64/XZ (ECMA-182 polynomial, reflected, init and xorout all ones): xz-file-format.txt 3.4.
crc64 = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, rev=True, xorOut=0xFFFFFFFFFFFFFFFF)

#: CRC-32 of gzip (RFC 1952 section 8) and of xz checks (ISO 3309 / ITU-T V.42 polynomial).
CRC32 = CrcAlgebra("crc32", 32, 0xEDB88320, _crc32)
CRC64 = CrcAlgebra("crc64", 64, 0xC96C5795D7870F42, lambda data, crc=0: crc64(bytes(data), crc))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib's crc32_combine(): CRC-32 of A||B from the CRCs of A and B and len(B)."""
    return CRC32.combine(crc1, crc2, len2)
