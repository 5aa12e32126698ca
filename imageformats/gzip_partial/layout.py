"""Where the bytes of a gzip file are: members, stored blocks, editable ranges.

Two ways to learn the layout of a gzip file:

* ``walk``: inflate every member (system zlib, stopping at each deflate block
  boundary with Z_BLOCK) and record every stored block (RFC 1951 3.2.4) with its
  uncompressed offset and the file offset of its data.  Works on any gzip, costs
  one decompression, needs no side file.
* the ``PD`` FEXTRA map that partial-deflate writes into the member header: O(1).
  It is checked, never trusted blindly: the member must be the only one, the
  trailer must sit where the map says with a matching ISIZE, the stored block
  headers at both ends of every run must be where the map puts them (and every
  header a patch or read touches is checked again), no compressed stretch may
  claim more output than deflate can give (``MAX_DEFLATE_RATIO``; ISIZE checks the
  64-bit size mod 2^32 only), and the data after each run must not refer back
  into it (below).

Editable means more than "stored": a later Huffman block may copy bytes from up
to 32 KiB back (RFC 1951 3.2.5), so changing stored bytes it copies from would
silently change data further on.  A run of stored blocks is editable up to its
end only if inflating the 32 KiB of output that follow it *with an empty
window* succeeds (zlib rejects any distance reaching before the start with
"invalid distance too far back"); otherwise its last 32 KiB are not editable.
"""

from __future__ import annotations

import bisect
import struct
import zlib
from dataclasses import dataclass, field

from ..errors import CorruptImageError, ReadOnlyError
from . import header as H
from .inflate import RawInflater

IN_CHUNK = 1 << 20
OUT_CHUNK = 1 << 20
#: At most this many windowed access points per scanned stream (32 KiB each: 128 MiB);
#: beyond it every other point is dropped and the span doubles (memory stays bounded
#: even for a decompression bomb).
MAX_POINTS = 4096


@dataclass
class Member:
    """One gzip member (RFC 1952 2.2)."""

    offset: int          # file offset of the member header
    data_offset: int     # file offset of the deflate stream
    ustart: int          # uncompressed offset of its first byte
    usize: int           # uncompressed bytes in it
    trailer_offset: int  # file offset of CRC32/ISIZE
    crc: int             # CRC-32 from the trailer

    @property
    def uend(self) -> int:
        return self.ustart + self.usize


@dataclass
class StoredRun:
    """Consecutive stored blocks of one member: uncompressed [ustart, ustart+ulen).

    Blocks are described either uniformly (``blocklen`` > 0: block i holds
    ``blocklen`` bytes, its header at ``fstart + i * (blocklen + 5)``) or by the
    lists ``block_u`` / ``block_f`` (uncompressed start, file offset of data).
    """

    member: int
    ustart: int
    ulen: int
    fstart: int = 0
    blocklen: int = 0
    block_u: list[int] = field(default_factory=list)
    block_f: list[int] = field(default_factory=list)
    editable_len: int = -1  # bytes from ustart that may be changed (-1: not checked yet)

    @property
    def uend(self) -> int:
        return self.ustart + self.ulen

    @property
    def end_foffset(self) -> int:
        """File offset just after the run's last stored block."""
        if self.blocklen:
            n = -(-self.ulen // self.blocklen)
            return self.fstart + n * H.STORED_HEADER + self.ulen
        return self.block_f[-1] + (self.uend - self.block_u[-1])

    def pieces(self, u: int, n: int) -> list[tuple[int, int, int, int]]:
        """(file offset, length, header offset, block length) for uncompressed [u, u+n) in this run."""
        out = []
        end = u + n
        while u < end:
            if self.blocklen:
                i = (u - self.ustart) // self.blocklen
                bu = self.ustart + i * self.blocklen
                blen = min(self.blocklen, self.uend - bu)
                hoff = self.fstart + i * (self.blocklen + H.STORED_HEADER)
                fdata = hoff + H.STORED_HEADER
            else:
                i = bisect.bisect_right(self.block_u, u) - 1
                bu = self.block_u[i]
                bend = self.block_u[i + 1] if i + 1 < len(self.block_u) else self.uend
                blen = bend - bu
                fdata = self.block_f[i]
                hoff = -1  # header not necessarily byte aligned at a known place
            take = min(end, bu + blen) - u
            out.append((fdata + (u - bu), take, hoff, blen))
            u += take
        return out


class GzipLayout:
    """Members and stored runs of a gzip file, from the FEXTRA map or a walk."""

    def __init__(self, members: list[Member], runs: list[StoredRun], source: str, file_size: int, dev=None):
        self.dev = dev
        self.members = members
        self.runs = runs
        self.source = source  # "map" or "walk"
        self.file_size = file_size
        self.size = members[-1].uend if members else 0
        self._run_starts = [r.ustart for r in runs]

    def checked(self, run: StoredRun) -> StoredRun:
        """The run with ``editable_len`` known (checked on first use, see the module doc)."""
        if run.editable_len < 0:
            check_run_editable(self.dev, run, self.members[run.member])
        return run

    def editable_ranges(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for r in self.runs:
            self.checked(r)
            if r.editable_len > 0:
                s, e = r.ustart, r.ustart + r.editable_len
                if out and out[-1][1] == s:
                    out[-1] = (out[-1][0], e)
                else:
                    out.append((s, e))
        return out

    def run_at(self, u: int) -> StoredRun | None:
        i = bisect.bisect_right(self._run_starts, u) - 1
        if i >= 0 and u < self.runs[i].uend:
            return self.runs[i]
        return None

    def member_at(self, u: int) -> int:
        starts = self.__dict__.get("_member_starts")
        if starts is None or len(starts) != len(self.members):
            starts = self._member_starts = [m.ustart for m in self.members]
        i = bisect.bisect_right(starts, u) - 1
        while i > 0 and self.members[i].usize == 0:
            i -= 1
        return max(i, 0)

    def locate_editable(self, u: int, n: int) -> list[tuple[StoredRun, int, int]]:
        """Split [u, u+n) into (run, start, length) pieces, or raise ReadOnlyError naming the editable ranges."""
        out = []
        pos, end = u, u + n
        while pos < end:
            run = self.run_at(pos)
            if run is not None:
                self.checked(run)
            if run is None or pos >= run.ustart + run.editable_len:
                raise ReadOnlyError(
                    f"uncompressed range [{u}, {end}) is not inside the editable (stored) ranges "
                    f"{format_ranges(self.editable_ranges())}; offset {pos} is compressed or not editable"
                )
            take = min(end, run.ustart + run.editable_len) - pos
            out.append((run, pos, take))
            pos += take
        return out


def format_ranges(ranges: list[tuple[int, int]]) -> str:
    if not ranges:
        return "(none)"
    return ", ".join(f"[{s}, {e})" for s, e in ranges)


# ---------------------------------------------------------------------------------
# The scanner: inflate from a block boundary, reporting block boundaries.


@dataclass
class AccessPoint:
    """A deflate block boundary to resume inflating at (zran): uncompressed ``u``,
    next whole byte at file offset ``c``, ``bits`` bits of byte ``c-1`` (``byte``)
    still unread, ``window`` the preceding up to 32 KiB of output."""

    u: int
    c: int
    bits: int
    byte: int
    window: bytes


class DeflateScanner:
    """Inflate one member's deflate stream with Z_BLOCK stops, from its start or an access point.

    ``advance(stop_u)`` runs until at least ``stop_u`` bytes are out (or the end),
    appending to ``points`` (every ``span`` bytes, at block boundaries) and
    ``stored`` ((ustart, data file offset, length) of each stored block).
    With ``crc`` (the start value), the CRC-32 of the output is kept.
    """

    def __init__(self, read, file_size: int, start: AccessPoint, *, span: int = 0, crc: int | None = None,
                 want_windows: bool = True):
        self.read = read  # read(buf_view, offset)
        self.file_size = file_size
        self.inf = RawInflater(bits=start.bits, byte=start.byte, window=start.window)
        self.u = start.u
        self.c = start.c
        self.span = span
        self.crc = crc
        self.points: list[AccessPoint] = []
        self.stored: list[tuple[int, int, int]] = []
        self.finished = False
        self.want_windows = want_windows
        self._last_point = start.u
        self._emitted = 0
        self._buf = bytearray(IN_CHUNK)
        self._len = 0
        self._pos = 0
        self._prev = start.byte
        self._out = bytearray(OUT_CHUNK)
        self._pending: tuple[int, int] | None = None
        self._boundary(start.bits)

    def _fill(self) -> None:
        left = self._len - self._pos
        if left >= 16:
            return
        buf = self._buf
        if self._pos:
            buf[0:left] = buf[self._pos : self._len]
            self._pos, self._len = 0, left
        foff = self.c + left
        n = min(len(buf) - left, self.file_size - foff)
        if n > 0:
            self.read(memoryview(buf)[left : left + n], foff)
            self._len += n

    def _boundary(self, bits: int) -> None:
        if self._pending is not None:
            su, sf = self._pending
            self._pending = None
            if self.u > su:
                self.stored.append((su, sf, self.u - su))
        self._fill()
        if bits:
            hdr = self._prev >> (8 - bits)
            if bits < 3 and self._pos < self._len:
                hdr |= self._buf[self._pos] << bits
            elif bits < 3:
                return
        elif self._pos < self._len:
            hdr = self._buf[self._pos]
        else:
            return
        if (hdr >> 1) & 3 == 0:  # BTYPE 00: stored
            p = self.c * 8 - bits + 3
            self._pending = (self.u, (p + 7) // 8 + 4)

    def advance(self, stop_u: int | None = None) -> None:
        inf = self.inf
        stalls = 0
        while not self.finished and (stop_u is None or self.u < stop_u):
            self._fill()
            if self._pos >= self._len:
                raise CorruptImageError(f"deflate data truncated at file offset {self.c}")
            consumed, produced, dt = inf.inflate(self._buf, self._pos, self._len, self._out, 0, OUT_CHUNK, block=True)
            if consumed:
                self._prev = self._buf[self._pos + consumed - 1]
                self._pos += consumed
                self.c += consumed
            if produced:
                if self.crc is not None:
                    self.crc = zlib.crc32(memoryview(self._out)[:produced], self.crc)
                self.u += produced
            if consumed or produced:
                stalls = 0
            else:
                stalls += 1
                if stalls > 2 and not (dt & 128):
                    raise CorruptImageError(f"deflate data stalls at file offset {self.c}")
            if inf.finished:
                self.finished = True
                self._boundary(0)
                break
            if dt & 128:
                bits = dt & 7
                if self.span and self.u - self._last_point >= self.span and not dt & 64:
                    window = inf.window() if self.want_windows else b""
                    self.points.append(AccessPoint(self.u, self.c, bits, self._prev if bits else 0, window))
                    self._last_point = self.u
                    self._emitted += 1
                    if self._emitted >= MAX_POINTS:
                        self.points[:] = self.points[1::2] if len(self.points) > 1 else self.points
                        self._emitted //= 2
                        self.span *= 2
                self._boundary(bits)
        if self.finished:
            inf.close()

    def close(self) -> None:
        self.inf.close()


def _reader(dev):
    return lambda view, off: dev.readinto(view, off)


def _pread(dev):
    return lambda n, off: dev.pread(n, off)


def next_member_offset(dev, pos: int) -> int | None:
    """After a member ending at ``pos``: the next member's offset, or None at the end.

    Trailing zero bytes (tape padding) are ignored like gzip does; anything else is an error.
    """
    size = dev.size
    if pos >= size:
        return None
    head = dev.pread(min(2, size - pos), pos)
    if head == H.MAGIC:
        return pos
    # Only zero padding may follow the last member.
    while pos < size:
        n = min(1 << 20, size - pos)
        if dev.pread(n, pos).count(0) != n:
            raise CorruptImageError(f"trailing garbage after the gzip member ending at offset {pos}")
        pos += n
    return None


def scan_members(dev, *, span: int = 0, verify_crc: bool = True, want_windows: bool = True,
                 progress=None):
    """Walk every member of a gzip on ``dev``.

    Returns (members, stored blocks [(ustart, data foffset, len, member index)],
    access points [(member index, AccessPoint)]).
    """
    members: list[Member] = []
    stored: list[tuple[int, int, int, int]] = []
    points: list[tuple[int, AccessPoint]] = []
    pos: int | None = 0
    u = 0
    size = dev.size
    if size == 0:
        raise CorruptImageError("empty file is not gzip")
    while pos is not None:
        mh = H.parse_member_header(_pread(dev), pos, size)
        start = AccessPoint(u, mh.data_offset, 0, 0, b"")
        idx = len(members)
        points.append((idx, start))
        sc = DeflateScanner(_reader(dev), size, start, span=span, crc=0 if verify_crc else None,
                            want_windows=want_windows)
        while not sc.finished:
            sc.advance(sc.u + (64 << 20))
            if progress is not None:
                progress(sc.c, size)
        end = sc.c
        if size - end < H.TRAILER_SIZE:
            raise CorruptImageError(f"gzip member at offset {pos} has no trailer (file truncated)")
        crc, isize = struct.unpack("<II", dev.pread(8, end))
        usize = sc.u - u
        if verify_crc and crc != sc.crc:
            raise CorruptImageError(
                f"CRC-32 mismatch in gzip member at offset {pos}: trailer 0x{crc:08x}, data 0x{sc.crc:08x}")
        if isize != usize & 0xFFFFFFFF:
            raise CorruptImageError(
                f"ISIZE mismatch in gzip member at offset {pos}: trailer {isize}, data {usize} mod 2^32")
        members.append(Member(pos, mh.data_offset, u, usize, end, crc))
        stored.extend((su, sf, ln, idx) for su, sf, ln in sc.stored)
        points.extend((idx, p) for p in sc.points)
        u = sc.u
        pos = next_member_offset(dev, end + H.TRAILER_SIZE)
    return members, stored, points


def runs_from_blocks(stored: list[tuple[int, int, int, int]]) -> list[StoredRun]:
    runs: list[StoredRun] = []
    for su, sf, ln, m in stored:
        r = runs[-1] if runs else None
        if r is not None and r.member == m and r.uend == su:
            r.ulen += ln
            r.block_u.append(su)
            r.block_f.append(sf)
        else:
            runs.append(StoredRun(m, su, ln, block_u=[su], block_f=[sf]))
    return runs


def check_run_editable(dev, run: StoredRun, member: Member) -> None:
    """Set ``run.editable_len``: the whole run unless data after it may copy from it (see module doc)."""
    if run.uend >= member.uend:
        run.editable_len = run.ulen
        return
    foff = run.end_foffset
    d = zlib.decompressobj(-15)
    got = 0
    ok = True
    pos = foff
    try:
        while got < H.MAX_DISTANCE and pos < member.trailer_offset + H.TRAILER_SIZE and not d.eof:
            n = min(4096, member.trailer_offset + H.TRAILER_SIZE - pos)
            chunk = d.unconsumed_tail + dev.pread(n, pos)
            pos += n
            out = d.decompress(chunk, H.MAX_DISTANCE - got)
            got += len(out)
            while d.unconsumed_tail and got < H.MAX_DISTANCE:
                out = d.decompress(d.unconsumed_tail, H.MAX_DISTANCE - got)
                got += len(out)
                if not out:
                    break
    except zlib.error:
        ok = False
    run.editable_len = run.ulen if ok else max(0, run.ulen - H.MAX_DISTANCE)


def walk(dev, *, verify_crc: bool = True, progress=None) -> GzipLayout:
    """The layout of any gzip, by inflating it once (no side file needed)."""
    members, stored, _ = scan_members(dev, verify_crc=verify_crc, want_windows=False, progress=progress)
    return GzipLayout(members, runs_from_blocks(stored), "walk", dev.size, dev)


# ---------------------------------------------------------------------------------
# The FEXTRA map partial-deflate writes.


def encode_map(usize: int, trailer_offset: int, runs: list[tuple[int, int, int, int]]) -> bytes:
    out = [H.MapHeader.pack(H.MAP_VERSION, 0, len(runs), usize, trailer_offset)]
    for ustart, ulen, fstart, blocklen in runs:
        out.append(H.MapRun.pack(ustart, ulen, fstart, blocklen))
    return b"".join(out)


def map_payload_size(nruns: int) -> int:
    return H.MAP_HEADER_SIZE + nruns * H.MAP_RUN_SIZE


def read_map(dev) -> GzipLayout | None:
    """The layout from our FEXTRA map, verified against the file; None when absent or not matching."""
    size = dev.size
    try:
        mh = H.parse_member_header(_pread(dev), 0, size)
    except CorruptImageError:
        raise
    payload = mh.extra.get(H.MAP_SI)
    if payload is None or len(payload) < H.MAP_HEADER_SIZE:
        return None
    version, _flags, count, usize, trailer_offset = H.MapHeader.unpack_from(payload)
    if version != H.MAP_VERSION or len(payload) != map_payload_size(count):
        return None
    # Single member ending exactly at the end of the file (nothing appended since).
    if trailer_offset + H.TRAILER_SIZE != size or trailer_offset < mh.data_offset:
        return None
    crc, isize = H.Trailer.unpack(dev.pread(8, trailer_offset))
    if isize != usize & 0xFFFFFFFF:
        return None
    runs: list[StoredRun] = []
    prev_end = 0
    prev_f = mh.data_offset
    for i in range(count):
        ustart, ulen, fstart, blocklen = H.MapRun.unpack_from(payload, H.MAP_HEADER_SIZE + i * H.MAP_RUN_SIZE)
        if (ulen <= 0 or blocklen <= 0 or blocklen > H.STORED_MAX or ustart < prev_end
                or ustart + ulen > usize or fstart < prev_f
                or ustart - prev_end > H.MAX_DEFLATE_RATIO * (fstart - prev_f)):
            return None
        run = StoredRun(0, ustart, ulen, fstart=fstart, blocklen=blocklen)
        if run.end_foffset > trailer_offset:
            return None
        # The headers of the first and last blocks must be where the map says.
        nblocks = -(-ulen // blocklen)
        for b in {0, nblocks - 1}:
            hoff = fstart + b * (blocklen + H.STORED_HEADER)
            blen = min(blocklen, ulen - b * blocklen)
            try:
                H.check_stored_header(dev.pread(H.STORED_HEADER, hoff), blen)
            except CorruptImageError:
                return None
        runs.append(run)
        prev_end = ustart + ulen
        prev_f = run.end_foffset
    # The map's 64-bit sizes are covered by nothing (FEXTRA has no check without FHCRC, RFC 1952
    # 2.3.1) and ISIZE checks usize mod 2^32 only: a flipped high bit would make a device of up
    # to 2^64 bytes.  Every compressed stretch can hold at most MAX_DEFLATE_RATIO times its bytes.
    if usize - prev_end > H.MAX_DEFLATE_RATIO * (trailer_offset - prev_f):
        return None
    member = Member(0, mh.data_offset, 0, usize, trailer_offset, crc)
    return GzipLayout([member], runs, "map", size, dev)


def read_layout(dev, *, walk_always: bool = False, verify_crc: bool = True) -> GzipLayout:
    """The map when present and consistent, else a walk of the whole file."""
    if not walk_always:
        lay = read_map(dev)
        if lay is not None:
            return lay
    return walk(dev, verify_crc=verify_crc)
