"""Random access over a container made of independently decodable chunks.

Shared by the xz (a chunk = one xz Block) and seekable zstd (a chunk = one
zstd frame) readers.  A format subclass supplies the chunk table and a
``_decode_chunk`` generator; this module supplies everything else:

* a bounded, thread-safe LRU cache of decoded chunks shared by every clone.
  Cached chunks are held as 256 KiB pieces with all-zero pieces dropped, so
  memory is charged for the non-zero bytes only (a mostly empty VM disk fits
  many more chunks in the same budget);
* "spilling": a chunk whose decoded size exceeds ``max_chunk_memory`` (a
  single-block .xz, a single-frame .zst) is decoded once, sequentially, into
  an unlinked sparse temporary file (zero runs left as holes) and read from
  there afterwards.  It costs one full decode on first access and up to the
  chunk's non-zero bytes of temporary disk space; nothing is ever allocated in
  memory for it beyond a few MiB of buffers;
* verify-before-use: a chunk's bytes are handed out only after the decoder
  finished the chunk and verified its integrity check, so a corrupt image
  raises CorruptImageError and never returns wrong data;
* read-ahead: when a handle reads chunks in order, the next chunks are decoded
  on background threads (the codecs release the GIL), so a sequential copy
  uses both cores;
* stored pieces: where a format stores data verbatim (an xz Block's uncompressed LZMA2
  chunks: incompressible data), a verified chunk's pieces that lie verbatim in the backing
  are not kept in memory but read from the backing again, each part checked against the
  CRC-32 of the verified decode.  Random reads over images with incompressible data thus
  keep many more chunks "cached" for the same memory;
* extents: chunks known to decode to zeroes (and holes of spilled chunks) are
  reported as zero; everything else as data.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import sys
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..block import BlockDevice, Extent, MiB
from ..errors import (
    CorruptImageError,
    DeviceIOError,
    ImageFormatError,
    InvalidArgumentError,
)

#: Granularity of cached pieces (zero pieces cost nothing).
PIECE = 256 * 1024
#: Default cache budget (bytes of non-zero decoded data held in memory).
DEFAULT_CACHE_SIZE = 256 * MiB
#: Default largest chunk decoded into memory; bigger chunks are spilled to a temporary file.
DEFAULT_MAX_CHUNK_MEMORY = 64 * MiB
#: Most chunks (Blocks, frames) a device accepts: 4 Mi = 1 TiB in 256 KiB chunks.  Each costs
#: about 150 bytes of memory, so a hostile index cannot make us allocate gigabytes.
MAX_CHUNKS = 1 << 22
#: How many chunks are decoded ahead of a sequential reader.
DEFAULT_READAHEAD = 2
#: Sequential streams followed at once for read-ahead.
_MAX_STREAMS = 4
#: Evicted chunk buffers kept for reuse even when the cache budget is full (memory beyond the
#: budget: at most this many chunks).
_MAX_SPARE_BUFFERS = 2
#: Chunks a sequential stream has read past that stay cached; older ones are evicted at once
#: (a scan would otherwise fill the whole cache with chunks it will not read again, each in
#: freshly faulted-in memory, and evict what random readers use).
_PASSED_KEEP = 2
#: A sequential stream not read for this long (seconds) no longer shares the read-ahead.
_STREAM_IDLE = 1.0

#: Memory charged for a stored piece (where its parts lie, their CRC-32s).
_STORED_PIECE_COST = 1024

_ZERO_PIECE = bytes(PIECE)
_SEEK_DATA = getattr(os, "SEEK_DATA", 3)
_SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One independently decodable piece of the container."""

    index: int
    ustart: int  # offset of its decoded bytes in the guest view
    usize: int  # decoded size
    cstart: int  # offset of its encoded bytes in the backing device
    csize: int  # encoded size (as stored, padding included)
    extra: Any = None  # format specific (check type, checksum...)


class _Spilled:
    """Marker: the chunk lives in the spill file at its ``ustart``."""


SPILLED = _Spilled()


class _StoredPiece:
    """A cached piece whose bytes lie verbatim in the backing device: ``parts`` are
    ``(start in the piece, backing offset, length, CRC-32)``, in order, covering the piece."""

    __slots__ = ("parts",)

    def __init__(self, parts: tuple[tuple[int, int, int, int], ...]):
        self.parts = parts

    def copy_into(self, dst: memoryview, within: int, backing: BlockDevice, where: str) -> None:
        """Copy the piece's bytes ``[within, within + len(dst))`` into ``dst``."""
        end = within + len(dst)
        for start, at, length, crc in self.parts:
            lo, hi = max(within, start), min(end, start + length)
            if lo >= hi:
                continue
            data = backing.pread(length, at)  # the whole part: its CRC-32 is checked before use
            if zlib.crc32(data) != crc:
                raise CorruptImageError(f"{where}: the bytes at offset {at} of the compressed file changed "
                                        f"since they were decoded and verified")
            dst[lo - within:hi - within] = memoryview(data)[lo - start:hi - start]


class _Shared:
    """State shared by a device and its clones."""

    def __init__(self, chunks: list[Chunk], size: int, cache_size: int, max_chunk_memory: int,
                 readahead: int, tmpdir: str | None):
        self.chunks = chunks
        self.starts = [c.ustart for c in chunks]
        self.size = size
        self.cache_size = cache_size
        self.max_chunk_memory = max_chunk_memory
        self.readahead = readahead
        self.tmpdir = tmpdir
        self.lock = threading.Lock()
        self.cache: OrderedDict[int, tuple] = OrderedDict()
        self.cache_bytes = 0
        self.costs: dict[int, int] = {}
        self.inflight: dict[int, threading.Event] = {}
        self.spilled: set[int] = set()
        self.zero_chunks: set[int] = set()
        self.buffers: dict[int, Any] = {}  # chunk index -> the buffer its cached pieces view
        # Evicted chunk buffers kept for the next decodes (reusing memory saves the page faults
        # of fresh memory): free ones, and ones still viewed (a send in flight) to be reused
        # once free.  Their bytes, idle_bytes, count against cache_size beyond the first
        # _MAX_SPARE_BUFFERS: a scan, which keeps the cache nearly empty, reuses all its buffers.
        self.spare: list = []
        self.draining: list = []
        self.idle_bytes = 0
        self.spill_fd: int | None = None
        self.spill_bytes = 0
        self.refs = 0
        self.pool: ThreadPoolExecutor | None = None
        self.prefetch_backing: BlockDevice | None = None
        self.prefetch_local = threading.local()
        self.prefetch_handles: list[BlockDevice] = []
        # Sequential readers being followed: chunk index a stream is at -> (its streak, the
        # first chunk it read from the start, when it last read).
        self.streams: OrderedDict[int, tuple[int, int, float]] = OrderedDict()
        # Cached chunks a sequential stream has read past, oldest first.
        self.passed: OrderedDict[int, None] = OrderedDict()
        self.stats = {"decoded": 0, "hits": 0, "misses": 0, "spilled": 0, "prefetched": 0, "reused-buffers": 0,
                      "stored-pieces": 0}

    def take_buffer(self, size: int):
        """A writable buffer of ``size`` bytes for a decoded chunk: a reused one if there is one.

        Anonymous mmap: pages appear as the decoder writes them (no zero-fill first) and are
        plain 4 KiB pages (numpy would ask for huge pages, whose allocation stalls on
        compaction when memory is fragmented).  Reusing evicted buffers saves the page faults
        of fresh memory, a sizeable part of decoding time on a sequential read.
        """
        with self.lock:
            for i, buf in enumerate(self.spare):
                if len(buf) == size:
                    self.stats["reused-buffers"] += 1
                    self.idle_bytes -= size
                    return self.spare.pop(i)
            for i in range(len(self.draining)):
                # the list's reference and getrefcount's argument: no view is left
                if len(self.draining[i]) == size and sys.getrefcount(self.draining[i]) <= 2:
                    self.stats["reused-buffers"] += 1
                    self.idle_bytes -= size
                    return self.draining.pop(i)
        if not size:
            return bytearray()
        # Private, not Python's default shared mapping: shared anonymous memory is shmem, whose
        # page faults also go through a page cache (shmem_fault in a perf profile of a copy).
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def give_back(self, buf) -> None:
        """Keep a chunk buffer nobody reads any more for the next decode, if there is room."""
        with self.lock:
            if self._may_keep_locked(buf):
                self.spare.append(buf)
                self.idle_bytes += len(buf)

    def _may_keep_locked(self, buf) -> bool:
        return bool(len(buf)) and (len(self.spare) + len(self.draining) < _MAX_SPARE_BUFFERS
                                   or self.cache_bytes + self.idle_bytes + len(buf) <= self.cache_size)

    def trim_idle_locked(self) -> None:
        """Drop kept buffers (oldest first) while they push the cache past its budget."""
        while (len(self.spare) + len(self.draining) > _MAX_SPARE_BUFFERS
               and self.cache_bytes + self.idle_bytes > self.cache_size):
            self.idle_bytes -= len((self.draining or self.spare).pop(0))

    def evict_locked(self, index: int):
        """Drop a chunk from the cache (lock held); returns its buffer if it may be reused now."""
        del self.cache[index]
        self.passed.pop(index, None)
        self.cache_bytes -= self.costs.pop(index)
        buf = self.buffers.pop(index, None)
        # Every view of the buffer (the cached pieces, slices a reader is copying from or a
        # server is sending) keeps one memoryview export of it alive, and that export holds a
        # reference to the buffer.  With the cache entry gone, only `buf` and getrefcount's
        # own argument remain if nobody holds a view: then reuse is safe.
        if buf is not None and sys.getrefcount(buf) <= 2:
            return buf
        if buf is not None and self._may_keep_locked(buf):
            self.draining.append(buf)
            self.idle_bytes += len(buf)
        return None

    def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for dev in self.prefetch_handles:
            dev.close()
        self.prefetch_handles.clear()
        if self.prefetch_backing is not None:
            self.prefetch_backing.close()
            self.prefetch_backing = None
        if self.spill_fd is not None:
            os.close(self.spill_fd)
            self.spill_fd = None
        self.cache.clear()
        self.passed.clear()
        self.buffers.clear()
        self.spare.clear()
        self.draining.clear()
        self.idle_bytes = 0
        self.cache_bytes = 0


class ChunkedDevice(BlockDevice):
    """Base class of XzDevice and ZstdDevice (read-only, clonable, thread-safe per handle).

    Subclasses call ``_setup(backing, chunks, size, options)`` and implement
    ``_decode_chunk(chunk, backing) -> Iterator[bytes-like]`` that yields the
    decoded bytes in order and raises CorruptImageError (before its last
    ``yield`` returns control for good) when the chunk fails its check.  A
    subclass may also define ``_decode_chunk_into(chunk, backing, out)`` that
    decodes the whole chunk into a buffer of its size (then used for chunks kept
    in memory); its ``_decode_chunk`` may then reuse one buffer for every yield.
    """

    readonly = True
    can_zero = False
    can_extents = True
    can_multi_conn = True
    reads_ahead = property(lambda self: self._shared.readahead > 0)
    block_size = (1, 4096, 32 * MiB)

    _shared: _Shared

    # -- construction -----------------------------------------------------------------

    def _setup(self, backing: BlockDevice, chunks: list[Chunk], size: int, options: dict[str, Any]) -> None:
        cache_size = _int_option(options, "cache_size", DEFAULT_CACHE_SIZE)
        max_mem = _int_option(options, "max_chunk_memory", min(DEFAULT_MAX_CHUNK_MEMORY, cache_size))
        if max_mem > cache_size:
            max_mem = cache_size
        readahead = _int_option(options, "readahead", DEFAULT_READAHEAD)
        self.backing = backing
        self.size = size
        self._shared = _Shared(chunks, size, cache_size, max_mem, readahead, options.get("tmpdir"))
        self._shared.refs = 1

    def _new_handle(self, backing: BlockDevice) -> "ChunkedDevice":
        """A clone: same shared state, its own backing handle."""
        dev = object.__new__(type(self))
        dev.__dict__.update(self.__dict__)
        dev.backing = backing
        dev._closed = False
        with self._shared.lock:
            self._shared.refs += 1
        return dev

    def clone(self) -> "ChunkedDevice":
        self._check_open()
        return self._new_handle(self.backing.clone())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        shared = self._shared
        with shared.lock:
            shared.refs -= 1
            last = shared.refs == 0
        if last:
            shared.close()
        self.backing.close()

    # -- format hook -----------------------------------------------------------------

    def _decode_chunk(self, chunk: Chunk, backing: BlockDevice) -> Iterator[bytes]:
        raise NotImplementedError

    def _stored_runs(self, chunk: Chunk, backing: BlockDevice) -> list[tuple[int, int, int]] | None:
        """``(offset in the chunk, backing offset, length)`` of decoded bytes the format stores
        verbatim, in order; None if it does not (the default)."""
        return None

    # -- lookup ------------------------------------------------------------------------

    def _chunk_at(self, offset: int) -> int:
        """Index of the chunk holding guest byte ``offset`` (empty chunks are never returned)."""
        shared = self._shared
        i = bisect.bisect_right(shared.starts, offset) - 1
        # Skip empty chunks that share the start offset of the next one.
        while shared.chunks[i].usize == 0 or offset >= shared.chunks[i].ustart + shared.chunks[i].usize:
            i += 1
        return i

    # -- decoding ----------------------------------------------------------------------

    def _decode_to_pieces(self, chunk: Chunk, backing: BlockDevice, compact: bool) -> tuple[tuple, int, Any]:
        """Decode a chunk into memory: (pieces, bytes charged to the cache, the buffer the
        pieces are views of if it may be reused once they are evicted, else None).

        Pieces are PIECE-sized views (None = all zero, a _StoredPiece = read from the
        backing).  A chunk mostly in memory keeps its one decoded buffer.  If ``compact``,
        a chunk with many zero or stored pieces keeps copies of its other pieces only (less
        memory for a longer stay in the cache, at the price of copies and fresh pages).
        """
        if hasattr(self, "_decode_chunk_into"):
            # One buffer for the whole chunk, filled by the decoder directly: no per-piece
            # allocations, no join.
            whole = self._shared.take_buffer(chunk.usize)
            self._decode_chunk_into(chunk, backing, whole)
            stored = self._stored_parts(chunk, backing) if compact else {}
            pieces, cost, views_buffer = self._cut_pieces(chunk, [memoryview(whole).toreadonly()], stored, compact)
            if not views_buffer:  # the pieces are copies: the buffer is free again
                self._shared.give_back(whole)
                return pieces, cost, None
            return pieces, cost, whole
        outs = []
        pos = 0
        for out in self._decode_chunk(chunk, backing):
            pos += len(out)
            if pos > chunk.usize:
                raise CorruptImageError(
                    f"{self.format_name} chunk {chunk.index} decodes to more than the {chunk.usize} bytes its index records")
            outs.append(out)
        if pos != chunk.usize:
            raise CorruptImageError(
                f"{self.format_name} chunk {chunk.index} decodes to {pos} bytes, its index records {chunk.usize}")
        views = [memoryview(o).toreadonly() for o in outs]
        del outs
        return (*self._cut_pieces(chunk, views)[:2], None)

    def _stored_parts(self, chunk: Chunk, backing: BlockDevice) -> dict[int, list[tuple[int, int, int]]]:
        """For each piece of a (verified) chunk whose bytes all lie verbatim in the backing:
        piece number -> ``[(start in the piece, backing offset, length)]``."""
        try:
            runs = self._stored_runs(chunk, backing)
        except ImageFormatError:
            return {}  # not understood: keep the piece in memory
        parts: dict[int, list[tuple[int, int, int]]] = {}
        covered: dict[int, int] = {}
        for rel, at, length in runs or ():
            end = rel + length
            while rel < end:
                piece, within = divmod(rel, PIECE)
                n = min(end - rel, PIECE - within)
                parts.setdefault(piece, []).append((within, at, n))
                covered[piece] = covered.get(piece, 0) + n
                rel += n
                at += n
        return {p: v for p, v in parts.items() if covered[p] == min(PIECE, chunk.usize - p * PIECE)}

    @staticmethod
    def _cut_pieces(chunk: Chunk, views: list[memoryview],
                    stored: dict[int, list[tuple[int, int, int]]] | None = None,
                    compact: bool = True) -> tuple[tuple, int, bool]:
        """(pieces, cost, whether the pieces are views of ``views``) of a chunk decoded into
        ``views`` (in order, ``chunk.usize`` bytes in all)."""
        # Cut the decoded outputs into PIECE-sized views without joining them (a 16 MiB join
        # is a copy plus thousands of page faults); a piece straddling two outputs is copied.
        stored = stored or {}
        pieces = []
        zero = 0
        dropped = 0  # bytes of zero or stored pieces: not needed in memory
        vi = vo = 0  # current output, offset in it
        for start in range(0, chunk.usize, PIECE):
            n = min(PIECE, chunk.usize - start)
            if len(views[vi]) - vo >= n:
                piece = views[vi][vo:vo + n]
                vo += n
            else:
                parts = []
                need = n
                while need:
                    take = min(need, len(views[vi]) - vo)
                    parts.append(views[vi][vo:vo + take])
                    vo += take
                    need -= take
                    if vo == len(views[vi]) and need:
                        vi, vo = vi + 1, 0
                piece = memoryview(b"".join(parts)).toreadonly()
            if vi < len(views) - 1 and vo == len(views[vi]):
                vi, vo = vi + 1, 0
            if _nonzero(piece):
                pieces.append(piece)
                if len(pieces) - 1 in stored:
                    dropped += n
            else:
                pieces.append(None)
                zero += n
                dropped += n
        if zero == chunk.usize:
            return tuple(pieces), 0, False
        if not compact or dropped * 4 < chunk.usize:  # keep the one buffer
            return tuple(pieces), chunk.usize, True
        # mostly zero or stored: keep copies of the other pieces only, let the buffer go
        out: list = []
        cost = 0
        for i, piece in enumerate(pieces):
            if piece is None:
                out.append(None)
            elif i in stored:
                out.append(_StoredPiece(tuple((start, at, n, zlib.crc32(piece[start:start + n]))
                                              for start, at, n in stored[i])))
                cost += _STORED_PIECE_COST
            else:
                out.append(bytes(piece))
                cost += len(piece)
        return tuple(out), cost, False

    def _spill_fd(self) -> int:
        shared = self._shared
        with shared.lock:
            if shared.spill_fd is None:
                try:
                    f = tempfile.TemporaryFile(dir=shared.tmpdir, prefix="imageformats-spill-")
                    fd = os.dup(f.fileno())
                    f.close()
                    os.ftruncate(fd, shared.size)
                except OSError as exc:
                    raise DeviceIOError(f"cannot create the temporary file for a large {self.format_name} chunk: "
                                        f"{exc.strerror or exc}") from None
                shared.spill_fd = fd
            return shared.spill_fd

    def _decode_to_spill(self, chunk: Chunk, backing: BlockDevice) -> None:
        """Decode a big chunk sequentially into the sparse spill file (zero pieces stay holes)."""
        fd = self._spill_fd()
        pos = chunk.ustart
        end = chunk.ustart + chunk.usize
        written = 0
        try:
            # Punch out whatever a failed earlier attempt left behind.
            _punch(fd, chunk.ustart, chunk.usize)
            for out in self._decode_chunk(chunk, backing):
                mv = memoryview(out)
                if pos + len(mv) > end:
                    raise CorruptImageError(
                        f"{self.format_name} chunk {chunk.index} decodes to more than the {chunk.usize} bytes its index records")
                written += _write_pieces(fd, mv, pos)
                pos += len(mv)
        except OSError as exc:
            raise DeviceIOError(f"writing the temporary file for {self.format_name} chunk {chunk.index}: "
                                f"{exc.strerror or exc}") from None
        if pos != end:
            raise CorruptImageError(
                f"{self.format_name} chunk {chunk.index} decodes to {pos - chunk.ustart} bytes, its index records {chunk.usize}")
        with self._shared.lock:
            self._shared.spill_bytes += written
            self._shared.stats["spilled"] += 1

    def _get(self, index: int, backing: BlockDevice, *, prefetch: bool = False):
        """The decoded chunk: a tuple of pieces, or SPILLED.  Decodes at most once at a time per chunk."""
        shared = self._shared
        chunk = shared.chunks[index]
        while True:
            with shared.lock:
                entry = shared.cache.get(index)
                if entry is not None:
                    shared.cache.move_to_end(index)
                    if not prefetch:
                        shared.stats["hits"] += 1
                    return entry
                if index in shared.spilled:
                    return SPILLED
                event = shared.inflight.get(index)
                if event is None:
                    event = shared.inflight[index] = threading.Event()
                    owner = True
                    if not prefetch:
                        shared.stats["misses"] += 1
                else:
                    owner = False
            if not owner:
                if prefetch:
                    return None
                event.wait()
                continue
            try:
                if chunk.usize > shared.max_chunk_memory:
                    self._decode_to_spill(chunk, backing)
                    with shared.lock:
                        shared.spilled.add(index)
                        shared.stats["decoded"] += 1
                    return SPILLED
                # Read-ahead decodes serve sequential readers, which pass the chunk soon: they
                # keep the decode buffer as it is (no copies of non-zero pieces, no re-reading
                # and CRC checks of stored ones on a scan's hot path).
                pieces, cost, buf = self._decode_to_pieces(chunk, backing, compact=not prefetch)
                reusable = []
                with shared.lock:
                    shared.stats["decoded"] += 1
                    if prefetch:
                        shared.stats["prefetched"] += 1
                    if cost == 0:
                        shared.zero_chunks.add(index)
                    shared.stats["stored-pieces"] += sum(type(p) is _StoredPiece for p in pieces)
                    shared.cache[index] = pieces
                    shared.costs[index] = cost
                    if buf is not None:
                        shared.buffers[index] = buf
                    shared.cache_bytes += cost
                    shared.trim_idle_locked()
                    while shared.cache_bytes > shared.cache_size and len(shared.cache) > 1:
                        old_buf = shared.evict_locked(next(iter(shared.cache)))
                        if old_buf is not None:
                            reusable.append(old_buf)
                        del old_buf
                for old_buf in reusable:
                    shared.give_back(old_buf)
                return pieces
            finally:
                with shared.lock:
                    shared.inflight.pop(index, None)
                event.set()

    # -- read-ahead --------------------------------------------------------------------

    def _maybe_prefetch(self, index: int, offset: int) -> None:
        """Follow the sequential readers (a read at ``offset`` in chunk ``index``): decode ahead
        of them, and evict the chunks they have passed.  Called before the read waits for its
        chunk, so the next chunk is queued while this one still decodes."""
        shared = self._shared
        if shared.readahead <= 0:
            return
        with shared.lock:
            # Sequential = a streak of reads each in the same chunk as its stream's previous read
            # or the next one.  Several streams are followed at once (an NBD client copying with
            # several connections reads a few regions in parallel); random reads rarely make a
            # streak of two before their stream is forgotten, so they waste little decoding.
            streams = shared.streams
            reusable = None
            now = time.monotonic()
            if index in streams:
                streak, first, _ = streams.pop(index)
                streak += 1
            elif index - 1 in streams:
                streak, first, _ = streams.pop(index - 1)
                streak += 1
                # A chunk the stream entered in the middle stays: its start belongs to the
                # region before, whose reader has yet to get there.
                if streak >= 2 and index - 1 in shared.cache and index - 1 >= first:
                    reusable = self._passed_locked(index - 1)
            else:
                streak = 0
                first = index if offset == shared.chunks[index].ustart else index + 1
                while len(streams) >= _MAX_STREAMS:
                    streams.popitem(last=False)
            streams[index] = (streak, first, now)
        if reusable is not None:
            shared.give_back(reusable)
        with shared.lock:
            if streak < 2:
                return
            # Not into chunks another stream has read already: a client that splits the disk
            # into regions (nbdcopy: 128 MiB per connection) reaches the start of the next
            # region after its reader has passed it, and decoding it again is wasted work.
            read_by_others = [(start, at) for at, (_, start, _) in streams.items() if at != index]
            # The decode threads are shared: a lone reader has them all ahead of it, several
            # (nbdcopy's connections) one chunk each, so that decode buffers are read and
            # reused sooner (fewer fresh pages faulted in).
            others = sum(1 for at, (streak_, _, seen) in streams.items()
                         if at != index and streak_ >= 2 and now - seen < _STREAM_IDLE)
            depth = max(1, shared.readahead // (others + 1))
            wanted = [
                i for i in range(index + 1, min(index + 1 + depth, len(shared.chunks)))
                if i not in shared.cache and i not in shared.inflight and i not in shared.spilled
                and 0 < shared.chunks[i].usize <= shared.max_chunk_memory
                and not any(start <= i < at for start, at in read_by_others)
            ]
            if not wanted:
                return
            if shared.pool is None:
                try:
                    shared.prefetch_backing = self.backing.clone()
                except ImageFormatError:
                    shared.readahead = 0
                    return
                shared.pool = ThreadPoolExecutor(max_workers=shared.readahead,
                                                 thread_name_prefix=f"{self.format_name}-readahead")
            pool = shared.pool
        for i in wanted:
            try:
                pool.submit(self._prefetch, i)
            except RuntimeError:  # shut down by a concurrent close
                return

    def _passed_locked(self, index: int):
        """A sequential stream moved on from cached chunk ``index`` (lock held): remember it and
        evict the oldest passed chunk beyond _PASSED_KEEP.  Returns a buffer free for reuse."""
        shared = self._shared
        shared.passed[index] = None
        shared.passed.move_to_end(index)
        if len(shared.passed) <= _PASSED_KEEP:
            return None
        return shared.evict_locked(next(iter(shared.passed)))

    def _prefetch(self, index: int) -> None:
        shared = self._shared
        local = shared.prefetch_local
        backing = getattr(local, "backing", None)
        if backing is None:
            with shared.lock:
                if shared.prefetch_backing is None:
                    return
                backing = local.backing = shared.prefetch_backing.clone()
                shared.prefetch_handles.append(backing)
        try:
            self._get(index, backing, prefetch=True)
        except ImageFormatError:
            pass  # the foreground read of this chunk reports the error

    # -- BlockDevice hooks -------------------------------------------------------------

    def _readinto(self, buf: memoryview, offset: int) -> None:
        shared = self._shared
        end = offset + len(buf)
        pos = offset
        while pos < end:
            index = self._chunk_at(pos)
            chunk = shared.chunks[index]
            self._maybe_prefetch(index, pos)
            entry = self._get(index, self.backing)
            stop = min(end, chunk.ustart + chunk.usize)
            if entry is SPILLED:
                _pread_all(shared.spill_fd, buf[pos - offset:stop - offset], pos)
            else:
                rel = pos - chunk.ustart
                while rel < stop - chunk.ustart:
                    p, within = divmod(rel, PIECE)
                    n = min(PIECE - within, stop - chunk.ustart - rel)
                    dst = buf[chunk.ustart + rel - offset:chunk.ustart + rel - offset + n]
                    piece = entry[p]
                    if piece is None:
                        dst[:] = _ZERO_PIECE[:n]
                    elif type(piece) is _StoredPiece:
                        piece.copy_into(dst, within, self.backing, f"{self.format_name} chunk {index}")
                    else:
                        dst[:] = piece[within:within + n]
                    rel += n
            pos = stop

    def _memory_range(self, length: int, offset: int) -> memoryview | None:
        # Served when the range lies in one cached non-zero piece (an aligned 256 KiB NBD read
        # does); the view pins the chunk's buffer, see _Shared.evict_locked.
        shared = self._shared
        index = self._chunk_at(offset)
        chunk = shared.chunks[index]
        piece_no, within = divmod(offset - chunk.ustart, PIECE)
        if not length or within + length > PIECE:
            return None
        self._maybe_prefetch(index, offset)
        entry = self._get(index, self.backing)
        if entry is SPILLED:
            return None
        piece = entry[piece_no]
        if piece is None or type(piece) is _StoredPiece:
            return None
        return memoryview(piece)[within:within + length]

    def _extents(self, length: int, offset: int) -> Iterator[Extent]:
        shared = self._shared
        end = offset + length
        pos = offset
        while pos < end:
            index = self._chunk_at(pos)
            chunk = shared.chunks[index]
            stop = chunk.ustart + chunk.usize
            if index in shared.zero_chunks:
                yield Extent(pos, stop - pos, zero=True, hole=False)
            elif index in shared.spilled and shared.spill_fd is not None:
                yield from _file_extents(shared.spill_fd, pos, stop)
            else:
                yield Extent(pos, stop - pos, zero=False, hole=False)
            pos = stop

    # -- description -------------------------------------------------------------------

    def cache_info(self) -> dict[str, Any]:
        shared = self._shared
        with shared.lock:
            return {
                "cache-limit": shared.cache_size,
                "cache-used": shared.cache_bytes,
                "cached-chunks": len(shared.cache),
                "max-chunk-memory": shared.max_chunk_memory,
                "spilled-chunks": len(shared.spilled),
                "spill-file-bytes": shared.spill_bytes,
                **shared.stats,
            }

    def chunk_count(self) -> int:
        return len(self._shared.chunks)

    def big_chunks(self) -> int:
        return sum(1 for c in self._shared.chunks if c.usize > self._shared.max_chunk_memory)


def _nonzero(buf) -> bool:
    """Does ``buf`` hold a non-zero byte?  (The maximum of its 64-bit words: numpy's any() casts
    every element to bool first, twice as slow.)"""
    n = len(buf) // 8 * 8
    return bool((n and np.frombuffer(buf, dtype=np.uint64, count=n // 8).max())
                or np.frombuffer(buf, dtype=np.uint8, offset=n).any())


def _piece_map(buf) -> list[bool]:
    """For each PIECE of ``buf``: does it hold a non-zero byte?  (numpy: ~20 GB/s, vs ~0.3 GB/s
    for comparing memoryviews.)"""
    mv = memoryview(buf).cast("B")
    full = len(mv) // PIECE
    out: list[bool] = []
    if full:
        arr = np.frombuffer(mv[:full * PIECE], dtype=np.uint64).reshape(full, PIECE // 8)
        out = (arr.max(axis=1) != 0).tolist()
    if len(mv) > full * PIECE:
        out.append(bool(np.frombuffer(mv[full * PIECE:], dtype=np.uint8).any()))
    return out


def _int_option(options: dict[str, Any], name: str, default: int) -> int:
    value = options.get(name)
    if value is None:
        return default
    if isinstance(value, str):
        from ..cli.common import parse_size
        value = parse_size(value)
    if not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(f"option {name} must be a non-negative size, got {value!r}")
    return value


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _write_pieces(fd: int, mv: memoryview, pos: int) -> int:
    """Write the non-zero PIECEs of ``mv`` at ``pos`` of a sparse spill file (zero pieces stay
    holes); returns the bytes written."""
    written = 0
    for i, is_data in enumerate(_piece_map(mv)):
        if is_data:
            piece = mv[i * PIECE:(i + 1) * PIECE]
            _pwrite_all(fd, piece, pos + i * PIECE)
            written += len(piece)
    return written


def _pread_all(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        try:
            n = os.preadv(fd, [buf[done:]], offset + done)
        except OSError as exc:
            raise DeviceIOError(f"reading the temporary decode file: {exc.strerror or exc}") from None
        if n == 0:  # past the end: cannot happen, the file was truncated to the full size
            raise DeviceIOError("the temporary decode file is shorter than expected")
        done += n


def _punch(fd: int, offset: int, length: int) -> None:
    from ..block import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, _fallocate
    if _fallocate is not None and length:
        _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def _file_extents(fd: int, start: int, end: int) -> Iterator[Extent]:
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, _SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                yield Extent(pos, end - pos, zero=True, hole=False)
                return
            yield Extent(pos, end - pos, zero=False, hole=False)
            return
        if data > pos:
            data = min(data, end)
            yield Extent(pos, data - pos, zero=True, hole=False)
            pos = data
            continue
        hole = min(os.lseek(fd, pos, _SEEK_HOLE), end)
        if hole <= pos:
            hole = end
        yield Extent(pos, hole - pos, zero=False, hole=False)
        pos = hole
