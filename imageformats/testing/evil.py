"""Fault injection over any device, after nbdkit's evil and error filters.

``EvilDevice(backing, seed=, stuck_bits=, cosmic_rays=, eio=, block=)`` corrupts
what is *read* (writes reach the backing device unchanged, so it keeps the
correct data):

* **stuck bits** (persistent).  Each bit of the device is stuck with probability
  ``stuck_bits``, randomly high or low; a stuck bit reads as its stuck value
  (with probability ``stuck_probability``, default always).  The map is not
  stored anywhere: for block ``b`` (``block`` bytes, default 4096) the number of
  stuck bits (binomial) comes from a counter-based hash of ``(seed, b)`` and
  their positions and values from the same hash of ``(seed, b, j)``, computed
  with numpy for every block of a read at once.  So the same bit reads the
  same wrong value on every read, at any read alignment, through every clone
  and every new device with the same seed; a different seed gives a different
  map.  Half of the stuck bits are stuck at the value the data already has, so
  they change nothing (as on real hardware).
* **cosmic rays** (transient).  Each bit read is flipped with probability
  ``cosmic_rays``; a seeded generator per handle, so a run is reproducible but a
  re-read of the same range differs.
* **EIO**.  Any read touching one of the ``eio`` ranges ``((start, length), ...)``
  raises DeviceIOError naming the first failing offset; with
  ``eio_writes=True`` writes, zeroes and trims touching them fail too.

Extents pass through unchanged (a hole with a stuck-high bit still reports as a
hole, which is what a lying disk does).  Probability 0 costs nothing.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from ..block import BlockDevice, Extent
from ..errors import DeviceIOError, InvalidArgumentError

_M64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based 64-bit hash (SplitMix64 finaliser), vectorised; uint64 arithmetic wraps."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _binomial_table(n: int, p: float) -> tuple[np.ndarray, np.ndarray]:
    """(ks, cdf) of Binomial(n, p) over the range that holds all but ~1e-40 of the mass."""
    mean = n * p
    sd = math.sqrt(n * p * (1.0 - p))
    lo = max(0, int(mean - 14 * sd - 14))
    hi = min(n, int(mean + 14 * sd + 14))
    ks = np.arange(lo, hi + 1, dtype=np.int64)
    lg = np.vectorize(math.lgamma, otypes=[np.float64])
    if p >= 1.0:
        logpmf = np.where(ks == n, 0.0, -np.inf)
    else:
        logpmf = (math.lgamma(n + 1) - lg(ks + 1.0) - lg(n - ks + 1.0)
                  + ks * math.log(p) + (n - ks) * math.log1p(-p))
    pmf = np.exp(logpmf - logpmf.max())
    cdf = np.cumsum(pmf)
    return ks, cdf / cdf[-1]


class EvilDevice(BlockDevice):
    """Stuck bits, cosmic rays and EIO ranges on reads of ``backing``; see the module docstring."""

    format_name = "evil"

    def __init__(
        self,
        backing: BlockDevice,
        *,
        seed: int = 0,
        stuck_bits: float = 0.0,
        stuck_probability: float = 1.0,
        cosmic_rays: float = 0.0,
        eio: Iterable[tuple[int, int]] = (),
        eio_writes: bool = False,
        block: int = 4096,
        _stream: int = 0,
    ):
        for name, value in (("stuck_bits", stuck_bits), ("stuck_probability", stuck_probability),
                            ("cosmic_rays", cosmic_rays)):
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise InvalidArgumentError(f"evil: {name} must be a probability in [0, 1], not {value!r}")
        if not isinstance(block, int) or block < 1 or block > (1 << 24):
            raise InvalidArgumentError(f"evil: block must be an integer in [1, 16 MiB], not {block!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise InvalidArgumentError(f"evil: seed must be an integer, not {seed!r}")
        ranges = []
        for item in eio:
            try:
                start, length = (int(v) for v in item)
            except (TypeError, ValueError):
                raise InvalidArgumentError(f"evil: eio ranges are (start, length) pairs, not {item!r}") from None
            if start < 0 or length < 0:
                raise InvalidArgumentError(f"evil: eio range ({start}, {length}) is negative")
            if length:
                ranges.append((start, start + length))
        self.backing = backing
        self.size = backing.size
        self.readonly = backing.readonly
        self.block_size = backing.block_size
        self.can_trim = backing.can_trim
        self.can_zero = backing.can_zero
        self.can_fast_zero = backing.can_fast_zero
        self.can_extents = backing.can_extents
        self.can_multi_conn = backing.can_multi_conn
        self.seed = seed
        self.stuck_bits = float(stuck_bits)
        self.stuck_probability = float(stuck_probability)
        self.cosmic_rays = float(cosmic_rays)
        self.eio = tuple(sorted(ranges))
        self.eio_writes = eio_writes
        self.block = block
        self._stream = _stream
        self._clones = 0
        digest = hashlib.blake2b(b"evil\0" + str(seed).encode(), digest_size=32).digest()
        self._hash_key = np.uint64(int.from_bytes(digest[:8], "little"))
        self._map_key = np.uint64(int.from_bytes(digest[8:16], "little"))
        self._transient_seed = int.from_bytes(digest[24:], "little")
        self._rng = np.random.Generator(np.random.PCG64([self._transient_seed, _stream]))
        self._rng_lock = threading.Lock()
        if self.stuck_bits > 0.0:
            self._ks, self._cdf = _binomial_table(8 * block, self.stuck_bits)

    # -- the persistent stuck-bit map -------------------------------------------------------

    def stuck_counts(self, first_block: int, last_block: int) -> np.ndarray:
        """Number of stuck bits in each block ``first_block..last_block`` (inclusive)."""
        if self.stuck_bits <= 0.0:
            return np.zeros(last_block - first_block + 1, dtype=np.int64)
        idx = np.arange(first_block, last_block + 1, dtype=np.uint64)
        h = _splitmix64(idx ^ self._hash_key)
        u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
        pos = np.searchsorted(self._cdf, u, side="right")
        return self._ks[np.minimum(pos, len(self._ks) - 1)]

    def stuck_bits_in(self, first_block: int, last_block: int) -> tuple[np.ndarray, np.ndarray]:
        """(global bit indexes, stuck values 0/1) of blocks ``first_block..last_block``, ascending.

        Bit ``j`` of block ``b``'s list is ``hash(seed, b, j) mod (8 * block)``: one
        vectorised pass over every stuck bit of the range, no per-block state.
        """
        counts = self.stuck_counts(first_block, last_block)
        total = int(counts.sum())
        if total == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint8)
        blocks = np.repeat(np.arange(first_block, last_block + 1, dtype=np.uint64), counts)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        j = (np.arange(total) - starts).astype(np.uint64)
        h = _splitmix64(_splitmix64(blocks ^ self._map_key) + j)
        nbits = 8 * self.block
        positions = blocks.astype(np.int64) * nbits + (h % np.uint64(nbits)).astype(np.int64)
        values = (h >> np.uint64(63)).astype(np.uint8)
        # A position drawn twice in a block keeps its first value (so a bit is high or low, never both).
        positions, first = np.unique(positions, return_index=True)
        return positions, values[first]

    def stuck_map(self, block_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(bit positions within the block, stuck values 0/1) of one block; the same on every call."""
        positions, values = self.stuck_bits_in(block_index, block_index)
        return positions - block_index * 8 * self.block, values

    def _apply_stuck(self, arr: np.ndarray, offset: int) -> None:
        end = offset + len(arr)
        positions, values = self.stuck_bits_in(offset // self.block, (end - 1) // self.block)
        if self.stuck_probability < 1.0 and len(positions):
            with self._rng_lock:
                keep = self._rng.random(len(positions)) < self.stuck_probability
            positions, values = positions[keep], values[keep]
        byte = positions // 8 - offset
        inside = (byte >= 0) & (byte < len(arr))
        if not inside.any():
            return
        byte, bit, values = byte[inside], (positions[inside] % 8).astype(np.uint8), values[inside]
        masks = np.left_shift(np.uint8(1), bit)
        high = values == 1
        np.bitwise_or.at(arr, byte[high], masks[high])
        np.bitwise_and.at(arr, byte[~high], np.invert(masks[~high]))

    def _apply_cosmic(self, arr: np.ndarray) -> None:
        nbits = 8 * len(arr)
        with self._rng_lock:
            count = int(self._rng.binomial(nbits, self.cosmic_rays))
            if not count:
                return
            bits = self._rng.integers(0, nbits, size=count)
        masks = np.left_shift(np.uint8(1), (bits % 8).astype(np.uint8))
        np.bitwise_xor.at(arr, bits // 8, masks)

    # -- EIO -------------------------------------------------------------------------------

    def _check_eio(self, length: int, offset: int, what: str) -> None:
        end = offset + length
        for start, stop in self.eio:
            if start < end and stop > offset:
                raise DeviceIOError(f"evil: injected I/O error {what} at offset {max(start, offset)}")

    # -- hooks -----------------------------------------------------------------------------

    def _readinto(self, buf: memoryview, offset: int) -> None:
        if self.eio:
            self._check_eio(len(buf), offset, "reading")
        self.backing.readinto(buf, offset)
        if self.stuck_bits > 0.0 or self.cosmic_rays > 0.0:
            arr = np.frombuffer(buf, dtype=np.uint8)
            if self.stuck_bits > 0.0:
                self._apply_stuck(arr, offset)
            if self.cosmic_rays > 0.0:
                self._apply_cosmic(arr)

    def _pwrite(self, buf: memoryview, offset: int) -> None:
        if self.eio_writes:
            self._check_eio(len(buf), offset, "writing")
        self.backing.pwrite(buf, offset)

    def _zero(self, length: int, offset: int, may_trim: bool, fast: bool) -> None:
        if self.eio_writes:
            self._check_eio(length, offset, "zeroing")
        self.backing.zero(length, offset, may_trim=may_trim, fast=fast)

    def _trim(self, length: int, offset: int) -> None:
        if self.eio_writes:
            self._check_eio(length, offset, "trimming")
        self.backing.trim(length, offset)

    def flush(self) -> None:
        self._check_open()
        self.backing.flush()

    def _extents(self, length: int, offset: int) -> Iterator[Extent]:
        return self.backing.extents(length, offset)

    def clone(self) -> "EvilDevice":
        self._check_open()
        self._clones += 1
        return EvilDevice(
            self.backing.clone(), seed=self.seed, stuck_bits=self.stuck_bits,
            stuck_probability=self.stuck_probability, cosmic_rays=self.cosmic_rays,
            eio=[(s, e - s) for s, e in self.eio], eio_writes=self.eio_writes, block=self.block,
            _stream=(self._stream << 16) + self._clones,
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.backing.close()

    def layer_info(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "stuck-bits": self.stuck_bits,
            "stuck-probability": self.stuck_probability,
            "cosmic-rays": self.cosmic_rays,
            "eio": [[s, e - s] for s, e in self.eio],
            "eio-writes": self.eio_writes,
            "block": self.block,
        }


__all__ = ["EvilDevice"]
