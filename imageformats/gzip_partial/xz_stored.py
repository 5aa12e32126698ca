"""Editable xz: ``partial-deflate --format xz`` and gzip-patch for it.

A standard single-stream, multi-block .xz (xz-file-format.txt 1.4.0): stored
ranges become blocks of at most ``STORED_BLOCK`` bytes whose LZMA2 data is only
*uncompressed chunks* (control byte 01 = dictionary reset, then 02; 16-bit
big-endian size-1; at most 64 KiB each; 00 ends the data), compressed ranges
become ordinary LZMA2 blocks compressed on ``threads`` threads.  Each block
starts with a dictionary reset, so no block refers to another and a stored
block's bytes can be changed alone; its check (CRC-32 or CRC-64, section 3.4)
is updated with the same combine algebra as gzip (crc.py).  The block
headers and the Index hold only sizes, so nothing else changes.
"""

from __future__ import annotations

import lzma
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..block import BlockDevice, PerThreadReader, ordered_results
from ..errors import CorruptImageError, InvalidArgumentError, ReadOnlyError, UnsupportedFeatureError
from ..xz import header as xz_header
from ..xz.header import decode_vlis, encode_vli
from .crc import CRC32, CRC64, crc64
from .layout import format_ranges
from .patch import coalesce
from .writer import normalize_stored, segments

# xz-file-format.txt 2.1.1 / 2.1.2
HEADER_MAGIC = b"\xfd7zXZ\x00"
FOOTER_MAGIC = b"YZ"
CHECK_CRC32, CHECK_CRC64 = 0x01, 0x04
CHECK_SIZES = {0x00: 0, 0x01: 4, 0x04: 8, 0x0A: 32}
FILTER_LZMA2 = 0x21
# LZMA2 chunk control bytes (uncompressed chunks)
LZMA2_END, LZMA2_RAW_RESET, LZMA2_RAW = 0x00, 0x01, 0x02
LZMA2_RAW_MAX = 65536
STORED_BLOCK = 16 * LZMA2_RAW_MAX
COMPRESSED_BLOCK = 4 << 20
STORED_DICT_PROP = 16  # 1 MiB dictionary
MAX_INDEX = 1 << 28


def _read_mb(buf: bytes, pos: int) -> tuple[int, int]:
    """One 1.2 multibyte integer at ``pos``: (value, position after it)."""
    (value,), pos = decode_vlis(buf, pos, len(buf), None)
    return value, pos


def _pad4(n: int) -> int:
    return (-n) & 3


def dict_prop(size: int) -> int:
    """5.3.1: the LZMA2 dictionary-size property byte for at least ``size`` bytes."""
    for p in range(40):
        if (2 | (p & 1)) << (p // 2 + 11) >= size:
            return p
    return 40


def block_header(csize: int, usize: int, prop: int) -> bytes:
    """3.1 Block Header with both sizes and one LZMA2 filter."""
    body = bytes([0xC0]) + encode_vli(csize) + encode_vli(usize) + bytes([FILTER_LZMA2, 1, prop])
    total = 1 + len(body) + 4
    total += _pad4(total)
    hdr = bytes([total // 4 - 1]) + body + bytes(total - 4 - 1 - len(body))
    return hdr + struct.pack("<I", zlib.crc32(hdr))


def raw_chunks(view) -> bytes:
    parts = []
    for off in range(0, len(view), LZMA2_RAW_MAX):
        piece = view[off : off + LZMA2_RAW_MAX]
        parts.append(struct.pack(">BH", LZMA2_RAW_RESET if off == 0 else LZMA2_RAW, len(piece) - 1))
        parts.append(piece)
    parts.append(bytes([LZMA2_END]))
    return b"".join(parts)


def _check(kind: int, data) -> bytes:
    if kind == CHECK_CRC32:
        return struct.pack("<I", zlib.crc32(data))
    return struct.pack("<Q", crc64(bytes(data)))


def write_xz(src: BlockDevice, out_path: str, stored: list[tuple[int, int]], *, preset: int = 6,
             check: str = "crc64", threads: int = 2, progress=None) -> dict:
    """Write ``src`` as a .xz whose ``stored`` ranges are blocks of uncompressed LZMA2 chunks."""
    if not 0 <= preset <= 9:
        raise InvalidArgumentError(f"xz preset {preset} is not in 0..9")
    kind = {"crc32": CHECK_CRC32, "crc64": CHECK_CRC64}.get(check)
    if kind is None:
        raise InvalidArgumentError(f"xz check {check!r}: use crc32 or crc64")
    size = src.size
    stored = normalize_stored(stored, size)
    segs = segments(size, stored)
    comp_dict = 1 << max(12, (COMPRESSED_BLOCK - 1).bit_length())
    comp_prop = dict_prop(comp_dict)
    filters = [{"id": lzma.FILTER_LZMA2, "preset": preset, "dict_size": (2 | (comp_prop & 1)) << (comp_prop // 2 + 11)}]
    reader = PerThreadReader(src)

    def work(start: int, end: int, is_stored: bool) -> tuple[bytes, int, int]:
        buf = bytearray(end - start)
        reader.readinto(buf, start)
        if is_stored:
            data, prop = raw_chunks(buf), STORED_DICT_PROP
        else:
            data, prop = lzma.compress(bytes(buf), format=lzma.FORMAT_RAW, filters=filters), comp_prop
        hdr = block_header(len(data), len(buf), prop)
        body = hdr + data + bytes(_pad4(len(hdr) + len(data)))
        chk = _check(kind, buf)
        return body + chk, len(hdr) + len(data) + len(chk), len(buf)

    tmp = f"{out_path}.tmp-{os.getpid()}"
    ok = False
    records: list[tuple[int, int]] = []
    with open(tmp, "wb") as f:
        try:
            f.write(xz_header.build_stream_header(kind))
            done = 0
            jobs = ((a, min(e, a + (STORED_BLOCK if st else COMPRESSED_BLOCK)), st)
                    for s, e, st in segs for a in range(s, e, STORED_BLOCK if st else COMPRESSED_BLOCK))
            with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
                for block, unpadded, n in ordered_results(pool, work, jobs, 3 * max(1, threads)):
                    f.write(block)
                    records.append((unpadded, n))
                    done += n
                    if progress is not None:
                        progress(done, size)
            index = xz_header.build_index(records)
            f.write(index)
            f.write(xz_header.build_stream_footer(kind, len(index)))
            f.flush()
            os.fsync(f.fileno())
            ok = True
        finally:
            reader.close()
            if not ok:
                f.close()
                os.unlink(tmp)
    os.replace(tmp, out_path)
    return {"size": size, "blocks": len(records), "stored": stored}


# ---------------------------------------------------------------------------------
# Layout and patching


@dataclass
class XzBlock:
    offset: int       # file offset of the block header
    ustart: int
    usize: int
    unpadded: int
    stored: bool | None = None  # None: not examined yet
    data_offset: int = 0        # file offset of the LZMA2 data
    check_offset: int = 0

    @property
    def uend(self) -> int:
        return self.ustart + self.usize


class XzLayout:
    source = "xz-index"

    def __init__(self, dev, blocks: list[XzBlock], check: int):
        self.dev = dev
        self.blocks = blocks
        self.check = check
        self.size = blocks[-1].uend if blocks else 0
        self._starts = [b.ustart for b in blocks]

    def examine(self, b: XzBlock) -> XzBlock:
        """Is ``b`` made only of uncompressed LZMA2 chunks?  Reads its header and chunk headers."""
        if b.stored is not None:
            return b
        b.stored = False
        dev = self.dev
        first = dev.pread(1, b.offset)[0]
        hsize = (first + 1) * 4
        if first == 0 or b.offset + hsize > dev.size:
            raise CorruptImageError(f"xz: bad block header at offset {b.offset}")
        hdr = dev.pread(hsize, b.offset)
        if struct.unpack_from("<I", hdr, hsize - 4)[0] != zlib.crc32(hdr[:-4]):
            raise CorruptImageError(f"xz: block header CRC32 mismatch at offset {b.offset}")
        b.data_offset = b.offset + hsize
        csize = b.unpadded - hsize - CHECK_SIZES[self.check]
        b.check_offset = b.data_offset + csize + _pad4(csize)
        flags = hdr[1]
        pos = 2
        if flags & 0x40:
            _, pos = _read_mb(hdr, pos)
        if flags & 0x80:
            _, pos = _read_mb(hdr, pos)
        fid, pos = _read_mb(hdr, pos)
        if flags & 0x03 or fid != FILTER_LZMA2:
            return b  # more filters, or not LZMA2: not editable
        nchunks = -(-b.usize // LZMA2_RAW_MAX)
        if csize != b.usize + 3 * nchunks + 1:
            return b
        try:
            for i in range(nchunks):
                self._chunk_header(b, i)
        except _NotStored:
            return b
        if dev.pread(1, b.data_offset + csize - 1)[0] != LZMA2_END:
            return b
        b.stored = True
        return b

    def _chunk_header(self, b: XzBlock, i: int) -> None:
        raw = self.dev.pread(3, b.data_offset + i * (LZMA2_RAW_MAX + 3))
        ctl, n = struct.unpack(">BH", raw)
        want = min(LZMA2_RAW_MAX, b.usize - i * LZMA2_RAW_MAX)
        if ctl not in (LZMA2_RAW_RESET, LZMA2_RAW) or (i == 0 and ctl != LZMA2_RAW_RESET) or n + 1 != want:
            raise _NotStored()

    def editable_ranges(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for b in self.blocks:
            try:
                self.examine(b)
            except _NotStored:
                b.stored = False
            if b.stored and b.usize:
                if out and out[-1][1] == b.ustart:
                    out[-1] = (out[-1][0], b.uend)
                else:
                    out.append((b.ustart, b.uend))
        return out


class _NotStored(Exception):
    pass


def read_xz_layout(dev) -> XzLayout:
    """Parse the Stream Header, Footer and Index (2.1, 4) of a single-stream .xz."""
    size = dev.size
    if size < 32:
        raise CorruptImageError("xz file too small")
    head = dev.pread(12, 0)
    if head[:6] != HEADER_MAGIC or struct.unpack_from("<I", head, 8)[0] != zlib.crc32(head[6:8]):
        raise CorruptImageError("xz: bad stream header")
    foot = dev.pread(12, size - 12)
    if foot[10:] != FOOTER_MAGIC:
        raise UnsupportedFeatureError("xz: stream padding or several streams (only single-stream files are editable)")
    if struct.unpack_from("<I", foot, 0)[0] != zlib.crc32(foot[4:10]) or foot[8:10] != head[6:8]:
        raise CorruptImageError("xz: bad stream footer")
    check = head[7]
    if check not in CHECK_SIZES:
        raise UnsupportedFeatureError(f"xz check type {check}")
    isize = (struct.unpack_from("<I", foot, 4)[0] + 1) * 4
    if isize > min(MAX_INDEX, size - 24):
        raise CorruptImageError("xz: index size out of range")
    index = dev.pread(isize, size - 12 - isize)
    if index[0] != 0 or struct.unpack_from("<I", index, isize - 4)[0] != zlib.crc32(index[:-4]):
        raise CorruptImageError("xz: bad index")
    count, pos = _read_mb(index, 1)
    if count > isize // 2:
        raise CorruptImageError("xz: index record count out of range")
    blocks = []
    off, u = 12, 0
    for _ in range(count):
        unpadded, pos = _read_mb(index, pos)
        usize, pos = _read_mb(index, pos)
        blocks.append(XzBlock(off, u, usize, unpadded))
        off += unpadded + _pad4(unpadded)
        u += usize
    if off != size - 12 - isize:
        raise CorruptImageError("xz: index does not match the blocks")
    return XzLayout(dev, blocks, check)


def plan_xz(dev, layout: XzLayout, patches: list[tuple[int, bytes]]) -> list[tuple[int, bytes, bytes]]:
    """File writes (offset, old, new) for uncompressed patches, block checks included."""
    algebra = {CHECK_CRC32: CRC32, CHECK_CRC64: CRC64}.get(layout.check)
    csize = CHECK_SIZES[layout.check]
    if algebra is None and csize:
        raise UnsupportedFeatureError("xz: patching files with SHA-256 checks is not supported")
    writes = []
    deltas: dict[int, int] = {}
    import bisect

    for u, new in coalesce(patches):
        end = u + len(new)
        if u < 0 or end > layout.size:
            raise InvalidArgumentError(f"patch [{u}, {end}) runs past the end of the {layout.size}-byte data")
        pos = u
        while pos < end:
            i = bisect.bisect_right(layout._starts, pos) - 1
            while i + 1 < len(layout.blocks) and layout.blocks[i].usize == 0:
                i += 1
            b = layout.blocks[i]
            try:
                layout.examine(b)
            except _NotStored:
                b.stored = False
            if not b.stored:
                raise ReadOnlyError(
                    f"uncompressed range [{u}, {end}) is not inside the editable (stored) ranges "
                    f"{format_ranges(layout.editable_ranges())}; offset {pos} is compressed")
            take = min(end, b.uend) - pos
            rel = pos - b.ustart
            done = 0
            while done < take:
                ci = (rel + done) // LZMA2_RAW_MAX
                within = (rel + done) % LZMA2_RAW_MAX
                n = min(take - done, LZMA2_RAW_MAX - within)
                foff = b.data_offset + ci * (LZMA2_RAW_MAX + 3) + 3 + within
                piece_new = bytes(new[pos - u + done : pos - u + done + n])
                piece_old = dev.pread(n, foff)
                if piece_old != piece_new:
                    writes.append((foff, piece_old, piece_new))
                    if algebra is not None:
                        tail = b.usize - (rel + done + n)
                        deltas[i] = deltas.get(i, 0) ^ algebra.patch_delta(piece_old, piece_new, tail)
                done += n
            pos += take
    for i, delta in deltas.items():
        if delta:
            b = layout.blocks[i]
            old = dev.pread(csize, b.check_offset)
            val = int.from_bytes(old, "little") ^ delta
            writes.append((b.check_offset, old, val.to_bytes(csize, "little")))
    return writes
