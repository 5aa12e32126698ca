"""Data layout of gzip members (RFC 1952), deflate stored blocks (RFC 1951) and our FEXTRA map.

Only layout: constants, ``struct.Struct`` layouts and the byte-level parse of a
member header.  Nothing here reads a whole stream.  (``struct`` rather than
construct here: gzip-patch is a command whose whole run should take a few tens
of milliseconds, and importing construct alone costs more than that.)
"""

from __future__ import annotations

import struct

from ..errors import CorruptImageError, UnsupportedFeatureError

# RFC 1952 2.3: member header
MAGIC = b"\x1f\x8b"
CM_DEFLATE = 8
FTEXT, FHCRC, FEXTRA, FNAME, FCOMMENT = 0x01, 0x02, 0x04, 0x08, 0x10
FRESERVED = 0xE0
OS_UNIX = 3
#: Longest FNAME/FCOMMENT we accept before calling the header corrupt.
MAX_HEADER_STRING = 65536

# RFC 1951 3.2.4: a stored block is 3 header bits, padding to a byte, LEN, NLEN, LEN bytes.
STORED_MAX = 65535
STORED_HEADER = 5  # byte-aligned: the header byte (BFINAL/BTYPE/padding) + LEN + NLEN
#: The final empty fixed-Huffman block zlib emits after a flush (BFINAL=1, BTYPE=01, end-of-block).
FINAL_EMPTY_BLOCK = b"\x03\x00"
#: RFC 1951 3.2.5: the longest match distance; data further back can never be referenced.
MAX_DISTANCE = 32768
#: RFC 1951 3.2.5-3.2.7: the most output one byte of deflate data can give.  A match is at most
#: 258 bytes and costs at least 2 bits (a 1-bit length code + a 1-bit distance code), so n bytes of
#: deflate data (block headers and end-of-block codes included) always decode to < 1032 * n bytes.
MAX_DEFLATE_RATIO = 1032

# RFC 1952 2.3.1.1: our FEXTRA subfield "PD" (partial deflate) holding the stored-range map.
MAP_SI = b"PD"
MAP_VERSION = 1
#: version u8, flags u8, count u16 (runs), usize u64 (member size, 64-bit unlike ISIZE),
#: trailer_offset u64 (file offset of CRC32/ISIZE)
MapHeader = struct.Struct("<BBHQQ")
#: ustart u64 (uncompressed offset of the run), ulen u64, fstart u64 (file offset of the first
#: stored block's header byte), blocklen u32 (data bytes per stored block; the last may be shorter)
MapRun = struct.Struct("<QQQI")
MAP_HEADER_SIZE = MapHeader.size
MAP_RUN_SIZE = MapRun.size
#: XLEN is 16 bits: 4 bytes of subfield header, then our map.
MAX_MAP_RUNS = (65535 - 4 - MAP_HEADER_SIZE) // MAP_RUN_SIZE

#: RFC 1952 2.3.1: CRC32, ISIZE (uncompressed size mod 2^32)
Trailer = struct.Struct("<II")
TRAILER_SIZE = 8
#: ID1 ID2 CM FLG MTIME XFL OS
FixedHeader = struct.Struct("<2sBBIBB")
#: SI1 SI2 LEN, then LEN bytes
SubfieldHeader = struct.Struct("<2sH")


def stored_block_header(length: int, final: bool = False) -> bytes:
    """RFC 1951 3.2.4: byte-aligned stored block header for ``length`` data bytes."""
    return struct.pack("<BHH", 1 if final else 0, length, length ^ 0xFFFF)


def check_stored_header(raw: bytes, length: int | None = None) -> int:
    """Validate a byte-aligned stored block header; return LEN."""
    if len(raw) != STORED_HEADER or raw[0] & 0x06:
        raise CorruptImageError("expected a deflate stored block header")
    ln, nln = struct.unpack_from("<HH", raw, 1)
    if ln ^ nln != 0xFFFF:
        raise CorruptImageError("stored block LEN/NLEN mismatch")
    if length is not None and ln != length:
        raise CorruptImageError(f"stored block holds {ln} bytes where the map says {length}")
    return ln


class MemberHeader:
    """A parsed member header: where its deflate data starts and its FEXTRA subfields."""

    def __init__(self, offset: int, data_offset: int, flags: int, extra: dict[bytes, bytes], extra_offset: int):
        self.offset = offset
        self.data_offset = data_offset
        self.flags = flags
        self.extra = extra
        self.extra_offset = extra_offset  # file offset of the first subfield (after XLEN), or -1


def parse_member_header(read, offset: int, file_size: int) -> MemberHeader:
    """RFC 1952 2.3: parse the member header at ``offset``; ``read(length, offset) -> bytes``."""
    if file_size - offset < 10:
        raise CorruptImageError(f"truncated gzip member header at offset {offset}")
    head = read(10, offset)
    if head[:2] != MAGIC:
        raise CorruptImageError(f"no gzip magic at offset {offset}")
    cm, flg = head[2], head[3]
    if cm != CM_DEFLATE:
        raise UnsupportedFeatureError(f"gzip compression method {cm} (only 8, deflate, exists)")
    if flg & FRESERVED:
        raise CorruptImageError(f"reserved gzip header flags set (0x{flg:02x}) at offset {offset}")
    pos = offset + 10
    extra: dict[bytes, bytes] = {}
    extra_offset = -1
    if flg & FEXTRA:
        if file_size - pos < 2:
            raise CorruptImageError("truncated gzip FEXTRA length")
        (xlen,) = struct.unpack("<H", read(2, pos))
        pos += 2
        if file_size - pos < xlen:
            raise CorruptImageError("truncated gzip FEXTRA field")
        raw = read(xlen, pos)
        extra_offset = pos
        i = 0
        while i + 4 <= xlen:
            si = raw[i : i + 2]
            (ln,) = struct.unpack_from("<H", raw, i + 2)
            if i + 4 + ln > xlen:
                break  # malformed subfields: ignore the rest, the data is still valid gzip
            extra.setdefault(si, raw[i + 4 : i + 4 + ln])
            i += 4 + ln
        pos += xlen
    for flag in (FNAME, FCOMMENT):
        if flg & flag:
            start = pos
            while True:
                chunk = read(min(4096, file_size - pos), pos) if pos < file_size else b""
                if not chunk:
                    raise CorruptImageError("truncated gzip file name or comment")
                end = chunk.find(b"\0")
                if end >= 0:
                    pos += end + 1
                    break
                pos += len(chunk)
                if pos - start > MAX_HEADER_STRING:
                    raise CorruptImageError("gzip file name or comment longer than 64 KiB")
    if flg & FHCRC:
        pos += 2
    if pos > file_size:
        raise CorruptImageError("truncated gzip header")
    return MemberHeader(offset, pos, flg, extra, extra_offset)


def build_header(extra_payload: bytes | None) -> bytes:
    """A member header with no name and mtime 0; with our map subfield when given."""
    flg = FEXTRA if extra_payload is not None else 0
    head = FixedHeader.pack(MAGIC, CM_DEFLATE, flg, 0, 0, OS_UNIX)
    if extra_payload is None:
        return head
    sub = SubfieldHeader.pack(MAP_SI, len(extra_payload)) + extra_payload
    return head + struct.pack("<H", len(sub)) + sub
