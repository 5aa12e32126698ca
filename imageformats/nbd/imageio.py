"""An ovirt-imageio-style backend over any imageformats device.

imageio's backends are stream-like objects (``readinto``/``write``/``zero`` at a
position moved by ``seek``, plus ``size``, ``flush``, ``clone`` and
``extents(context="zero")`` yielding start/length/zero/hole).  :class:`Backend`
gives that shape to a :class:`~imageformats.block.BlockDevice`, so a server or a
copy tool written against imageio's interface can serve or copy any image stack.

Extents: like imageio's ``GET /extents`` (see ovirt-imageio's images API, and the
rhv-upload-plugin change in seed 003), the extents of the *whole* image are
computed once and cached; range queries search the cache with a binary search;
``write()`` and ``zero()`` (on this backend or any clone of it) invalidate the
cache.  ``hole`` uses the device's ``base:allocation`` meaning (unallocated in
every layer), so a raw file reports its holes and a qcow2 its unallocated
clusters.  The ``dirty`` context (incremental backup bitmaps) is not supported.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from ..block import BlockDevice, Extent
from ..errors import InvalidArgumentError, UnsupportedFeatureError


@dataclass(frozen=True)
class ZeroExtent:
    """One run of the image for ``context="zero"`` (imageio's extent JSON fields)."""

    start: int
    length: int
    zero: bool
    hole: bool

    def to_dict(self) -> dict:
        return {"start": self.start, "length": self.length, "zero": self.zero, "hole": self.hole}


class _ExtentCache:
    """Whole-image extents shared by a backend and its clones; any write drops them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.extents: list[ZeroExtent] | None = None
        self.starts: list[int] = []
        self.generation = 0  # bumped by every invalidation
        self.computed = 0  # how many times the whole map was computed (tests, metrics)

    def invalidate(self) -> None:
        with self.lock:
            self.extents = None
            self.starts = []
            self.generation += 1

    def get(self, device: BlockDevice) -> list[ZeroExtent]:
        with self.lock:
            if self.extents is not None:
                return self.extents
            generation = self.generation
        exts = [ZeroExtent(e.start, e.length, e.zero, e.hole) for e in _whole(device)]
        with self.lock:
            self.computed += 1
            if self.generation == generation:  # no write raced with the computation
                self.extents = exts
                self.starts = [e.start for e in exts]
        return exts


def _whole(device: BlockDevice) -> Iterator[Extent]:
    pos = 0
    while pos < device.size:
        for ext in device.extents(device.size - pos, pos):
            yield ext
            pos = ext.end
        if pos == 0:
            break


class Backend:
    """imageio-style stream over a device.  ``mode``: "r" (read-only) or "r+" (read-write)."""

    name = "imageformats"

    def __init__(self, device: BlockDevice, mode: str = "r", *, _cache: _ExtentCache | None = None):
        if mode not in ("r", "r+"):
            raise InvalidArgumentError(f"mode must be 'r' or 'r+', not {mode!r}")
        if mode == "r+" and device.readonly:
            raise InvalidArgumentError("the device is read-only; open the backend with mode 'r'")
        self._dev = device
        self._mode = mode
        self._pos = 0
        self._cache = _cache or _ExtentCache()

    # -- imageio backend attributes ------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self._dev.block_size[0]

    @property
    def max_readers(self) -> int:
        return 8

    @property
    def max_writers(self) -> int:
        return 8 if self._dev.can_multi_conn else 1

    def size(self) -> int:
        return self._dev.size

    def tell(self) -> int:
        return self._pos

    def seek(self, n: int, how: int = os.SEEK_SET) -> int:
        if how == os.SEEK_SET:
            pos = n
        elif how == os.SEEK_CUR:
            pos = self._pos + n
        elif how == os.SEEK_END:
            pos = self._dev.size + n
        else:
            raise InvalidArgumentError(f"invalid whence {how}")
        if pos < 0:
            raise InvalidArgumentError(f"negative position {pos}")
        self._pos = pos
        return pos

    # -- I/O -------------------------------------------------------------------------

    def readinto(self, buf) -> int:
        """Read up to len(buf) bytes at the position; returns the count (0 at the end)."""
        mv = memoryview(buf).cast("B")
        n = max(0, min(len(mv), self._dev.size - self._pos))
        if n:
            self._dev.readinto(mv[:n], self._pos)
            self._pos += n
        return n

    def write(self, buf) -> int:
        self._writable()
        mv = memoryview(buf).cast("B")
        self._cache.invalidate()
        self._dev.pwrite(mv, self._pos)
        self._cache.invalidate()  # a concurrent extents() may have cached the old map
        self._pos += len(mv)
        return len(mv)

    def zero(self, count: int) -> int:
        """Zero ``count`` bytes at the position (may deallocate, like imageio's sparse zero)."""
        self._writable()
        self._cache.invalidate()
        self._dev.zero(count, self._pos, may_trim=True)
        self._cache.invalidate()
        self._pos += count
        return count

    def flush(self) -> None:
        self._dev.flush()

    def _writable(self) -> None:
        if self._mode != "r+":
            raise UnsupportedFeatureError("backend opened read-only")

    # -- extents ---------------------------------------------------------------------

    def extents(self, context: str = "zero") -> Iterator[ZeroExtent]:
        """Extents of the whole image (from the cache)."""
        if context != "zero":
            raise UnsupportedFeatureError(f"extents context {context!r} is not supported (only 'zero')")
        return iter(self._cache.get(self._dev))

    def range_extents(self, start: int, length: int) -> Iterator[ZeroExtent]:
        """Cached extents clipped to ``[start, start+length)``, found by binary search."""
        if start < 0 or length < 0 or start + length > self._dev.size:
            raise InvalidArgumentError(f"range [{start}, {start + length}) is outside the image")
        exts = self._cache.get(self._dev)
        with self._cache.lock:
            starts = self._cache.starts if self._cache.extents is exts else [e.start for e in exts]
        end = start + length
        i = max(0, bisect.bisect_right(starts, start) - 1)
        while i < len(exts) and exts[i].start < end:
            e = exts[i]
            s, t = max(e.start, start), min(e.start + e.length, end)
            if t > s:
                yield ZeroExtent(s, t - s, e.zero, e.hole)
            i += 1

    @property
    def extents_computed(self) -> int:
        return self._cache.computed

    # -- lifetime ----------------------------------------------------------------------

    def clone(self) -> "Backend":
        """Another backend on a clone of the device, sharing the extent cache."""
        return Backend(self._dev.clone(), self._mode, _cache=self._cache)

    def close(self) -> None:
        self._dev.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open(path_or_device, mode: str = "r", **options) -> Backend:
    """A Backend over an image path/URL (opened with imageformats.open) or a device."""
    from .. import detect

    if isinstance(path_or_device, BlockDevice):
        return Backend(path_or_device, mode)
    dev = detect.open(path_or_device, writable=mode == "r+", **options)
    try:
        return Backend(dev, mode)
    except BaseException:
        dev.close()
        raise


__all__ = ["Backend", "ZeroExtent", "open"]
