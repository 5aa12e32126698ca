"""Data layout of zstd frames (RFC 8878 / zstd_compression_format.md) and of the seekable format
(facebook/zstd contrib/seekable_format/zstd_seekable_compression_format.md).

Only layout: construct Structs, constants, and helpers that parse them.
"""

from __future__ import annotations

import construct as cs

from ..errors import CorruptImageError, UnsupportedFeatureError

# 3.1.1 Zstandard frames: Magic_Number
FRAME_MAGIC = 0xFD2FB528
FRAME_MAGIC_BYTES = FRAME_MAGIC.to_bytes(4, "little")
# 3.1.2 Skippable frames: 0x184D2A5? magic numbers
SKIPPABLE_MASK = 0xFFFFFFF0
SKIPPABLE_MAGIC = 0x184D2A50
# Seekable format: Seek Table Format
SEEK_TABLE_MAGIC = 0x184D2A5E
SEEKABLE_MAGIC = 0x8F92EAB1
SEEK_TABLE_FOOTER_SIZE = 9
#: ZSTD_SEEKABLE_MAXFRAMES of the reference implementation.
MAX_FRAMES = 0x8000000
#: 3.1.1.2 Block_Maximum_Size
BLOCK_MAX = 128 * 1024

# 3.1.1.1.1 Frame_Header_Descriptor
FrameHeaderDescriptor = cs.BitStruct(
    "fcs_flag" / cs.BitsInteger(2),
    "single_segment" / cs.Flag,
    "unused" / cs.Flag,
    "reserved" / cs.Flag,
    "checksum" / cs.Flag,
    "dict_id_flag" / cs.BitsInteger(2),
)

_DICT_ID_SIZES = (0, 1, 2, 4)
_FCS_SIZES = (0, 2, 4, 8)

# 3.1.1.2 Blocks: Block_Header (3 bytes, little-endian)
BlockHeader = cs.ByteSwapped(cs.BitStruct(
    "size" / cs.BitsInteger(21),
    "type" / cs.BitsInteger(2),
    "last" / cs.Flag,
))
BLOCK_RAW, BLOCK_RLE, BLOCK_COMPRESSED, BLOCK_RESERVED = 0, 1, 2, 3

# Seekable format: Seek_Table_Footer
SeekTableFooter = cs.Struct(
    "frames" / cs.Int32ul,
    "descriptor" / cs.BitStruct(
        "checksum" / cs.Flag,
        "reserved" / cs.BitsInteger(5),
        "unused" / cs.BitsInteger(2),
    ),
    "magic" / cs.Const(SEEKABLE_MAGIC, cs.Int32ul),
)
SkippableHeader = cs.Struct(
    "magic" / cs.Int32ul,
    "size" / cs.Int32ul,
)
SeekEntry = cs.Struct(
    "compressed_size" / cs.Int32ul,
    "decompressed_size" / cs.Int32ul,
)
SeekEntryChecksum = cs.Struct(
    "compressed_size" / cs.Int32ul,
    "decompressed_size" / cs.Int32ul,
    "checksum" / cs.Int32ul,
)


def is_skippable(magic: int) -> bool:
    return magic & SKIPPABLE_MASK == SKIPPABLE_MAGIC


def parse_frame_header(data: bytes) -> tuple[int, int | None, bool]:
    """3.1.1.1 Frame_Header -> (header size, content size or None, has checksum).

    ``data`` starts at the magic number and holds at least 18 bytes (or the rest of the file).
    """
    if len(data) < 6 or data[:4] != FRAME_MAGIC_BYTES:
        raise CorruptImageError("zstd frame: bad magic number")
    d = FrameHeaderDescriptor.parse(data[4:5])
    if d.reserved:
        raise CorruptImageError("zstd frame header: reserved bit set")
    pos = 5 + (0 if d.single_segment else 1)
    pos += _DICT_ID_SIZES[d.dict_id_flag]
    if d.dict_id_flag:
        raise UnsupportedFeatureError("zstd frame needs a dictionary (Dictionary_ID set)")
    fcs_size = _FCS_SIZES[d.fcs_flag] if (d.fcs_flag or not d.single_segment) else 1
    if len(data) < pos + fcs_size:
        raise CorruptImageError("zstd frame header is truncated")
    content: int | None = None
    if fcs_size:
        content = int.from_bytes(data[pos:pos + fcs_size], "little")
        if fcs_size == 2:
            content += 256
    return pos + fcs_size, content, bool(d.checksum)


def walk_frame(read, offset: int, end: int) -> tuple[int, int | None, bool]:
    """Follow one frame's Block_Headers from ``offset``: (frame end, content size, has checksum).

    ``read(length, offset) -> bytes``; never reads past ``end``.  Skippable
    frames are walked too (content size 0).
    """
    head = read(min(18, end - offset), offset)
    if len(head) < 8:
        raise CorruptImageError(f"zstd frame at {offset} is truncated")
    magic = int.from_bytes(head[:4], "little")
    if is_skippable(magic):
        stop = offset + 8 + int.from_bytes(head[4:8], "little")
        if stop > end:
            raise CorruptImageError(f"skippable zstd frame at {offset} runs past the end")
        return stop, 0, False
    hsize, content, checksum = parse_frame_header(head)
    pos = offset + hsize
    while True:
        if pos + 3 > end:
            raise CorruptImageError(f"zstd frame at {offset} is truncated (block header at {pos})")
        # BlockHeader, unpacked by hand: this loop runs once per 128 KiB block
        word = int.from_bytes(read(3, pos), "little")
        last, btype, bsize = word & 1, (word >> 1) & 3, word >> 3
        if btype == BLOCK_RESERVED:
            raise CorruptImageError(f"zstd block at {pos} has the reserved block type")
        if bsize > BLOCK_MAX:
            raise CorruptImageError(f"zstd block at {pos} is larger than 128 KiB")
        pos += 3 + (1 if btype == BLOCK_RLE else bsize)
        if last:
            break
    pos += 4 if checksum else 0
    if pos > end:
        raise CorruptImageError(f"zstd frame at {offset} runs past the end of the data")
    return pos, content, checksum


def parse_seek_table(tail: bytes, file_size: int, max_frames: int = MAX_FRAMES) -> tuple[int, bool, list[tuple[int, int, int | None]]] | None:
    """Seek Table at the end of a file: (table frame offset, has checksums, [(csize, dsize, checksum)]).

    ``tail`` is the last bytes of the file (at least the footer; the whole table
    when the caller read enough -- see ``seek_table_size``).  None when the file
    has no seek table (no Seekable_Magic_Number at the very end).
    """
    if len(tail) < SEEK_TABLE_FOOTER_SIZE or int.from_bytes(tail[-4:], "little") != SEEKABLE_MAGIC:
        return None
    ftr = SeekTableFooter.parse(tail[-SEEK_TABLE_FOOTER_SIZE:])
    if ftr.descriptor.reserved:
        raise UnsupportedFeatureError("zstd seek table descriptor has reserved bits set (newer format version?)")
    entry = SeekEntryChecksum if ftr.descriptor.checksum else SeekEntry
    esize = 12 if ftr.descriptor.checksum else 8
    if ftr.frames > MAX_FRAMES:
        raise CorruptImageError(f"zstd seek table claims {ftr.frames} frames")
    if ftr.frames > max_frames:
        raise UnsupportedFeatureError(f"zstd seek table has {ftr.frames} frames, more than the {max_frames} supported")
    table = ftr.frames * esize + SEEK_TABLE_FOOTER_SIZE
    start = file_size - table - 8
    if start < 0:
        raise CorruptImageError(f"zstd seek table of {ftr.frames} frames does not fit in the file")
    if len(tail) < table + 8:
        raise ValueError(table + 8)  # the caller reads more and retries
    raw = tail[len(tail) - table - 8:]
    sk = SkippableHeader.parse(raw[:8])
    if sk.magic != SEEK_TABLE_MAGIC or sk.size != table:
        raise CorruptImageError("zstd seek table: its skippable frame header is missing or has the wrong size")
    entries = []
    for i in range(ftr.frames):
        e = entry.parse(raw[8 + i * esize:8 + (i + 1) * esize])
        entries.append((e.compressed_size, e.decompressed_size, e.get("checksum")))
    return start, bool(ftr.descriptor.checksum), entries


def seek_table_size(tail: bytes) -> int:
    """Bytes from the seek table frame's start to the end of the file (footer must be in ``tail``)."""
    ftr = SeekTableFooter.parse(tail[-SEEK_TABLE_FOOTER_SIZE:])
    return ftr.frames * (12 if ftr.descriptor.checksum else 8) + SEEK_TABLE_FOOTER_SIZE + 8


def build_seek_table(entries: list[tuple[int, int, int | None]], checksums: bool) -> bytes:
    body = bytearray()
    for csize, dsize, checksum in entries:
        if checksums:
            body += SeekEntryChecksum.build({"compressed_size": csize, "decompressed_size": dsize,
                                             "checksum": checksum})
        else:
            body += SeekEntry.build({"compressed_size": csize, "decompressed_size": dsize})
    body += SeekTableFooter.build({"frames": len(entries),
                                   "descriptor": {"checksum": checksums, "reserved": 0, "unused": 0}})
    return SkippableHeader.build({"magic": SEEK_TABLE_MAGIC, "size": len(body)}) + bytes(body)
