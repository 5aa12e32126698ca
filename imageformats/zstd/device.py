"""ZstdDevice: random-access reads of seekable zstd (and of plain .zst files).

* Seekable format (a seek table in a final skippable frame): every frame is a
  chunk; a read decodes only the frames it touches.  Each frame is checked:
  its walked size must equal the table's Compressed_Size, its Frame_Content_Size
  (when present) and decoded size the table's Decompressed_Size, its own
  content checksum (verified by libzstd) and the table's checksum, when the
  table has them (low 32 bits of XXH64 of the decoded frame).
* Plain .zst without a seek table: the frames are walked once at open time
  (one 3-byte read per 128 KiB zstd block).  When every frame records its
  content size, each frame is a chunk as above (a single-frame file is one big
  chunk, decoded once into a sparse temporary file, see chunked.py).  When a
  frame does not record its size (``zstd`` reading from a pipe), the whole
  file is decoded once, at open time, into the sparse temporary file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

import xxhash
import zstandard

from ..block import BlockDevice, MiB
from ..errors import CorruptImageError, DeviceIOError, UnsupportedFeatureError
from ..xz.chunked import MAX_CHUNKS, Chunk, ChunkedDevice, _write_pieces
from . import header as h

_OUTPUT_CHUNK = 4 * MiB
#: Compressed bytes per decoder call when decoding a plain .zst at open (bounds each call's output).
_PLAIN_INPUT = 4096


def compress_bound(n: int) -> int:
    """ZSTD_COMPRESSBOUND: the largest frame libzstd writes for ``n`` bytes."""
    return n + (n >> 8) + ((128 * 1024 - n) >> 11 if n < 128 * 1024 else 0) + 64 * 1024


class _Reader:
    """A file-like view of ``[start, end)`` of a device, for zstandard.stream_reader."""

    def __init__(self, dev: BlockDevice, start: int, end: int):
        self.dev, self.pos, self.end = dev, start, end

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self.end - self.pos
        n = min(n, self.end - self.pos, 4 * MiB)
        if n <= 0:
            return b""
        data = self.dev.pread(n, self.pos)
        self.pos += n
        return data


def _read_seek_table(backing: BlockDevice):
    size = backing.size
    if size < h.SEEK_TABLE_FOOTER_SIZE + 8:
        return None
    tail = backing.pread(min(size, 64 * 1024), size - min(size, 64 * 1024))
    try:
        return h.parse_seek_table(tail, size, MAX_CHUNKS)
    except ValueError as exc:
        if isinstance(exc, CorruptImageError):
            raise
        need = exc.args[0]
        if need > size:
            raise CorruptImageError("zstd seek table is larger than the file") from None
        if need > 256 * MiB:
            raise UnsupportedFeatureError(f"zstd seek table of {need} bytes is too large") from None
        return h.parse_seek_table(backing.pread(need, size - need), size, MAX_CHUNKS)


class ZstdDevice(ChunkedDevice):
    """Read-only random access to seekable zstd and plain .zst files.

    Options as XzDevice: ``cache_size``, ``max_chunk_memory``, ``readahead``, ``tmpdir``.
    """

    format_name = "zstd"

    def __init__(self, backing: BlockDevice, **options: Any):
        self._kind = "seekable"
        self._table_checksums = False
        table = _read_seek_table(backing)
        pre_spilled = None
        if table is not None:
            chunks = self._chunks_from_table(backing, *table)
        else:
            chunks = self._walk_frames(backing)
            if chunks is None:
                self._kind = "plain, frame sizes unknown (decoded at open)"
                pre_spilled = self._decode_all(backing, options.get("tmpdir"))
                chunks = [Chunk(0, 0, pre_spilled[1], 0, backing.size, None)] if pre_spilled[1] else []
        size = sum(c.usize for c in chunks)
        try:
            self._setup(backing, chunks, size, options)
        except BaseException:
            if pre_spilled is not None:
                os.close(pre_spilled[0])
            raise
        if pre_spilled is not None:
            fd, _, written = pre_spilled
            self._shared.spill_fd = fd
            self._shared.spill_bytes = written
            if chunks:
                self._shared.spilled.add(0)

    # -- chunk tables --------------------------------------------------------------

    def _chunks_from_table(self, backing, table_start, checksums, entries) -> list[Chunk]:
        # Seek_Table_Entries: the cumulative Compressed_Size gives each frame's offset
        self._table_checksums = checksums
        chunks = []
        cpos = upos = 0
        for i, (csize, dsize, checksum) in enumerate(entries):
            if dsize and csize > compress_bound(dsize) + 64 * 1024:
                raise CorruptImageError(f"zstd seek table entry {i}: {csize} compressed bytes for {dsize} is impossible")
            chunks.append(Chunk(i, upos, dsize, cpos, csize, checksum))
            cpos += csize
            upos += dsize
        if cpos != table_start:
            raise CorruptImageError(f"zstd seek table: frames add up to {cpos} bytes but the table starts at "
                                    f"{table_start}")
        return chunks

    def _walk_frames(self, backing: BlockDevice) -> list[Chunk] | None:
        self._kind = "plain (no seek table)"
        chunks = []
        pos = upos = 0
        end = backing.size
        while pos < end:
            stop, content, _ = h.walk_frame(backing.pread, pos, end)
            if content is None:
                return None
            if content:
                if stop - pos > compress_bound(content) + 64 * 1024:
                    raise CorruptImageError(f"zstd frame at {pos}: {stop - pos} bytes for {content} is impossible")
            if len(chunks) >= MAX_CHUNKS:
                raise UnsupportedFeatureError(f"zstd file has more than {MAX_CHUNKS} frames")
            chunks.append(Chunk(len(chunks), upos, content, pos, stop - pos, None))
            upos += content
            pos = stop
        return chunks

    def _decode_all(self, backing: BlockDevice, tmpdir) -> tuple[int, int, int]:
        """Decode a plain .zst of unknown size into a sparse temporary file: (fd, size, bytes written)."""
        try:
            f = tempfile.TemporaryFile(dir=tmpdir, prefix="imageformats-spill-")
            fd = os.dup(f.fileno())
            f.close()
        except OSError as exc:
            raise DeviceIOError(f"cannot create the temporary file for a plain zstd file: {exc.strerror or exc}") from None
        pos = written = 0
        pending = bytearray()  # decoded bytes not yet written (flushed in _OUTPUT_CHUNK batches)
        dctx = zstandard.ZstdDecompressor()
        frame = None  # the decoder of the frame being decoded
        try:
            # One decompressobj per frame: unlike stream_reader, it says whether the frame ended
            # (``eof``), so a file cut (or corrupted) in the middle of a frame is an error, not a
            # shorter image.  Small input pieces bound the output of one call (at most 32768:1).
            for in_pos in range(0, backing.size, _PLAIN_INPUT):
                if in_pos % MiB == 0:
                    block = backing.pread(min(MiB, backing.size - in_pos), in_pos)
                data = block[in_pos % MiB:in_pos % MiB + _PLAIN_INPUT]
                while data:
                    if frame is None:
                        frame = dctx.decompressobj()
                    pending += frame.decompress(data)
                    data = b""
                    if frame.eof:
                        data, frame = frame.unused_data, None
                    if len(pending) >= _OUTPUT_CHUNK:
                        with memoryview(pending) as mv:
                            written += _write_pieces(fd, mv, pos)
                        pos += len(pending)
                        pending.clear()
            if frame is not None:
                raise CorruptImageError(f"zstd data ends in the middle of a frame (after {pos + len(pending)} "
                                        f"decoded bytes)")
            written += _write_pieces(fd, memoryview(pending), pos)
            pos += len(pending)
            os.ftruncate(fd, pos)
        except zstandard.ZstdError as exc:
            os.close(fd)
            raise CorruptImageError(f"zstd data: {exc}") from None
        except BaseException:
            os.close(fd)
            raise
        return fd, pos, written

    # -- decoding -----------------------------------------------------------------

    def _decode_chunk(self, chunk: Chunk, backing: BlockDevice) -> Iterator[bytes]:
        where = f"zstd frame {chunk.index} at file offset {chunk.cstart}"
        end = chunk.cstart + chunk.csize
        if end > backing.size:
            raise CorruptImageError(f"{where} runs past the end of the file")
        if chunk.usize > self._shared.max_chunk_memory:
            read = backing.pread
        else:
            frame = backing.pread(chunk.csize, chunk.cstart)

            def read(n: int, off: int) -> bytes:
                return frame[off - chunk.cstart:off - chunk.cstart + n]
        # the frame must fill exactly its seek-table entry (skippable frames have no data)
        stop, content, _ = h.walk_frame(read, chunk.cstart, end)
        if stop != end:
            raise CorruptImageError(f"{where} is {stop - chunk.cstart} bytes, its seek table entry says {chunk.csize}")
        if content is not None and content != chunk.usize:
            raise CorruptImageError(f"{where} holds {content} bytes, its seek table entry says {chunk.usize}")
        hasher = xxhash.xxh64() if chunk.extra is not None else None
        dctx = zstandard.ZstdDecompressor()
        try:
            if chunk.usize <= self._shared.max_chunk_memory:
                out = dctx.decompress(frame, max_output_size=chunk.usize)
                if len(out) != chunk.usize:
                    raise CorruptImageError(f"{where} decodes to {len(out)} bytes, its seek table entry says "
                                            f"{chunk.usize}")
                if hasher is not None:
                    hasher.update(out)
                    self._verify(hasher, chunk, where)
                yield out
                return
            reader = dctx.stream_reader(_Reader(backing, chunk.cstart, end), read_across_frames=False)
            total = 0
            while True:
                out = reader.read(_OUTPUT_CHUNK)
                if not out:
                    break
                total += len(out)
                if total > chunk.usize:
                    raise CorruptImageError(f"{where} decodes to more than the {chunk.usize} bytes recorded")
                if hasher is not None:
                    hasher.update(out)
                yield out
            if hasher is not None:
                self._verify(hasher, chunk, where)
        except zstandard.ZstdError as exc:
            raise CorruptImageError(f"{where}: {exc}") from None

    @staticmethod
    def _verify(hasher, chunk: Chunk, where: str) -> None:
        # Seek_Table_Entries Checksum: the least significant 32 bits of XXH64 of the decoded frame
        if hasher.intdigest() & 0xFFFFFFFF != chunk.extra:
            raise CorruptImageError(f"{where}: checksum mismatch with the seek table")

    def layer_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "kind": self._kind,
            "frames": self.chunk_count(),
            "seek-table-checksums": self._table_checksums,
            "largest-frame": max((c.usize for c in self._shared.chunks), default=0),
        }
        big = self.big_chunks()
        if big:
            info["large-frames"] = (f"{big} frame(s) larger than max-chunk-memory: decoded once, sequentially, "
                                    f"into a sparse temporary file on first access")
        info.update(self.cache_info())
        return info


def probe(head: bytes, dev: BlockDevice) -> bool:
    if len(head) < 4:
        return False
    magic = int.from_bytes(head[:4], "little")
    if magic == h.FRAME_MAGIC:
        return True
    # a seekable file may start with a skippable frame; require the seekable footer then
    if h.is_skippable(magic) and dev.size >= 17:
        return int.from_bytes(dev.pread(4, dev.size - 4), "little") == h.SEEKABLE_MAGIC
    return False


def open_zstd(dev: BlockDevice, writable: bool, options: dict[str, Any]) -> ZstdDevice:
    return ZstdDevice(dev, **{k: options[k] for k in ("cache_size", "max_chunk_memory", "readahead", "tmpdir")
                              if k in options})
