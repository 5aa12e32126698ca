"""XzDevice: random-access reads of an .xz file through its Index.

The Index of every Stream (xz-file-format.txt section 4) is read at open time,
walking the file backwards from the last Stream Footer over Stream Padding
and concatenated Streams (section 2.2).  A read decodes only the Blocks it
touches.  A Block is decoded by liblzma (through ctypes: liblzma.py) from a one-Block
Stream assembled around the Block's stored bytes: our Stream Header, the Block
as stored, and a one-record Index built from the file's Index record.  liblzma
thus verifies, in C, the Block Header CRC32, the Block's Check (CRC32, CRC64
or SHA-256), the compressed and uncompressed sizes against the Index record,
and decodes every filter chain it supports (LZMA2, delta, x86, PowerPC, IA-64,
ARM, ARM-Thumb, SPARC, ARM64 with liblzma >= 5.4, RISC-V with >= 5.6).  Before
that the Block Header is parsed here (header.py) and cross-checked against
the Index, so unknown filters and inconsistent sizes are named precisely.

Blocks larger than ``max_chunk_memory`` -- notably the single Block that
``xz`` without ``-T`` writes -- are decoded once into a sparse temporary file
(see chunked.py and docs/xz.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..block import BlockDevice, MiB
from ..errors import CorruptImageError, UnsupportedFeatureError
from . import header as h
from . import liblzma
from .chunked import MAX_CHUNKS, Chunk, ChunkedDevice, _int_option

#: Largest Index (per Stream) read into memory.
MAX_INDEX_BYTES = 64 * MiB
#: Default liblzma memory limit for one Block (xz -9 needs 65 MiB).
DEFAULT_MEMLIMIT = 256 * MiB
#: Compressed bytes fed to liblzma per call.
_INPUT_CHUNK = 1 * MiB
#: Largest decoded piece produced per liblzma call.
_OUTPUT_CHUNK = 4 * MiB


def _stream_padding_start(backing: BlockDevice, pos: int) -> int:
    """2.2 Stream Padding: walk back over null bytes before ``pos``; returns where they start."""
    while pos > 0:
        n = min(64 * 1024, pos)
        blk = backing.pread(n, pos - n)
        stripped = len(blk.rstrip(b"\x00"))
        if stripped == 0:
            pos -= n
            continue
        return pos - (n - stripped)
    return 0


def parse_streams(backing: BlockDevice) -> tuple[list[Chunk], list[dict[str, Any]]]:
    """Every Block of every Stream, in file order, with its guest offset."""
    if backing.size % 4:
        raise CorruptImageError(f"xz file size {backing.size} is not a multiple of four (truncated?)")
    streams: list[dict[str, Any]] = []
    pos = backing.size
    while pos > 0:
        start = _stream_padding_start(backing, pos)
        if start == 0:
            if not streams:
                raise CorruptImageError("xz file holds only null bytes")
            raise CorruptImageError("xz file starts with null bytes (Stream Padding before the first Stream)")
        padding = pos - start
        if padding % 4:
            raise CorruptImageError(f"xz Stream Padding of {padding} bytes is not a multiple of four")
        pos = start
        if pos < h.STREAM_HEADER_SIZE + h.STREAM_FOOTER_SIZE:
            raise CorruptImageError(f"xz data ends at {pos}: too short for a Stream Header and Footer")
        backward_size, check = h.parse_stream_footer(backing.pread(h.STREAM_FOOTER_SIZE, pos - h.STREAM_FOOTER_SIZE))
        index_start = pos - h.STREAM_FOOTER_SIZE - backward_size
        if index_start < h.STREAM_HEADER_SIZE:
            raise CorruptImageError(f"xz Stream Footer at {pos - 12} records an Index of {backward_size} bytes "
                                    f"that would start before the file")
        if backward_size > MAX_INDEX_BYTES:
            raise UnsupportedFeatureError(f"xz Index of {backward_size} bytes is larger than the "
                                          f"{MAX_INDEX_BYTES} byte limit")
        left = MAX_CHUNKS - sum(len(s["records"]) for s in streams)
        index_bytes = backing.pread(backward_size, index_start)
        try:
            records = h.parse_index(index_bytes, max_records=min(backward_size // 2, left))
        except CorruptImageError:
            if h.parse_index_count(index_bytes) > left:
                raise UnsupportedFeatureError(f"xz file has more than {MAX_CHUNKS} Blocks") from None
            raise
        blocks_size = sum(h.round4(unpadded) for unpadded, _ in records)
        stream_start = index_start - blocks_size - h.STREAM_HEADER_SIZE
        if stream_start < 0:
            raise CorruptImageError(f"xz Index at {index_start} records {blocks_size} bytes of Blocks, "
                                    f"more than precede it")
        header_check = h.parse_stream_header(backing.pread(h.STREAM_HEADER_SIZE, stream_start))
        if header_check != check:
            raise CorruptImageError(f"xz Stream at {stream_start}: Stream Header and Footer flags differ")
        if check not in h.CHECK_NAMES:
            raise UnsupportedFeatureError(f"xz Stream at {stream_start} uses reserved Check ID {check:#x}")
        for unpadded, _ in records:
            if unpadded <= h.check_size(check) + 8:  # header (>= 8) + at least one byte of data
                raise CorruptImageError(f"xz Index record with unpadded size {unpadded} is too small")
        streams.append({"offset": stream_start, "check": check, "records": records, "padding": padding})
        pos = stream_start
    streams.reverse()
    chunks: list[Chunk] = []
    upos = 0
    for s in streams:
        cpos = s["offset"] + h.STREAM_HEADER_SIZE
        for unpadded, usize in s["records"]:
            chunks.append(Chunk(len(chunks), upos, usize, cpos, h.round4(unpadded), (s["check"], unpadded)))
            upos += usize
            cpos += h.round4(unpadded)
        del s["records"]
    return chunks, streams


class XzDevice(ChunkedDevice):
    """Read-only random access to an .xz file (multi-Block, multi-Stream, any check).

    Options: ``cache_size`` (default 256 MiB), ``max_chunk_memory`` (default
    64 MiB: larger Blocks are decoded once into a sparse temporary file),
    ``readahead`` (Blocks decoded ahead of sequential reads, default 2),
    ``tmpdir``, ``memlimit`` (liblzma memory limit per Block, default 256 MiB).
    """

    format_name = "xz"

    def __init__(self, backing: BlockDevice, **options: Any):
        chunks, streams = parse_streams(backing)
        self._streams = streams
        self._memlimit = _int_option(options, "memlimit", DEFAULT_MEMLIMIT)
        self._setup(backing, chunks, sum(c.usize for c in chunks), options)

    # 3. Block, decoded by liblzma inside a one-Block Stream built around it
    def _decode_chunk(self, chunk: Chunk, backing: BlockDevice) -> Iterator[memoryview]:
        """Decode a Block in windows of _OUTPUT_CHUNK bytes (each valid until the next one)."""
        yield from self._decode_windows(chunk, backing, memoryview(bytearray(min(_OUTPUT_CHUNK, chunk.usize))))

    def _decode_chunk_into(self, chunk: Chunk, backing: BlockDevice, out) -> None:
        """Decode a Block straight into ``out`` (a writable buffer of exactly its size)."""
        for _ in self._decode_windows(chunk, backing, memoryview(out).cast("B")):
            pass

    def head(self, length: int) -> bytes:
        """The first bytes, decoded from the start of the first Block without decoding all of
        it (a probe of a big single-Block file would otherwise decode the whole file); not
        verified against the Block's Check, which only the whole Block has."""
        chunks = self._shared.chunks
        length = min(length, self.size)
        if (not length or not chunks or chunks[0].usize < length
                or 0 in self._shared.cache or 0 in self._shared.spilled):  # decoded already
            return super().head(length)
        window = memoryview(bytearray(length))
        self._check_open()
        decoder = self._decode_windows(chunks[0], self.backing, window)
        try:
            first = next(decoder)
        finally:
            decoder.close()
        if len(first) != length:
            raise CorruptImageError(f"xz Block 0 at file offset {chunks[0].cstart} decodes to fewer than "
                                    f"{length} bytes")
        return bytes(first)

    def _decode_windows(self, chunk: Chunk, backing: BlockDevice, window: memoryview) -> Iterator[memoryview]:
        """Decode a Block into ``window`` again and again; yields it each time it is full, and
        the filled part at the end.  Raises unless the Block decodes to exactly its Index size
        and liblzma verified it (only then does the last window come out)."""
        check, unpadded = chunk.extra
        where = f"xz Block {chunk.index} at file offset {chunk.cstart}"
        header_bytes, _, _ = self._block_header(chunk, backing)
        hsize = len(header_bytes)
        index = h.build_index([(unpadded, chunk.usize)])
        tail = index + h.build_stream_footer(check, len(index))
        inbuf = bytearray(min(_INPUT_CHUNK, chunk.csize))

        def inputs() -> Iterator[tuple[Any, bool]]:
            yield h.build_stream_header(check) + header_bytes, False
            pos = chunk.cstart + hsize
            end = chunk.cstart + chunk.csize
            while pos < end:
                n = min(len(inbuf), end - pos)
                backing.readinto(memoryview(inbuf)[:n], pos)
                yield memoryview(inbuf)[:n], False
                pos += n
            yield tail, True

        total = filled = 0
        spare = bytearray(1)  # where output goes once the Block has all its bytes: any is an overrun
        try:
            with liblzma.StreamDecoder(self._memlimit) as dec:
                for data, last in inputs():
                    while not dec.ended and (len(data) or last):
                        full = total == chunk.usize
                        consumed, produced = dec.decode(data, spare if full else window[filled:], finish=last)
                        if full and produced:
                            raise CorruptImageError(f"{where} decodes to more than the {chunk.usize} bytes "
                                                    f"its Index records")
                        data = data[consumed:]
                        if not full:
                            filled += produced
                            total += produced
                            if filled == len(window) and total < chunk.usize:
                                yield window
                                filled = 0
                        if not consumed and not produced:
                            break  # no progress: the checks below say why
                    if len(data):
                        raise CorruptImageError(f"{where}: the decoder stopped before the end of the Block")
                if not dec.ended or total != chunk.usize:
                    raise CorruptImageError(f"{where}: compressed data ends early (decoded {total} of "
                                            f"{chunk.usize} bytes)")
        except liblzma.LzmaError as exc:
            if exc.code == liblzma.LZMA_MEMLIMIT_ERROR:
                raise UnsupportedFeatureError(
                    f"{where} needs more than the {self._memlimit} byte decoder memory limit (option memlimit)"
                ) from None
            if exc.code == liblzma.LZMA_OPTIONS_ERROR:
                raise UnsupportedFeatureError(f"{where}: filter chain not supported by this liblzma ({exc})") from None
            raise CorruptImageError(f"{where}: {exc} (compressed data, sizes or {h.CHECK_NAMES[check]} check "
                                    f"do not match)") from None
        yield window[:filled]

    @staticmethod
    def _block_header(chunk: Chunk, backing: BlockDevice):
        """3.1 Block Header of a Block, cross-checked against its Index record:
        (header bytes, parsed header, compressed size of the Block's data)."""
        check, unpadded = chunk.extra
        where = f"xz Block {chunk.index} at file offset {chunk.cstart}"
        size_byte = backing.pread(1, chunk.cstart)[0]
        if size_byte == 0:
            raise CorruptImageError(f"{where}: an Index Indicator where a Block Header should be")
        hsize = (size_byte + 1) * 4
        csize = unpadded - hsize - h.check_size(check)
        if csize <= 0:
            raise CorruptImageError(f"{where}: Block Header of {hsize} bytes does not fit the unpadded size {unpadded}")
        header_bytes = backing.pread(hsize, chunk.cstart)
        hdr = h.parse_block_header(header_bytes)
        # 3.1.3 / 3.1.4: sizes in the Block Header must match the Index
        if hdr.compressed_size is not None and hdr.compressed_size != csize:
            raise CorruptImageError(f"{where}: Block Header says {hdr.compressed_size} compressed bytes, "
                                    f"the Index {csize}")
        if hdr.uncompressed_size is not None and hdr.uncompressed_size != chunk.usize:
            raise CorruptImageError(f"{where}: Block Header says {hdr.uncompressed_size} uncompressed bytes, "
                                    f"the Index {chunk.usize}")
        return header_bytes, hdr, csize

    def _stored_runs(self, chunk: Chunk, backing: BlockDevice) -> list[tuple[int, int, int]] | None:
        """The Block's uncompressed LZMA2 chunks, when LZMA2 is its only filter (others transform
        the LZMA2 output, so its bytes would not be the guest's)."""
        header_bytes, hdr, csize = self._block_header(chunk, backing)
        if len(hdr.filters) != 1:
            return None
        start = chunk.cstart + len(header_bytes)
        return h.lzma2_uncompressed_chunks(backing.pread, start, start + csize, chunk.usize)

    def layer_info(self) -> dict[str, Any]:
        checks = sorted({h.CHECK_NAMES[s["check"]] for s in self._streams})
        chunks = self._shared.chunks
        info: dict[str, Any] = {
            "streams": len(self._streams),
            "blocks": len(chunks),
            "check": ",".join(checks),
            "largest-block": max((c.usize for c in chunks), default=0),
        }
        try:
            info["decoder"] = f"liblzma {liblzma.version_string()}"
        except UnsupportedFeatureError:
            info["decoder"] = "none: no liblzma found"
        try:
            first = next(c for c in chunks if c.usize)
            size_byte = self.backing.pread(1, first.cstart)[0]
            hdr = h.parse_block_header(self.backing.pread((size_byte + 1) * 4, first.cstart))
            info["filters"] = ",".join(h.FILTER_NAMES[f.id] for f in hdr.filters)
            info["sizes-in-block-headers"] = hdr.compressed_size is not None and hdr.uncompressed_size is not None
        except (StopIteration, CorruptImageError, UnsupportedFeatureError):
            pass
        big = self.big_chunks()
        if big:
            info["large-blocks"] = (f"{big} block(s) larger than max-chunk-memory: decoded once, sequentially, "
                                    f"into a sparse temporary file on first access")
        info.update(self.cache_info())
        return info


def probe(head: bytes, dev: BlockDevice) -> bool:
    return head.startswith(h.HEADER_MAGIC)


def open_xz(dev: BlockDevice, writable: bool, options: dict[str, Any]) -> XzDevice:
    return XzDevice(dev, **{k: options[k] for k in ("cache_size", "max_chunk_memory", "readahead", "tmpdir",
                                                   "memlimit") if k in options})
