"""Data layout of the .xz container (tukaani xz-file-format.txt, version 1.1.0 / 1.2.x).

Only layout lives here: construct Structs, constants, and the small
parse/build helpers that turn bytes into those Structs and back.
"""

from __future__ import annotations

import io
import zlib

import construct as cs
import numpy as np

from ..errors import CorruptImageError, UnsupportedFeatureError

# 2.1.1.1 Header Magic Bytes / 2.1.2.4 Footer Magic Bytes
HEADER_MAGIC = b"\xfd7zXZ\x00"
FOOTER_MAGIC = b"YZ"
STREAM_HEADER_SIZE = 12
STREAM_FOOTER_SIZE = 12

# 2.1.1.2 Stream Flags: Check IDs
CHECK_NONE = 0x00
CHECK_CRC32 = 0x01
CHECK_CRC64 = 0x04
CHECK_SHA256 = 0x0A
CHECK_NAMES = {CHECK_NONE: "none", CHECK_CRC32: "crc32", CHECK_CRC64: "crc64", CHECK_SHA256: "sha256"}
CHECK_BY_NAME = {v: k for k, v in CHECK_NAMES.items()}


def check_size(check_id: int) -> int:
    """3.4 Check: the size of the Check field for a Check ID (reserved IDs included)."""
    if check_id == 0:
        return 0
    return 4 << ((check_id - 1) // 3)


# 5.3 Filter IDs (the ones xz / liblzma can write)
FILTER_NAMES = {
    0x21: "lzma2",
    0x03: "delta",
    0x04: "x86",
    0x05: "powerpc",
    0x06: "ia64",
    0x07: "arm",
    0x08: "armthumb",
    0x09: "sparc",
    0x0A: "arm64",
    0x0B: "riscv",
}

#: 1.2 Multibyte integers: at most 9 bytes, value < 2**63.
VLI_MAX_BYTES = 9
VLI_MAX = (1 << 63) - 1


class _Vli(cs.Construct):
    """1.2 Multibyte Integers: little-endian base-128, minimally encoded, at most 9 bytes."""

    def _parse(self, stream, context, path):
        value = 0
        for i in range(VLI_MAX_BYTES):
            byte = cs.stream_read(stream, 1, path)[0]
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if byte == 0 and i > 0:
                    raise cs.ConstructError("multibyte integer is not minimally encoded", path=path)
                return value
        raise cs.ConstructError("multibyte integer is longer than 9 bytes", path=path)

    def _build(self, obj, stream, context, path):
        if not 0 <= obj <= VLI_MAX:
            raise cs.ConstructError(f"multibyte integer {obj} out of range", path=path)
        out = bytearray()
        while True:
            if obj >= 0x80:
                out.append((obj & 0x7F) | 0x80)
                obj >>= 7
            else:
                out.append(obj)
                break
        cs.stream_write(stream, bytes(out), len(out), path)
        return obj

    def _sizeof(self, context, path):
        raise cs.SizeofError(path=path)


Vli = _Vli()

# 2.1.1.2 Stream Flags (shared by the header and the footer)
StreamFlags = cs.Struct(
    "reserved" / cs.Const(b"\x00"),
    "check" / cs.Int8ul,
)

# 2.1.1 Stream Header
StreamHeader = cs.Struct(
    "magic" / cs.Const(HEADER_MAGIC),
    "flags_raw" / cs.RawCopy(StreamFlags),
    "crc32" / cs.Int32ul,
)

# 2.1.2 Stream Footer
StreamFooter = cs.Struct(
    "crc32" / cs.Int32ul,
    "body" / cs.RawCopy(cs.Struct(
        "backward_size_field" / cs.Int32ul,  # real size = (field + 1) * 4
        "flags" / StreamFlags,
    )),
    "magic" / cs.Const(FOOTER_MAGIC),
)

# 3.1.6 Filter Flags
FilterFlags = cs.Struct(
    "id" / Vli,
    "props_size" / Vli,
    "props" / cs.Bytes(cs.this.props_size),
)

# 3.1 Block Header (without its leading Block Header Size byte and trailing CRC32)
BlockHeaderBody = cs.Struct(
    "flags" / cs.BitStruct(
        "has_uncompressed_size" / cs.Flag,
        "has_compressed_size" / cs.Flag,
        "reserved" / cs.BitsInteger(4),
        "filter_count_minus_one" / cs.BitsInteger(2),
    ),
    "compressed_size" / cs.If(cs.this.flags.has_compressed_size, Vli),
    "uncompressed_size" / cs.If(cs.this.flags.has_uncompressed_size, Vli),
    "filters" / cs.Array(cs.this.flags.filter_count_minus_one + 1, FilterFlags),
)

# 4. Index: Index Indicator, Number of Records, Records (then padding and CRC32)
IndexRecord = cs.Struct(
    "unpadded_size" / Vli,
    "uncompressed_size" / Vli,
)
IndexBody = cs.Struct(
    "indicator" / cs.Const(b"\x00"),
    "count" / Vli,
)


def decode_vlis(data: bytes, pos: int, end: int, count: int | None) -> tuple[list[int], int]:
    """1.2 Multibyte Integers: decode ``count`` of them (one if None) from ``data[pos:end]``.

    Returns (values, position after the last one).  Same rules as ``Vli``.
    """
    values: list[int] = []
    want = 1 if count is None else count
    while len(values) < want:
        value = 0
        for i in range(VLI_MAX_BYTES):
            if pos >= end:
                raise CorruptImageError("xz index: truncated multibyte integer")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if byte == 0 and i > 0:
                    raise CorruptImageError("xz index: multibyte integer is not minimally encoded")
                break
        else:
            raise CorruptImageError("xz index: multibyte integer longer than 9 bytes")
        values.append(value)
    return values, pos


def decode_vlis_np(data: bytes, pos: int, end: int, count: int) -> tuple[list[int], int]:
    """``decode_vlis`` for many integers at once (numpy; an Index can hold millions)."""
    if count == 0:
        return [], pos
    arr = np.frombuffer(data, dtype=np.uint8, count=end - pos, offset=pos)
    ends = np.flatnonzero(arr < 0x80)
    if len(ends) < count:
        raise CorruptImageError("xz index: truncated multibyte integer")
    ends = ends[:count]
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > VLI_MAX_BYTES:
        raise CorruptImageError("xz index: multibyte integer longer than 9 bytes")
    if np.any((arr[ends] == 0) & (lengths > 1)):
        raise CorruptImageError("xz index: multibyte integer is not minimally encoded")
    used = arr[:ends[-1] + 1].astype(np.uint64) & np.uint64(0x7F)
    group_start = np.repeat(starts, lengths)
    shift = (np.arange(len(used), dtype=np.uint64) - group_start.astype(np.uint64)) * np.uint64(7)
    values = np.add.reduceat(used << shift, starts)
    return values.tolist(), pos + int(ends[-1]) + 1


def encode_vli(value: int) -> bytes:
    """1.2 Multibyte Integers (encoder)."""
    if not 0 <= value <= VLI_MAX:
        raise ValueError(f"multibyte integer {value} out of range")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _crc32(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def round4(n: int) -> int:
    return (n + 3) & ~3


# -- helpers -------------------------------------------------------------------------


def parse_stream_header(data: bytes) -> int:
    """2.1.1 Stream Header -> Check ID.  Raises CorruptImageError."""
    try:
        hdr = StreamHeader.parse(data)
    except cs.ConstructError:
        raise CorruptImageError("xz stream header: bad magic bytes or reserved flags") from None
    if _crc32(hdr.flags_raw.data) != hdr.crc32:
        raise CorruptImageError("xz stream header: CRC32 mismatch")
    return hdr.flags_raw.value.check


def parse_stream_footer(data: bytes) -> tuple[int, int]:
    """2.1.2 Stream Footer -> (backward size in bytes, Check ID)."""
    try:
        ftr = StreamFooter.parse(data)
    except cs.ConstructError:
        raise CorruptImageError("xz stream footer: bad magic bytes or reserved flags") from None
    if _crc32(ftr.body.data) != ftr.crc32:
        raise CorruptImageError("xz stream footer: CRC32 mismatch")
    return (ftr.body.value.backward_size_field + 1) * 4, ftr.body.value.flags.check


def build_stream_header(check: int) -> bytes:
    flags = StreamFlags.build({"check": check})
    return StreamHeader.build({"flags_raw": {"data": flags}, "crc32": _crc32(flags)})


def build_stream_footer(check: int, index_size: int) -> bytes:
    body = cs.Struct("b" / cs.Int32ul, "f" / StreamFlags).build({"b": index_size // 4 - 1, "f": {"check": check}})
    return StreamFooter.build({"crc32": _crc32(body), "body": {"data": body}})


def parse_index(data: bytes, max_records: int) -> list[tuple[int, int]]:
    """4. Index -> [(unpadded size, uncompressed size)], checking padding and CRC32."""
    if len(data) < 8 or len(data) % 4:
        raise CorruptImageError(f"xz index: impossible size {len(data)}")
    if _crc32(data[:-4]) != int.from_bytes(data[-4:], "little"):
        raise CorruptImageError("xz index: CRC32 mismatch")
    if data[0] != 0:
        raise CorruptImageError("xz index: missing Index Indicator")
    # IndexBody / IndexRecord, decoded by hand: construct costs ~100 us per record
    values, consumed = decode_vlis(data, 1, len(data) - 4, None)
    count = values[0] if values else 0
    if not values or count > max_records or count > len(data) // 2:
        raise CorruptImageError(f"xz index: {count} records cannot fit in {len(data)} bytes")
    values, consumed = decode_vlis_np(data, consumed, len(data) - 4, 2 * count)
    records = list(zip(values[0::2], values[1::2]))
    for unpadded, _ in records:
        # 4.3.1 Unpadded Size: minimum 5, at most VLI_MAX - 3
        if unpadded < 5 or unpadded > VLI_MAX - 3:
            raise CorruptImageError(f"xz index: invalid unpadded size {unpadded}")
    padding = data[consumed:-4]
    # 4.4 Index Padding: zeroes up to a multiple of four bytes
    if len(padding) != round4(consumed) - consumed or any(padding):
        raise CorruptImageError("xz index: size or padding does not match its records")
    return records


def parse_index_count(data: bytes) -> int:
    """4.2 Number of Records of an Index (0 when unreadable)."""
    try:
        return decode_vlis(data, 1, len(data), None)[0][0]
    except CorruptImageError:
        return 0


def build_index(records: list[tuple[int, int]]) -> bytes:
    out = bytearray(b"\x00" + encode_vli(len(records)))  # IndexBody (built by hand for speed)
    for unpadded, uncompressed in records:
        out += encode_vli(unpadded) + encode_vli(uncompressed)
    out += bytes(round4(len(out)) - len(out))
    out += _crc32(out).to_bytes(4, "little")
    return bytes(out)


def parse_block_header(data: bytes):
    """3.1 Block Header (``data`` = exactly the header) -> construct Container; checks CRC32 and padding."""
    size = (data[0] + 1) * 4
    if data[0] == 0 or len(data) != size:
        raise CorruptImageError("xz block header: bad size byte")
    if _crc32(data[:-4]) != int.from_bytes(data[-4:], "little"):
        raise CorruptImageError("xz block header: CRC32 mismatch")
    stream = io.BytesIO(data[1:-4])
    try:
        hdr = BlockHeaderBody.parse_stream(stream)
    except cs.ConstructError:
        raise CorruptImageError("xz block header: malformed fields") from None
    if hdr.flags.reserved:
        raise UnsupportedFeatureError("xz block header: reserved flag bits are set (newer format version?)")
    # 3.1.6 Header Padding must be zeroes
    if any(stream.read()):
        raise CorruptImageError("xz block header: non-zero header padding")
    for f in hdr.filters:
        if f.id not in FILTER_NAMES:
            raise UnsupportedFeatureError(f"xz block uses unknown filter ID {f.id:#x}")
    if hdr.filters[-1].id != 0x21:
        raise UnsupportedFeatureError(
            f"xz block filter chain ends in {FILTER_NAMES[hdr.filters[-1].id]}, not lzma2")
    return hdr


def build_block_header(filters: list[tuple[int, bytes]], compressed_size: int | None,
                       uncompressed_size: int | None) -> bytes:
    """3.1 Block Header with the given filter chain and (optional) sizes."""
    body = BlockHeaderBody.build({
        "flags": {
            "has_uncompressed_size": uncompressed_size is not None,
            "has_compressed_size": compressed_size is not None,
            "reserved": 0,
            "filter_count_minus_one": len(filters) - 1,
        },
        "compressed_size": compressed_size,
        "uncompressed_size": uncompressed_size,
        "filters": [{"id": fid, "props_size": len(props), "props": props} for fid, props in filters],
    })
    size = round4(1 + len(body) + 4)
    if size > 1024:
        raise ValueError("xz block header too large")
    out = bytes([size // 4 - 1]) + body + bytes(size - 4 - 1 - len(body))
    return out + _crc32(out).to_bytes(4, "little")


# LZMA2 chunk headers (the LZMA2 data inside a Block; xz-file-format.txt 5.3.1 leaves their
# layout to liblzma, whose lzma2_decoder.c describes it): one control byte, then
#   0x00              end of the LZMA2 data
#   0x01, 0x02        an uncompressed chunk (with / without dictionary reset): 2 bytes
#                     big-endian size - 1, then the bytes themselves
#   0x80..0xFF        an LZMA chunk: bits 0-4 are bits 16-20 of (uncompressed size - 1), then
#                     2 bytes big-endian low bits of it, 2 bytes big-endian compressed size - 1,
#                     and one properties byte when bits 5-6 are >= 2
#   0x03..0x7F        invalid
LZMA2_END = 0x00
LZMA2_UNCOMPRESSED = (0x01, 0x02)
LZMA2_MAX_HEADER = 6


def lzma2_uncompressed_chunks(read, start: int, end: int, usize: int) -> list[tuple[int, int, int]]:
    """Where a Block's LZMA2 data stores bytes uncompressed: ``(decoded offset, file offset,
    length)`` of each uncompressed chunk of the LZMA2 data in ``[start, end)`` of a file, read
    with ``read(n, offset)``.  Walks the chunk headers only (no decoding).  Raises
    CorruptImageError unless the chunks account for exactly ``usize`` decoded bytes, end with
    the end marker, and stay inside ``[start, end)``."""
    runs: list[tuple[int, int, int]] = []
    pos = start
    decoded = 0
    while True:
        head = read(min(LZMA2_MAX_HEADER, end - pos), pos) if pos < end else b""
        if not head:
            raise CorruptImageError("LZMA2 data has no end marker")
        control = head[0]
        if control == LZMA2_END:
            break
        if control in LZMA2_UNCOMPRESSED and len(head) >= 3:
            size = int.from_bytes(head[1:3], "big") + 1
            runs.append((decoded, pos + 3, size))
            decoded += size
            pos += 3 + size
        elif control >= 0x80 and len(head) >= 5:
            decoded += ((control & 0x1F) << 16) + int.from_bytes(head[1:3], "big") + 1
            header_size = 6 if (control >> 5) & 3 >= 2 else 5
            pos += header_size + int.from_bytes(head[3:5], "big") + 1
        else:
            raise CorruptImageError(f"LZMA2 chunk header at {pos}: invalid control byte {control:#04x}")
        if decoded > usize or pos > end:
            raise CorruptImageError(f"LZMA2 chunk at {pos} goes past the Block's sizes")
    if decoded != usize:
        raise CorruptImageError(f"LZMA2 chunks decode to {decoded} bytes, the Block holds {usize}")
    return runs
