"""A deterministic disk with the shape of a real VM disk, and a verifying copy target.

``SparseRandomDevice(size, seed=, percent=, runlength=)`` is islands of random
data in a sea of zeroes, like ``nbdkit sparse-random``: any size (1 TiB, 8 TiB...)
in O(1) memory, the same seed always gives the same bytes, and ``extents()``
reports the islands exactly (data) and the sea as holes.

Layout.  The device is cut into fixed-size *regions* of ``runlength * 100 /
percent`` bytes; region ``i`` holds one island whose length (mean
``runlength``, spread +-50%) and start inside the region come from a keyed
hash of ``(seed, i)``.  So placing an island is O(1) and walking the extents of
1 TiB is O(regions), never a table.  Island bytes are an AES-256-CTR keystream
keyed by the seed with the counter block ``offset // 16``: random access at
OpenSSL speed, and every byte is a pure function of ``(seed, offset)``.

As a write target (``writable=True``) nothing is stored: every ``pwrite`` must
equal the device's own content and every ``zero``/``trim`` must fall in the
zero sea, else :class:`MismatchError` names the first wrong offset.  So
``copy(SparseRandomDevice(1 TiB, seed=s), SparseRandomDevice(1 TiB, seed=s,
writable=True))`` checks a copy path end to end (``nbdkit sparse-random 1T
--run 'nbdcopy $uri $uri'``), with work proportional to the data.

It is also a URL source for every command that opens images::

    imageformats map 'sparse-random://1T?seed=7&percent=0.1&runlength=1M'
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..block import MiB, BlockDevice, Extent
from ..errors import ImageFormatError, InvalidArgumentError

#: Islands start and end on multiples of this many bytes.
GRANULE = 4096
#: Keystream is generated in pieces of at most this size (bounded memory per request).
_KS_CHUNK = 4 * MiB
_ZEROES = bytes(_KS_CHUNK)
_ZEROES_MV = memoryview(_ZEROES)
#: Largest device accepted (2**63 - 1 bytes, the NBD limit).
MAX_SIZE = (1 << 63) - 1


class MismatchError(ImageFormatError):
    """A write (or zero/trim) to a verifying SparseRandomDevice differs from its content."""


@dataclass
class VerifyStats:
    """What a verifying target has accepted; shared by a device and its clones."""

    written: int = 0  # bytes written and found equal to the content
    zeroed: int = 0  # bytes zeroed/trimmed, all inside the zero sea
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, written: int = 0, zeroed: int = 0) -> None:
        with self.lock:
            self.written += written
            self.zeroed += zeroed
            self.requests += 1


def _seed_bytes(seed: int | str | bytes) -> bytes:
    if isinstance(seed, bool) or not isinstance(seed, (int, str, bytes)):
        raise InvalidArgumentError(f"sparse-random seed must be an int, str or bytes, not {type(seed).__name__}")
    if isinstance(seed, int):
        return b"i" + str(seed).encode()
    if isinstance(seed, str):
        return b"s" + seed.encode()
    return b"b" + seed


class SparseRandomDevice(BlockDevice):
    """Islands of AES-CTR random data in a sea of zeroes; see the module docstring."""

    format_name = "sparse-random"
    can_trim = True
    can_zero = True
    can_fast_zero = True
    can_extents = True
    can_multi_conn = True

    def __init__(
        self,
        size: int,
        *,
        seed: int | str | bytes = 0,
        percent: float = 10.0,
        runlength: int = 16 * MiB,
        writable: bool = False,
        _stats: VerifyStats | None = None,
    ):
        if not isinstance(size, int) or size < 0 or size > MAX_SIZE:
            raise InvalidArgumentError(f"sparse-random size must be an integer in [0, 2**63), not {size!r}")
        try:
            percent = float(percent)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"sparse-random percent must be a number, not {percent!r}") from None
        if not 0.0 <= percent <= 100.0:
            raise InvalidArgumentError(f"sparse-random percent must be between 0 and 100, not {percent}")
        if not isinstance(runlength, int) or runlength < GRANULE:
            raise InvalidArgumentError(f"sparse-random runlength must be an integer >= {GRANULE}, not {runlength!r}")
        self.size = size
        self.seed = seed
        self.percent = percent
        self.readonly = not writable
        self.block_size = (1, GRANULE, 32 * MiB)
        seed_b = _seed_bytes(seed)
        self._hash_key = hashlib.blake2b(b"sparse-random layout\0" + seed_b, digest_size=32).digest()
        self._aes_key = hashlib.blake2b(b"sparse-random content\0" + seed_b, digest_size=32).digest()
        self.stats = _stats if _stats is not None else VerifyStats()
        # Runs are whole granules; one island per region, mean length = runlength.
        self.runlength = max(GRANULE, runlength // GRANULE * GRANULE)
        if percent >= 100.0:
            self.region = self.runlength
            self._spread = 0
        elif percent <= 0.0:
            self.region = 0
            self._spread = 0
        else:
            region = -(-int(self.runlength * 100.0 / percent) // GRANULE) * GRANULE
            self.region = max(region, self.runlength)
            # Island lengths are runlength * (1 +- spread), spread <= 50% and small
            # enough that the longest island still fits in its region.
            self._spread = min(self.runlength // 2, self.region - self.runlength) // GRANULE * GRANULE

    # -- layout -----------------------------------------------------------------------

    def island(self, index: int) -> tuple[int, int]:
        """``(start, end)`` of region ``index``'s island, clipped to the device (may be empty)."""
        r = self.region
        base = index * r
        if self.percent >= 100.0:
            return base, min(base + r, self.size)
        h = hashlib.blake2b(index.to_bytes(8, "little"), key=self._hash_key, digest_size=16).digest()
        u1 = int.from_bytes(h[:8], "little")
        u2 = int.from_bytes(h[8:], "little")
        spread_granules = self._spread // GRANULE
        length = self.runlength - self._spread + (u1 % (2 * spread_granules + 1)) * GRANULE
        slack_granules = (r - length) // GRANULE
        start = base + (u2 % (slack_granules + 1)) * GRANULE
        start = min(start, self.size)
        return start, min(start + length, self.size)

    def islands(self, offset: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Non-empty islands ``(start, end)`` that intersect ``[offset, end)``, ascending."""
        end = self.size if end is None else min(end, self.size)
        if self.region == 0 or offset >= end:
            return
        for i in range(offset // self.region, (end - 1) // self.region + 1):
            s, e = self.island(i)
            if s < e and e > offset and s < end:
                yield s, e

    def data_bytes(self) -> int:
        """Total bytes of island data (the exact work a sparse copy must do)."""
        return sum(e - s for s, e in self.islands())

    # -- content ----------------------------------------------------------------------

    def _keystream_into(self, out: memoryview, offset: int) -> None:
        """Fill ``out`` with the island content at ``offset`` (AES-CTR, counter = offset // 16)."""
        pos = 0
        n = len(out)
        aligned = offset - offset % 16
        skip = offset - aligned
        enc = Cipher(algorithms.AES(self._aes_key), modes.CTR((aligned // 16 % (1 << 128)).to_bytes(16, "big"))).encryptor()
        if skip:
            head = enc.update(_ZEROES[:16])[skip:]
            take = min(len(head), n)
            out[:take] = head[:take]
            pos = take
        while pos < n:
            k = min(_KS_CHUNK, n - pos)
            # update_into needs room for a whole extra block: go through a bytes result.
            out[pos : pos + k] = enc.update(_ZEROES_MV[:k])
            pos += k

    def _readinto(self, buf: memoryview, offset: int) -> None:
        end = offset + len(buf)
        pos = offset
        for s, e in self.islands(offset, end):
            s, e = max(s, offset), min(e, end)
            if s > pos:
                _fill_zero(buf, pos - offset, s - pos)
            self._keystream_into(buf[s - offset : e - offset], s)
            pos = e
        if pos < end:
            _fill_zero(buf, pos - offset, end - pos)

    def _extents(self, length: int, offset: int) -> Iterator[Extent]:
        end = offset + length
        if self.region == 0:
            yield Extent(offset, self.size - offset, zero=True, hole=True)
            return
        pos = offset
        for s, e in self.islands(offset, end):
            if s > pos:
                yield Extent(pos, s - pos, zero=True, hole=True)
            start = max(s, pos)
            yield Extent(start, e - start, zero=False, hole=False)
            pos = e
        if pos < end:
            # The sea after the last island in range runs to the next island (or the end).
            nxt = next(self.islands(end, self.size), None)
            stop = self.size if nxt is None else nxt[0]
            yield Extent(pos, stop - pos, zero=True, hole=True)

    # -- verifying target ---------------------------------------------------------------

    def _pwrite(self, buf: memoryview, offset: int) -> None:
        end = offset + len(buf)
        pos = offset
        got = np.frombuffer(buf, dtype=np.uint8)
        for s, e in self.islands(offset, end):
            s, e = max(s, offset), min(e, end)
            if s > pos:
                self._check_sea(got, offset, pos, s, "write")
            expected = bytearray(e - s)
            self._keystream_into(memoryview(expected), s)
            part = got[s - offset : e - offset]
            if part.tobytes() != expected:
                exp = np.frombuffer(expected, dtype=np.uint8)
                i = int(np.argmax(part != exp))
                raise MismatchError(
                    f"sparse-random: write of {len(buf)} bytes at {offset} differs from the content at offset "
                    f"{s + i} (expected 0x{int(exp[i]):02x}, got 0x{int(part[i]):02x})"
                )
            pos = e
        if pos < end:
            self._check_sea(got, offset, pos, end, "write")
        self.stats.add(written=len(buf))

    @staticmethod
    def _check_sea(got: np.ndarray, offset: int, start: int, end: int, what: str) -> None:
        part = got[start - offset : end - offset]
        if part.any():
            i = int(np.argmax(part != 0))
            raise MismatchError(
                f"sparse-random: {what} at {offset} puts 0x{int(part[i]):02x} at offset {start + i}, "
                f"which is in the zero sea"
            )

    def _check_zero(self, length: int, offset: int, what: str) -> None:
        for s, e in self.islands(offset, offset + length):
            first = max(s, offset)
            raise MismatchError(
                f"sparse-random: {what} of [{offset}, {offset + length}) covers data at offset {first} "
                f"(island [{s}, {e}))"
            )
        self.stats.add(zeroed=length)

    def _zero(self, length: int, offset: int, may_trim: bool, fast: bool) -> None:
        self._check_zero(length, offset, "zero")

    def _trim(self, length: int, offset: int) -> None:
        self._check_zero(length, offset, "trim")

    # -- handles --------------------------------------------------------------------------

    def clone(self) -> "SparseRandomDevice":
        self._check_open()
        return SparseRandomDevice(
            self.size, seed=self.seed, percent=self.percent, runlength=self.runlength,
            writable=not self.readonly, _stats=self.stats,
        )

    def layer_info(self) -> dict[str, Any]:
        return {
            "seed": self.seed if not isinstance(self.seed, bytes) else self.seed.hex(),
            "percent": self.percent,
            "runlength": self.runlength,
            "region-size": self.region,
            "verifying-target": not self.readonly,
        }


def _fill_zero(buf: memoryview, start: int, length: int) -> None:
    pos = 0
    while pos < length:
        k = min(_KS_CHUNK, length - pos)
        buf[start + pos : start + pos + k] = _ZEROES_MV[:k]
        pos += k


# -- URL source: sparse-random://SIZE?seed=N&percent=P&runlength=R&verify=1 ------------------


def open_url(url: str, options: dict[str, Any] | None = None) -> SparseRandomDevice:
    """``sparse-random://1T?seed=7&percent=1&runlength=1M`` (``verify=1``: a verifying target)."""
    from ..cli.common import parse_size  # sizes with qemu-img suffixes

    parts = urlsplit(url)
    if parts.scheme != "sparse-random" or not parts.netloc or parts.path not in ("", "/"):
        raise InvalidArgumentError(f"expected sparse-random://SIZE?seed=N&percent=P&runlength=R, not {url!r}")
    size = parse_size(parts.netloc)
    kwargs: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key == "seed":
            kwargs["seed"] = int(value) if value.lstrip("-").isdigit() else value
        elif key == "percent":
            kwargs["percent"] = value
        elif key == "runlength":
            kwargs["runlength"] = parse_size(value)
        elif key == "verify":
            kwargs["writable"] = value.lower() in ("1", "true", "yes", "on")
        else:
            raise InvalidArgumentError(f"unknown sparse-random parameter {key!r} (known: seed, percent, runlength, verify)")
    return SparseRandomDevice(size, **kwargs)


def _register() -> None:
    from ..detect import register_source

    register_source("sparse-random", open_url)


_register()

__all__ = ["SparseRandomDevice", "MismatchError", "VerifyStats", "GRANULE", "open_url"]
