"""qcow2 metadata tables: a bounded LRU cache and vectorised L2 entry decoding.

Spec: qemu ``docs/interop/qcow2.rst`` sections "Cluster mapping" and "Extended L2 Entries".
An L2 table is decoded into one *kind* per allocation unit (a cluster, or a
subcluster with extended L2) and the host offset of that unit, with numpy, so
a 1 TiB map or a multi-MiB read costs a few array operations per table.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ..errors import CorruptImageError
from . import header as H

#: Unit kinds.
UNALLOCATED = 0  # reads from the backing image, or zeroes
ZERO = 1  # reads as zeroes (zero flag / subcluster zero bit)
DATA = 2  # stored at a host offset
COMPRESSED = 3  # stored compressed (whole cluster)

KIND_NAMES = {UNALLOCATED: "unallocated", ZERO: "zero", DATA: "data", COMPRESSED: "compressed"}

_SUB = np.arange(H.SUBCLUSTERS_PER_CLUSTER, dtype=np.uint64)


class LRUCache:
    """A thread-safe LRU mapping bounded by the total ``nbytes`` of its values."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key, value, nbytes: int) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if nbytes > self.max_bytes:
                return
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes and self._items:
                _, (_, n) = self._items.popitem(last=False)
                self._bytes -= n

    def pop(self, key) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


def parse_l2(raw, extended: bool) -> np.ndarray:
    """An L2 table's bytes -> uint64 array, shape (n,) or (n, 2) with extended L2 (entry, bitmap)."""
    arr = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
    if extended:
        arr = arr.reshape(-1, 2)
    return arr


def classify(
    table: np.ndarray,
    first: int,
    count: int,
    *,
    cluster_bits: int,
    extended: bool,
    zero_flag: bool,
    data_file: bool,
    where: str = "L2 table",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode entries ``first .. first+count`` of one L2 table.

    Returns (kind, host, cluster) per allocation unit (one per cluster, or 32 per
    cluster with extended L2): the unit's kind, its host offset (DATA units), and
    the index of its cluster within the table.  Raises CorruptImageError for
    entries the spec forbids ("Standard Cluster Descriptor", "Extended L2 Entries").
    """
    ents = table[first : first + count]
    if extended:
        bitmaps = ents[:, 1]
        ents = ents[:, 0]
    comp = (ents & np.uint64(H.L2E_COMPRESSED)) != 0
    off = ents & np.uint64(H.L2E_OFFSET_MASK)
    has_host = off != 0
    if data_file:
        # "The offset may only be 0 with bit 63 set ... when an external data file is used"
        has_host |= (ents & np.uint64(H.L2E_COPIED)) != 0
    cmask = np.uint64((1 << cluster_bits) - 1)
    bad_align = ~comp & has_host & ((off & cmask) != 0)
    if bad_align.any():
        i = int(np.flatnonzero(bad_align)[0])
        raise CorruptImageError(
            f"qcow2 {where} entry {first + i} points to unaligned host offset {int(off[i]):#x}"
        )
    if not extended:
        zero = ~comp & ((ents & np.uint64(H.L2E_ZERO)) != 0)
        if zero.any() and not zero_flag:
            i = int(np.flatnonzero(zero)[0])
            raise CorruptImageError(f"qcow2 {where} entry {first + i} has the zero flag in a version 2 image")
        kind = np.where(comp, COMPRESSED, np.where(zero, ZERO, np.where(has_host, DATA, UNALLOCATED))).astype(np.uint8)
        cluster = np.arange(first, first + count, dtype=np.int64)
        return kind, off.astype(np.int64), cluster
    # "Extended L2 Entries": bits 0-31 allocated, bits 32-63 reads as zeroes
    alloc = (bitmaps[:, None] >> _SUB) & np.uint64(1)
    zbits = (bitmaps[:, None] >> (_SUB + np.uint64(H.SUBCLUSTER_ZERO_SHIFT))) & np.uint64(1)
    std = ~comp
    both = std[:, None] & (alloc != 0) & (zbits != 0)
    if both.any():
        i = int(np.flatnonzero(both.any(axis=1))[0])
        raise CorruptImageError(f"qcow2 {where} entry {first + i}: a subcluster is both allocated and zero")
    nohost = std[:, None] & (alloc != 0) & ~has_host[:, None]
    if nohost.any():
        i = int(np.flatnonzero(nohost.any(axis=1))[0])
        raise CorruptImageError(f"qcow2 {where} entry {first + i}: allocated subclusters without a host offset")
    kind = np.where(
        comp[:, None],
        COMPRESSED,
        np.where(alloc != 0, DATA, np.where(zbits != 0, ZERO, UNALLOCATED)),
    ).astype(np.uint8)
    sub_size = np.uint64(1 << (cluster_bits - 5))
    host = (off[:, None] + _SUB * sub_size).astype(np.int64)
    cluster = np.repeat(np.arange(first, first + count, dtype=np.int64), H.SUBCLUSTERS_PER_CLUSTER)
    return kind.reshape(-1), host.reshape(-1), cluster


def runs(kind: np.ndarray, host: np.ndarray, cluster: np.ndarray, unit: int, *, split_compressed: bool):
    """Boundaries of runs of units that can be served by one operation.

    A run is one kind; DATA runs are also contiguous on the host; with
    ``split_compressed`` every compressed cluster is its own run.  Returns a list of
    (first_unit, end_unit, kind) over the arrays.
    """
    n = len(kind)
    if n == 0:
        return []
    brk = kind[1:] != kind[:-1]
    data = (kind[1:] == DATA) & (kind[:-1] == DATA)
    brk |= data & (host[1:] != host[:-1] + unit)
    if split_compressed:
        brk |= (kind[1:] == COMPRESSED) & (cluster[1:] != cluster[:-1])
    edges = np.flatnonzero(brk) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [n]))
    return list(zip(starts.tolist(), ends.tolist(), kind[starts].tolist()))


def compressed_extent(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, byte count) of a compressed cluster ("Compressed Clusters Descriptor")."""
    offset_mask, shift, mask = H.compressed_layout(cluster_bits)
    host = entry & offset_mask
    sectors = ((entry >> shift) & mask) + 1
    nbytes = sectors * H.COMPRESSED_SECTOR_SIZE - (host & (H.COMPRESSED_SECTOR_SIZE - 1))
    return host, nbytes
