"""Writing new qcow2 images: ``convert -O qcow2 [-c]`` and ``create -f qcow2``.

A streaming writer (spec: qemu ``docs/interop/qcow2.rst``).  The guest view of the
source is walked in ascending order; only clusters holding non-zero bytes are
stored.  Host layout, all appended in one forward pass:

    cluster 0       header, header extensions, backing file name (written last)
    data clusters   (compressed clusters packed back to back at byte granularity)
    L2 tables       each written right after the data it maps
    L1 table, refcount blocks, refcount table   (at the end)

The header is written after everything else, so an interrupted conversion leaves
a file without the qcow2 magic rather than a half-valid image.  Memory: the L1
table, the current L2 table, a 2-byte refcount per host cluster of output, and
the windows in flight (tens of MiB).
"""

from __future__ import annotations

import os
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..block import BlockDevice, MiB
from ..errors import ImageFormatError, InvalidArgumentError, NoSpaceError, UnsupportedFeatureError
from . import header as H

#: Bytes of guest data read per work item (rounded up to whole clusters): large batched
#: reads and writes when copying; smaller when compressing, so that one slow window (its
#: thread descheduled on a busy machine) holds up the in-order writer less.
WINDOW = 4 * MiB
COMPRESS_WINDOW = 1 * MiB
#: Work items in flight per worker thread (memory: about workers * this * window).
LOOKAHEAD = 4
#: Threads compressing clusters: zlib and zstd release the GIL, so they use every core.  More
#: threads than cores (qemu-img uses a pool of a dozen) keep the cores busy while a thread
#: waits for the GIL or the writer, and hold our share of a busy machine.
COMPRESS_WORKERS = 4 * (os.cpu_count() or 2)
#: Threads reading ahead of the writer when not compressing.
READ_WORKERS = 2
#: pwritev accepts at most IOV_MAX buffers per call.
_IOV_MAX = 1024
#: zlib level qemu uses (Z_DEFAULT_COMPRESSION) and zstd level (ZSTD_CLEVEL_DEFAULT).
ZLIB_LEVEL = 6
ZSTD_LEVEL = 3
#: Virtual sizes are whole 512-byte sectors (qemu counts the disk in sectors).
SECTOR = 512

#: qemu's feature name table, written on version 3 images when it fits in cluster 0.
_FEATURE_NAMES = [
    (H.FEATURE_TYPE_INCOMPAT, 0, b"dirty bit"),
    (H.FEATURE_TYPE_INCOMPAT, 1, b"corrupt bit"),
    (H.FEATURE_TYPE_INCOMPAT, 2, b"external data file"),
    (H.FEATURE_TYPE_INCOMPAT, 3, b"compression type"),
    (H.FEATURE_TYPE_INCOMPAT, 4, b"extended L2 entries"),
    (H.FEATURE_TYPE_COMPAT, 0, b"lazy refcounts"),
    (H.FEATURE_TYPE_AUTOCLEAR, 0, b"bitmaps"),
    (H.FEATURE_TYPE_AUTOCLEAR, 1, b"raw external data"),
]

_TRUE = {"on", "yes", "true", "1"}
_FALSE = {"off", "no", "false", "0"}


# ---------------------------------------------------------------------------------
# options


@dataclass
class Qcow2Options:
    """Settings of a new image (the names and values of qemu-img's ``-o`` options)."""

    cluster_size: int = 65536
    version: int = 3  # compat=1.1 -> 3, compat=0.10 -> 2
    compression_type: int = H.COMPRESSION_DEFLATE
    extended_l2: bool = False
    lazy_refcounts: bool = False
    refcount_bits: int = 16
    compress: bool = False  # convert -c: compress every data cluster that shrinks
    backing_file: str | None = None
    backing_fmt: str | None = None

    @property
    def cluster_bits(self) -> int:
        return self.cluster_size.bit_length() - 1


KNOWN_OPTIONS = ("cluster_size", "compat", "compression_type", "extended_l2", "lazy_refcounts", "refcount_bits",
                 "preallocation", "compress", "backing_file", "backing_fmt")


def _bool(key: str, value: str) -> bool:
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise InvalidArgumentError(f"qcow2 option {key}={value!r}: expected on or off")


def _size(key: str, value: str) -> int:
    from ..cli.common import parse_size  # the CLI's qemu-img size syntax (64K, 2M)

    try:
        return parse_size(str(value))
    except InvalidArgumentError:
        raise InvalidArgumentError(f"qcow2 option {key}={value!r}: not a size") from None


def parse_options(options: dict[str, Any] | None) -> Qcow2Options:
    """qemu-img style ``-o`` options (strings) -> validated :class:`Qcow2Options`."""
    opts = Qcow2Options()
    for key, value in (options or {}).items():
        key = key.replace("-", "_")
        if key == "cluster_size":
            opts.cluster_size = _size(key, value)
        elif key == "compat":
            v = str(value).strip().lower()
            if v in ("1.1", "v3"):
                opts.version = 3
            elif v in ("0.10", "v2"):
                opts.version = 2
            else:
                raise InvalidArgumentError(f"qcow2 option compat={value!r}: expected 1.1 or 0.10")
        elif key == "compression_type":
            v = str(value).strip().lower()
            names = {name: num for num, name in H.COMPRESSION_NAMES.items()}
            if v not in names:
                raise InvalidArgumentError(f"qcow2 option compression_type={value!r}: expected zlib or zstd")
            opts.compression_type = names[v]
        elif key == "extended_l2":
            opts.extended_l2 = _bool(key, value)
        elif key == "lazy_refcounts":
            opts.lazy_refcounts = _bool(key, value)
        elif key == "refcount_bits":
            try:
                opts.refcount_bits = int(value)
            except ValueError:
                raise InvalidArgumentError(f"qcow2 option refcount_bits={value!r}: not a number") from None
        elif key == "preallocation":
            if str(value).strip().lower() != "off":
                raise UnsupportedFeatureError(
                    f"qcow2 option preallocation={value}: only preallocation=off is supported")
        elif key == "compress":
            opts.compress = _bool(key, value)
        elif key == "backing_file":
            opts.backing_file = str(value) or None
        elif key == "backing_fmt":
            opts.backing_fmt = str(value) or None
        elif key in ("encryption", "encrypt.format", "encrypt_format", "data_file", "data_file_raw") or \
                key.startswith("encrypt."):
            raise UnsupportedFeatureError(f"qcow2 option {key}: writing encrypted images or external data files "
                                          "is not supported")
        else:
            raise InvalidArgumentError(
                f"unknown qcow2 option {key!r} (known: {', '.join(KNOWN_OPTIONS)})")
    cs = opts.cluster_size
    if cs & (cs - 1) or not (1 << H.MIN_CLUSTER_BITS) <= cs <= (1 << H.MAX_CLUSTER_BITS):
        raise InvalidArgumentError(f"qcow2 cluster_size {cs}: must be a power of two from 512 to 2M")
    if opts.refcount_bits not in (8, 16, 32, 64):
        if opts.refcount_bits in (1, 2, 4):
            raise UnsupportedFeatureError(f"qcow2 refcount_bits={opts.refcount_bits}: sub-byte refcounts are not "
                                          "supported for writing (use 8, 16, 32 or 64)")
        raise InvalidArgumentError(f"qcow2 refcount_bits={opts.refcount_bits}: must be a power of two up to 64")
    if opts.version == 2:
        for what, bad in (("extended_l2", opts.extended_l2), ("lazy_refcounts", opts.lazy_refcounts),
                          ("compression_type=zstd", opts.compression_type != H.COMPRESSION_DEFLATE),
                          ("refcount_bits other than 16", opts.refcount_bits != 16)):
            if bad:
                raise InvalidArgumentError(f"qcow2 {what} needs compat=1.1 (version 3), not compat=0.10")
    if opts.extended_l2 and opts.cluster_bits < H.MIN_CLUSTER_BITS_EXTENDED_L2:
        raise InvalidArgumentError("qcow2 extended_l2=on needs cluster_size of at least 16K")
    if opts.backing_fmt and not opts.backing_file:
        raise InvalidArgumentError("qcow2 backing_fmt given without backing_file")
    if opts.backing_file and len(opts.backing_file.encode()) > H.MAX_BACKING_FILE_NAME:
        raise InvalidArgumentError(f"qcow2 backing file name longer than {H.MAX_BACKING_FILE_NAME} bytes")
    return opts


# ---------------------------------------------------------------------------------
# compression ("Compressed Clusters Descriptor"; raw deflate or zstd per compression_type)


def _compressor(compression_type: int) -> Callable[[bytes], bytes]:
    if compression_type == H.COMPRESSION_ZSTD:
        import zstandard

        local = threading.local()

        def zstd_compress(data) -> bytes:
            c = getattr(local, "c", None)
            if c is None:
                c = local.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
            return c.compress(data)

        return zstd_compress

    try:  # zlib-ng: the same raw deflate stream format, produced faster
        from zlib_ng import zlib_ng as z
    except ImportError:
        z = zlib

    def deflate(data) -> bytes:
        # Raw deflate (no zlib header) with a 4 KiB window, like qemu.
        c = z.compressobj(ZLIB_LEVEL, z.DEFLATED, H.DEFLATE_WBITS, 9)
        return c.compress(data) + c.flush()

    return deflate


# ---------------------------------------------------------------------------------
# the writer


class _Refcounts:
    """One counter per host cluster (2 bytes each), growing as the file grows.

    Only compressed clusters share host clusters, and the packing starts a new host cluster
    before a counter reaches ``MAX`` (see ``refcount_limit``), so 16 bits always suffice.
    """

    MAX = 0xFFFF

    def __init__(self) -> None:
        self.a = np.zeros(1024, dtype=np.uint16)

    def _grow(self, n: int) -> None:
        if n > len(self.a):
            new = np.zeros(max(n, 2 * len(self.a)), dtype=np.uint16)
            new[: len(self.a)] = self.a
            self.a = new

    def get(self, index: int) -> int:
        return int(self.a[index]) if index < len(self.a) else 0

    def add(self, first: int, count: int = 1) -> None:
        self._grow(first + count)
        self.a[first : first + count] += 1


@dataclass
class _Window:
    """One work item: clusters [first, first + count) of the guest, read and examined."""

    first: int
    count: int
    buf: memoryview | None = None  # count * cluster_size bytes (None: nothing read, all zero)
    data: np.ndarray | None = None  # bool per cluster: holds non-zero bytes
    sub: np.ndarray | None = None  # extended L2: uint32 per cluster, bit i = subcluster i non-zero
    blobs: list | None = None  # compressed output per data cluster (None where it did not shrink)


class Qcow2Writer:
    """Build one new qcow2 file in a single forward pass.

    ``Qcow2Writer(path, size, options)`` then :meth:`write_from` (optional) and
    :meth:`finish`.  ``size`` is rounded up to whole 512-byte sectors.
    """

    def __init__(self, path: str | os.PathLike, size: int, options: Qcow2Options, *, base_dir: str | None = None):
        if size < 0:
            raise InvalidArgumentError(f"negative image size {size}")
        self.path = os.fspath(path)
        self.opts = options
        self.size = -(-size // SECTOR) * SECTOR
        self.cs = cs = options.cluster_size
        self.cbits = options.cluster_bits
        self.ext = options.extended_l2
        self.l2_entries = cs // (H.L2_EXTENDED_ENTRY_SIZE if self.ext else H.L2_ENTRY_SIZE)
        self.nclusters = -(-self.size // cs)
        self.l1_size = -(-self.nclusters // self.l2_entries)
        if self.l1_size * 8 > H.MAX_L1_BYTES:
            raise InvalidArgumentError(
                f"virtual size {size} needs an L1 table of {self.l1_size * 8} bytes with {cs}-byte clusters, "
                f"more than qemu's {H.MAX_L1_BYTES}-byte limit: use a larger cluster_size")
        self.coffset_mask, self.csize_shift, self.csize_mask = H.compressed_layout(self.cbits)
        self.base_dir = base_dir if base_dir is not None else os.path.dirname(os.path.abspath(self.path))
        if options.backing_file and "://" not in options.backing_file and os.path.realpath(
                os.path.join(self.base_dir, options.backing_file)) == os.path.realpath(self.path):
            raise InvalidArgumentError(f"{self.path}: an image cannot be its own backing file")
        self._backing_dev: BlockDevice | None = None
        self._backing_opened = False
        self.l1 = np.zeros(self.l1_size, dtype=np.uint64)
        self.cur_l1 = -1
        self.cur_l2 = np.zeros(self.l2_entries * (2 if self.ext else 1), dtype=np.uint64)
        self.cur_l2_used = False
        self.refcounts = _Refcounts()
        self.refcount_limit = min((1 << options.refcount_bits) - 1, _Refcounts.MAX)
        self.refcounts.add(0)  # cluster 0: the header
        self.pos = cs  # next free host byte
        self._written_back = cs  # writeback started for host bytes [cs, this)
        self.data_clusters = 0
        self.compressed_clusters = 0
        self._zero_cluster = bytes(cs)
        self._zero_blob: bytes | None = None
        self._compress = _compressor(options.compression_type) if options.compress else None
        self._build_header_area(0, 0, 0)  # fails early when the header and backing name do not fit
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _os_error(exc, self.path) from None
        self._finished = False

    # -- low-level output ------------------------------------------------------------

    def _pwritev(self, bufs: list, offset: int) -> None:
        try:
            for i in range(0, len(bufs), _IOV_MAX):
                part = bufs[i : i + _IOV_MAX]
                want = sum(len(b) for b in part)
                n = os.pwritev(self.fd, part, offset)
                if n != want:  # short write: finish the rest the slow way
                    self._pwrite_all(b"".join(bytes(b) for b in part)[n:], offset + n)
                offset += want
        except OSError as exc:
            raise _os_error(exc, self.path) from None

    def _pwrite_all(self, data, offset: int) -> None:
        mv = memoryview(data).cast("B")
        try:
            while len(mv):
                n = os.pwrite(self.fd, mv, offset)
                mv = mv[n:]
                offset += n
        except OSError as exc:
            raise _os_error(exc, self.path) from None

    def _start_writeback(self, offset: int, length: int) -> None:
        """Start writeback of whole MiBs written so far, never of the page the next write continues:
        writing into a page under writeback waits for the disk."""
        if _sync_file_range is None:
            return
        end = (offset + length) // _WRITEBACK_STEP * _WRITEBACK_STEP
        if end > self._written_back:
            _sync_file_range(self.fd, self._written_back, end - self._written_back, _SYNC_FILE_RANGE_WRITE)
            self._written_back = end  # advisory: errors ignored, fsync at the end reports them

    def _align(self) -> None:
        self.pos = -(-self.pos // self.cs) * self.cs

    # -- L2 entries ("Cluster mapping") ----------------------------------------------

    def _switch_l2(self, l1_index: int) -> None:
        if l1_index == self.cur_l1:
            return
        self._flush_l2()
        self.cur_l1 = l1_index

    def _flush_l2(self) -> None:
        if self.cur_l1 >= 0 and self.cur_l2_used:
            self._align()
            self._pwrite_all(self.cur_l2.astype(">u8").tobytes(), self.pos)
            self.l1[self.cur_l1] = self.pos | H.L1E_COPIED
            self.refcounts.add(self.pos // self.cs)
            self.pos += self.cs
            self.cur_l2[:] = 0
            self.cur_l2_used = False

    def _put(self, first: int, entries: np.ndarray, bitmaps: np.ndarray | None) -> None:
        """Set the L2 entries of guest clusters [first, first + len(entries)), ascending."""
        n = len(entries)
        done = 0
        while done < n:
            c = first + done
            l1i, l2i = divmod(c, self.l2_entries)
            self._switch_l2(l1i)
            k = min(n - done, self.l2_entries - l2i)
            e = entries[done : done + k]
            if self.ext:
                b = bitmaps[done : done + k] if bitmaps is not None else 0
                self.cur_l2[2 * l2i : 2 * (l2i + k) : 2] = e
                self.cur_l2[2 * l2i + 1 : 2 * (l2i + k) : 2] = b
                used = bool(np.any(e)) or (bitmaps is not None and bool(np.any(b)))
            else:
                self.cur_l2[l2i : l2i + k] = e
                used = bool(np.any(e))
            self.cur_l2_used |= used
            done += k

    def _put_zero_flags(self, first: int, count: int) -> None:
        """Mark guest clusters as reading zeroes (version 3 only): the zero flag or all zero-subcluster bits."""
        step = self.l2_entries
        while count > 0:
            k = min(count, step - first % step)
            if self.ext:
                bitmaps = np.full(k, H.SUBCLUSTER_ALLOC_MASK << H.SUBCLUSTER_ZERO_SHIFT, dtype=np.uint64)
                self._put(first, np.zeros(k, dtype=np.uint64), bitmaps)
            else:
                self._put(first, np.full(k, H.L2E_ZERO, dtype=np.uint64), None)
            first += k
            count -= k

    # -- backing file -------------------------------------------------------------

    def _backing(self) -> BlockDevice | None:
        """The backing image, opened on first need (to know where it does not read as zeroes)."""
        if not self._backing_opened:
            self._backing_opened = True
            if self.opts.backing_file:
                self._backing_dev = open_backing(self.opts.backing_file, self.opts.backing_fmt, self.base_dir)
        return self._backing_dev

    def _backing_nonzero(self, first: int, count: int) -> Iterator[tuple[int, int]]:
        """Runs of guest clusters in [first, first+count) where the backing image may not read as zeroes."""
        dev = self._backing()
        if dev is None:
            return
        start = first * self.cs
        end = min((first + count) * self.cs, dev.size)
        pos = start
        while pos < end:
            for ext in dev.extents(end - pos, pos):
                s, e = max(ext.start, pos), min(ext.end, end)
                if not ext.zero and e > s:
                    yield s // self.cs, -(-e // self.cs)
                pos = e
                if pos >= end:
                    break

    def _zero_run(self, first: int, count: int) -> None:
        """Guest clusters that read as zeroes in the source: nothing stored unless a backing file shows through."""
        if not self.opts.backing_file:
            return
        pending: list[tuple[int, int]] = []
        for s, e in self._backing_nonzero(first, count):
            if pending and pending[-1][1] >= s:
                pending[-1] = (pending[-1][0], max(pending[-1][1], e))
            else:
                pending.append((s, e))
        for s, e in pending:
            if self.opts.version >= 3:
                self._put_zero_flags(s, e - s)
            else:
                # Version 2 has no zero flag: store zeroes over the backing file's data.
                for w in range(s, e, self._window_clusters()):
                    n = min(self._window_clusters(), e - w)
                    win = _Window(w, n, None, np.zeros(n, dtype=bool))
                    self._emit(win, force=np.ones(n, dtype=bool))

    # -- reading and examining the source --------------------------------------------

    def _window_clusters(self) -> int:
        return max(1, (COMPRESS_WINDOW if self._compress is not None else WINDOW) // self.cs)

    def _segments(self, src: BlockDevice) -> Iterator[tuple[int, int, bool]]:
        """(first, count, has_data) runs of guest clusters covering the disk, ascending."""
        cs = self.cs
        covered = 0  # clusters before this are handled
        pos = 0
        while pos < src.size:
            for ext in src.extents(src.size - pos, pos):
                s, e = max(ext.start, pos), min(ext.end, src.size)
                if e <= s:
                    continue
                if not ext.zero:
                    c0, c1 = s // cs, -(-e // cs)
                    if c0 > covered:
                        yield covered, c0 - covered, False
                        covered = c0
                    if c1 > covered:
                        yield covered, c1 - covered, True
                        covered = c1
                pos = e
                if pos >= src.size:
                    break
        if self.nclusters > covered:
            yield covered, self.nclusters - covered, False

    def _work(self, src: BlockDevice) -> Iterator[tuple[int, int, bool]]:
        """Segments with data split into windows."""
        wc = self._window_clusters()
        for first, count, has_data in self._segments(src):
            if not has_data:
                yield first, count, False
                continue
            for w in range(first, first + count, wc):
                yield w, min(wc, first + count - w), True

    def _examine(self, src: BlockDevice, first: int, count: int, buf: bytearray | None = None) -> _Window:
        """Read guest clusters [first, first+count) and find which hold data (runs on a worker thread)."""
        cs = self.cs
        nbytes = count * cs
        if buf is None or len(buf) < nbytes:
            buf = bytearray(nbytes)
        mv = memoryview(buf)[:nbytes]
        start = first * cs
        valid = max(0, min(nbytes, src.size - start))
        src.readinto(mv[:valid], start)
        if valid < nbytes:
            mv[valid:] = bytes(nbytes - valid)
        arr = np.frombuffer(mv, dtype=np.uint64)
        if self.ext:
            sub_words = cs // H.SUBCLUSTERS_PER_CLUSTER // 8
            subs = arr.reshape(count, H.SUBCLUSTERS_PER_CLUSTER, sub_words).any(axis=2)
            sub = np.packbits(subs, axis=1, bitorder="little").view("<u4").reshape(count).astype(np.uint64)
            data = sub != 0
        else:
            sub = None
            data = arr.reshape(count, cs // 8).any(axis=1)
        win = _Window(first, count, mv, data, sub)
        if self._compress is not None:
            blobs = []
            limit = cs  # qemu stores a cluster compressed only when it shrinks below one cluster
            for i in np.flatnonzero(data):
                blob = self._compress(mv[i * cs : (i + 1) * cs])
                blobs.append(blob if len(blob) < limit else None)
            win.blobs = blobs
        return win

    # -- storing examined windows ------------------------------------------------------

    def _emit(self, win: _Window, force: np.ndarray | None = None) -> None:
        """Store a window's data clusters and set their L2 entries (main thread, in guest order)."""
        n = win.count
        data = win.data
        store = data if force is None else (data | force)
        entries = np.zeros(n, dtype=np.uint64)
        bitmaps = np.zeros(n, dtype=np.uint64) if self.ext else None
        backing = self.opts.backing_file is not None
        if backing and not store.all():
            # Zero clusters inside a data window: a backing image must not show through.
            zero_idx = np.flatnonzero(~store)
            if self.opts.version >= 3:
                if self.ext:
                    bitmaps[zero_idx] = H.SUBCLUSTER_ALLOC_MASK << H.SUBCLUSTER_ZERO_SHIFT
                else:
                    entries[zero_idx] = H.L2E_ZERO
            else:
                force = np.zeros(n, dtype=bool) if force is None else force.copy()
                for s, e in self._backing_nonzero(win.first, n):
                    force[s - win.first : e - win.first] = True
                store = data | force
        idx = np.flatnonzero(store)
        if len(idx):
            if self._compress is None:
                self._store_plain(win, idx, force, entries, bitmaps)
            else:
                self._store_compressed(win, idx, force, entries, bitmaps)
        if self.ext and len(idx):
            # Subclusters: allocated where the source has data; the rest zero-flagged over a backing
            # image or left unallocated (reads zeroes) without one.  Compressed clusters have no subclusters.
            sub = win.sub if win.sub is not None else np.zeros(n, dtype=np.uint64)
            plain = idx[(entries[idx] & H.L2E_COMPRESSED) == 0]
            alloc = sub[plain].copy()
            if force is not None:
                alloc[force[plain] & ~data[plain]] = H.SUBCLUSTER_ALLOC_MASK  # stored zeroes
            alloc[alloc == 0] = H.SUBCLUSTER_ALLOC_MASK
            bm = alloc
            if backing:
                bm = alloc | ((~alloc & H.SUBCLUSTER_ALLOC_MASK) << H.SUBCLUSTER_ZERO_SHIFT)
            bitmaps[plain] = bm
        self._put(win.first, entries, bitmaps)

    def _store_plain(self, win: _Window, idx: np.ndarray, force, entries, bitmaps) -> None:
        cs = self.cs
        self._align()
        base = self.pos
        host = base // cs
        bufs: list = []
        mv = win.buf
        # Merge runs of adjacent guest clusters into one buffer each (fewer iovecs).
        run_start = None
        prev = None
        for i in idx.tolist():
            if mv is None or not win.data[i]:
                if run_start is not None:
                    bufs.append(mv[run_start * cs : (prev + 1) * cs])
                    run_start = None
                bufs.append(self._zero_cluster)
            elif run_start is not None and i == prev + 1:
                pass
            else:
                if run_start is not None:
                    bufs.append(mv[run_start * cs : (prev + 1) * cs])
                run_start = i
            prev = i
        if run_start is not None:
            bufs.append(mv[run_start * cs : (prev + 1) * cs])
        self._pwritev(bufs, base)
        k = len(idx)
        self._start_writeback(base, k * cs)
        entries[idx] = (base + np.arange(k, dtype=np.uint64) * cs) | H.L2E_COPIED
        self.refcounts.add(host, k)
        self.pos = base + k * cs
        self.data_clusters += k

    def _store_compressed(self, win: _Window, idx: np.ndarray, force, entries, bitmaps) -> None:
        cs = self.cs
        out = bytearray()
        base = self.pos
        blobs = iter(win.blobs or [])
        rc = self.refcounts
        for i in idx.tolist():
            if win.buf is not None and win.data[i]:
                blob = next(blobs)
                raw = win.buf[i * cs : (i + 1) * cs]
            else:
                if self._zero_blob is None:
                    self._zero_blob = self._compress(self._zero_cluster)
                blob = self._zero_blob
                raw = self._zero_cluster
            pos = base + len(out)
            if blob is None:
                # Did not shrink: stored as a standard cluster, cluster-aligned.
                aligned = -(-pos // cs) * cs
                out += bytes(aligned - pos)
                out += raw
                entries[i] = aligned | H.L2E_COPIED
                rc.add(aligned // cs)
                self.data_clusters += 1
                continue
            if pos % cs and rc.get(pos // cs) >= self.refcount_limit:
                # The host cluster is referenced as often as refcount_bits allows: start a new one.
                aligned = -(-pos // cs) * cs
                out += bytes(aligned - pos)
                pos = aligned
            # "Compressed Clusters Descriptor": offset, then additional 512-byte sectors beyond the first.
            end = pos + len(blob)
            if end > self.coffset_mask:
                raise UnsupportedFeatureError(
                    f"compressed clusters must lie below host offset {self.coffset_mask + 1} with {cs}-byte clusters")
            extra = (end - 1) // H.COMPRESSED_SECTOR_SIZE - pos // H.COMPRESSED_SECTOR_SIZE
            entries[i] = H.L2E_COMPRESSED | (extra << self.csize_shift) | pos
            first_host = pos // cs
            last_host = (-(-end // H.COMPRESSED_SECTOR_SIZE) * H.COMPRESSED_SECTOR_SIZE - 1) // cs
            rc.add(first_host, last_host - first_host + 1)
            out += blob
            self.compressed_clusters += 1
        self._pwrite_all(out, base)
        self._start_writeback(base, len(out))
        self.pos = base + len(out)

    # -- driving ---------------------------------------------------------------------

    def write_from(self, src: BlockDevice, progress: Callable[[int, int], None] | None = None) -> None:
        """Store the guest view of ``src`` (its size must not exceed the image's)."""
        if src.size > self.size:
            raise InvalidArgumentError(f"source ({src.size} bytes) is larger than the image ({self.size} bytes)")
        total = src.size
        done = 0

        def report(first: int, count: int) -> None:
            nonlocal done
            done = min(total, done + count * self.cs)
            if progress is not None:
                progress(min(done, total), total)

        workers = COMPRESS_WORKERS if self._compress is not None else READ_WORKERS
        handles: list[BlockDevice] = []
        try:
            handles = [src.clone() for _ in range(workers)]
        except ImageFormatError:
            for h in handles:
                h.close()
            handles = []
        if not handles:
            for first, count, has_data in self._work(src):
                if has_data:
                    self._emit(self._examine(src, first, count))
                else:
                    self._zero_run(first, count)
                report(first, count)
            if progress is not None:
                progress(total, total)
            return

        free = list(handles)
        lock = threading.Lock()

        buffers: list[bytearray] = []  # reused: fresh 4 MiB buffers cost a page fault per page

        def job(first: int, count: int) -> _Window:
            with lock:
                h = free.pop()
                buf = buffers.pop() if buffers else None
            try:
                return self._examine(h, first, count, buf)
            finally:
                with lock:
                    free.append(h)

        in_flight = LOOKAHEAD * len(handles)  # windows read or being compressed ahead of the writer
        try:
            with ThreadPoolExecutor(max_workers=len(handles)) as pool:
                queue: deque = deque()

                def drain_one() -> None:
                    kind, first, count, item = queue.popleft()
                    if kind:
                        win = item.result()
                        self._emit(win)
                        with lock:
                            buffers.append(win.buf.obj)
                    else:
                        self._zero_run(first, count)
                    report(first, count)

                for first, count, has_data in self._work(src):
                    if has_data:
                        queue.append((True, first, count, pool.submit(job, first, count)))
                    else:
                        queue.append((False, first, count, None))
                    while len(queue) > in_flight or (queue and not queue[0][0]):
                        drain_one()
                while queue:
                    drain_one()
        finally:
            for h in handles:
                h.close()
        if progress is not None:
            progress(total, total)

    # -- metadata at the end -------------------------------------------------------------

    def _build_header_area(self, l1_offset: int, rt_offset: int, rt_clusters: int) -> bytes:
        """Cluster 0: "Header", "Header extensions", then the backing file name."""
        o = self.opts
        backing = o.backing_file.encode() if o.backing_file else b""
        incompat = 0
        if o.compression_type != H.COMPRESSION_DEFLATE:
            incompat |= H.INCOMPAT_COMPRESSION
        if o.extended_l2:
            incompat |= H.INCOMPAT_EXTL2
        fields = dict(
            version=o.version, backing_file_offset=0, backing_file_size=len(backing) if backing else 0,
            cluster_bits=self.cbits, size=self.size, crypt_method=H.CRYPT_NONE, l1_size=self.l1_size,
            l1_table_offset=l1_offset, refcount_table_offset=rt_offset, refcount_table_clusters=rt_clusters,
            nb_snapshots=0, snapshots_offset=0,
            incompatible_features=None, compatible_features=None, autoclear_features=None,
            refcount_order=None, header_length=None, compression_type=None,
        )
        if o.version >= 3:
            fields.update(incompatible_features=incompat,
                          compatible_features=H.COMPAT_LAZY_REFCOUNTS if o.lazy_refcounts else 0,
                          autoclear_features=0, refcount_order=o.refcount_bits.bit_length() - 1,
                          header_length=H.HEADER_V3_LENGTH, compression_type=o.compression_type)
        head_len = H.HEADER_V3_LENGTH if o.version >= 3 else H.HEADER_V2_LENGTH

        def ext(kind: int, data: bytes) -> bytes:
            return H.ExtensionHeader.build(dict(type=kind, length=len(data))) + data + bytes(-len(data) % 8)

        exts = b""
        if o.backing_fmt:
            exts += ext(H.EXT_BACKING_FORMAT, o.backing_fmt.encode())
        end = ext(H.EXT_END, b"")
        names = b"".join(H.FeatureNameEntry.build(dict(type=t, bit=b, name=n.ljust(46, b"\0")))
                         for t, b, n in _FEATURE_NAMES)
        if o.version >= 3 and head_len + len(exts) + 8 + len(names) + len(end) + len(backing) <= self.cs:
            exts = ext(H.EXT_FEATURE_NAMES, names) + exts  # like qemu: only when it fits in cluster 0
        exts += end
        if backing:
            fields["backing_file_offset"] = head_len + len(exts)
        head = H.Header.build(fields)
        head += bytes(head_len - len(head))
        area = head + exts + backing
        if len(area) > self.cs:
            raise InvalidArgumentError(
                f"the qcow2 header, extensions and backing file name ({len(area)} bytes) do not fit "
                f"in one {self.cs}-byte cluster")
        return area

    def finish(self) -> None:
        """Write the L1 table, refcounts and the header; close the file."""
        if self._finished:
            return
        try:
            self._flush_l2()
            cs = self.cs
            self._align()
            l1_offset = 0
            if self.l1_size:
                l1_offset = self.pos
                l1_bytes = self.l1.astype(">u8").tobytes()
                l1_clusters = -(-len(l1_bytes) // cs)
                self._pwrite_all(l1_bytes, l1_offset)
                self.refcounts.add(l1_offset // cs, l1_clusters)
                self.pos += l1_clusters * cs
            # "Host cluster management": blocks covering every cluster, themselves and the table included.
            rbits = self.opts.refcount_bits
            per_block = cs * 8 // rbits
            used = self.pos // cs
            nblocks, tclusters = 1, 1
            while True:
                total = used + nblocks + tclusters
                nb = -(-total // per_block)
                tc = -(-(nb * 8) // cs)
                if (nb, tc) == (nblocks, tclusters):
                    break
                nblocks, tclusters = max(nb, nblocks), max(tc, tclusters)
            if tclusters * cs > H.MAX_REFCOUNT_TABLE_BYTES:
                raise InvalidArgumentError(f"the refcount table would exceed qemu's {H.MAX_REFCOUNT_TABLE_BYTES}-byte "
                                           "limit: use a larger cluster_size")
            blocks_offset = self.pos
            rt_offset = blocks_offset + nblocks * cs
            self.refcounts.add(blocks_offset // cs, nblocks + tclusters)
            limit = (1 << rbits) - 1
            counts = self.refcounts.a
            if int(counts.max(initial=0)) > limit:
                raise UnsupportedFeatureError(
                    f"a host cluster would be referenced more than {limit} times; use a larger refcount_bits")
            step = per_block * 64  # 64 refcount blocks per write: bounded memory
            for first in range(0, nblocks * per_block, step):
                chunk = np.zeros(step, dtype=f">u{rbits // 8}")
                part = counts[first : first + step]
                chunk[: len(part)] = part
                nbytes = min(step, nblocks * per_block - first) * rbits // 8
                self._pwrite_all(chunk.tobytes()[:nbytes], blocks_offset + first * rbits // 8)
            table = np.zeros(tclusters * cs // 8, dtype=np.uint64)
            table[:nblocks] = blocks_offset + np.arange(nblocks, dtype=np.uint64) * cs
            self._pwrite_all(table.astype(">u8").tobytes(), rt_offset)
            self.pos = rt_offset + tclusters * cs
            try:
                os.ftruncate(self.fd, self.pos)
            except OSError as exc:
                raise _os_error(exc, self.path) from None
            area = self._build_header_area(l1_offset, rt_offset, tclusters)
            self._pwrite_all(area, 0)
            try:
                os.fsync(self.fd)
            except OSError as exc:
                raise _os_error(exc, self.path) from None
            self._finished = True
        finally:
            self.close()

    def close(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None
        if self._backing_dev is not None:
            self._backing_dev.close()
            self._backing_dev = None

    def abort(self) -> None:
        """Give up: close and remove the half-written file."""
        self.close()
        if not self._finished:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _load_sync_file_range():
    try:
        import ctypes
        import ctypes.util

        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


#: Linux sync_file_range(2): start writeback of what was just written, so the final fsync is short.
_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
_WRITEBACK_STEP = 1 * MiB


def _os_error(exc: OSError, what: str) -> ImageFormatError:
    import errno

    from ..errors import DeviceIOError, NotFoundError, ReadOnlyError

    if exc.errno == errno.ENOSPC:
        return NoSpaceError(f"{what}: no space left on device")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ReadOnlyError(f"{what}: {os.strerror(exc.errno)}")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return NotFoundError(f"{what}: {os.strerror(exc.errno)}")
    if exc.errno == errno.EISDIR:
        return InvalidArgumentError(f"{what}: {os.strerror(exc.errno)}")
    return DeviceIOError(f"{what}: {exc.strerror or exc}")


def _refuse_overwriting_source(src: BlockDevice, dst_path: str) -> None:
    """The new file is truncated first: it must not be a file the source reads from."""
    try:
        dst = os.stat(dst_path)
    except OSError:
        return
    for layer in src.layers():
        path = getattr(layer, "path", None)
        if isinstance(path, str):
            try:
                st = os.stat(path)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (dst.st_dev, dst.st_ino):
                raise InvalidArgumentError(f"{dst_path}: the destination is the source image ({path})")


def open_backing(name: str, fmt: str | None, base_dir: str) -> BlockDevice:
    """Open a backing image named in a header: relative names are relative to the new image's directory."""
    from .. import detect

    path = name if os.path.isabs(name) or "://" in name else os.path.join(base_dir, name)
    return detect.open(path, format=fmt)


# ---------------------------------------------------------------------------------
# public entry points


def write_qcow2(src: BlockDevice, dst_path: str, options: dict[str, Any] | None = None, progress=None) -> None:
    """``convert -O qcow2``: write ``src``'s guest view to a new qcow2 file at ``dst_path``."""
    opts = parse_options(options)
    _refuse_overwriting_source(src, dst_path)
    writer = Qcow2Writer(dst_path, src.size, opts)
    try:
        writer.write_from(src, progress)
        writer.finish()
    except BaseException:
        writer.abort()
        raise


def create_qcow2(path: str, size: int | None, options: dict[str, Any] | None = None, *,
                 check_backing: bool = True) -> int:
    """``create -f qcow2``: a new empty image (everything reads from the backing file, or zeroes).

    ``size`` None takes the backing image's size.  Returns the virtual size.
    """
    opts = parse_options(options)
    if opts.compress:
        raise InvalidArgumentError("create takes no compress option")
    base_dir = os.path.dirname(os.path.abspath(path))
    if opts.backing_file and "://" not in opts.backing_file and os.path.realpath(
            os.path.join(base_dir, opts.backing_file)) == os.path.realpath(path):
        raise InvalidArgumentError(f"{path}: an image cannot be its own backing file")
    if opts.backing_file and (check_backing or size is None):
        with open_backing(opts.backing_file, opts.backing_fmt, base_dir) as dev:
            if size is None:
                size = dev.size
    if size is None:
        raise InvalidArgumentError("an image size is needed (or a backing file to take it from)")
    writer = Qcow2Writer(path, size, opts, base_dir=base_dir)
    try:
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return writer.size


__all__ = ["Qcow2Options", "Qcow2Writer", "parse_options", "write_qcow2", "create_qcow2"]


def _register() -> None:
    from ..detect import Output, register_output

    register_output(Output("qcow2", write_qcow2,
                           "qcow2 v3 (compat=1.1) or v2 image; -c compresses clusters (zlib or zstd)"))


_register()
