"""GzipDevice: random access into any gzip, writable inside stored ranges.

Index (zran-style).  An access point is a deflate block boundary (RFC 1951 3.2.3)
with what is needed to resume there: the uncompressed offset, the file offset
of the next whole byte, the 0-7 bits of the previous byte still unread (fed
back with inflatePrime) and the 32 KiB window (inflateSetDictionary).  Points
are taken at the first block boundary after every ``span`` bytes of output
(system zlib's Z_BLOCK stop, see inflate.py) -- any boundary works, aligned or
not.  Every member start is a point with an empty window.

* Any gzip (single or multi-member): the index is built by one scan at open
  (it is also how the uncompressed size of a > 4 GiB or multi-member file is
  learnt), CRC-32 and ISIZE of every member checked on the way.  It can be
  saved and loaded (``index_file=``; ``export_index``/``import``).
* A partial-deflate file (verified ``PD`` map, layout.py): nothing is scanned at
  open.  Stored runs are read straight from the file (each stored block header
  checked), and every compressed range starts on a byte boundary with an empty
  window (the writer never lets it refer back into a stored range), so the
  index of a compressed range is built lazily from its start, only when a read
  first lands in it.

Reads inflate from the nearest point at or before the offset (at most ``span``
bytes of discarded output), and keep the decoder for the next sequential read.

Writes (``writable=True``, backing must be a FileDevice): only inside the
editable ranges (ReadOnlyError elsewhere, naming them).  Writes are kept in
memory (reads see them) and committed by ``flush()``/``close()`` -- or when
more than ``max_pending`` bytes are pending -- with gzip-patch's journalled
write order (patch.py), CRC-32 recombined without reading anything else.
"""

from __future__ import annotations

import bisect
import json
import os
import struct
import threading
import zlib
from typing import Any

from ..block import BlockDevice, FileDevice, MiB
from ..detect import Format, Output, register_format, register_output
from ..errors import CorruptImageError, InvalidArgumentError, UnsupportedFeatureError
from . import header as H
from .inflate import RawInflater
from .layout import (AccessPoint, DeflateScanner, GzipLayout, Member, StoredRun, read_map, runs_from_blocks,
                     scan_members)
from .patch import (MAX_JOURNAL, apply_writes, coalesce, decode_journal, journal_path, lock_file, plan_gzip,
                    repair)

DEFAULT_SPAN = 1 * MiB
INDEX_MAGIC = b"IFGZIDX1"
_IN = 128 * 1024
_OUT = 256 * 1024


class _Region:
    """A stretch of one member that is read by inflating: its points and (lazy) scanner."""

    def __init__(self, ustart: int, uend: int, start: AccessPoint, indexed: bool):
        self.ustart, self.uend = ustart, uend
        self.start = start
        self.indexed_upto = uend if indexed else ustart
        self.scanner: DeflateScanner | None = None


class _Shared:
    """State shared by a device and its clones: layout, index, pending writes."""

    def __init__(self):
        self.lock = threading.RLock()
        self.layout: GzipLayout | None = None
        self.points: list[AccessPoint] = []
        self.point_u: list[int] = []
        self.regions: list[_Region] = []
        self.region_u: list[int] = []
        self.pending: list[tuple[int, bytes]] = []
        self.pending_bytes = 0
        self.span = DEFAULT_SPAN
        self.lazy = False

    def add_points(self, pts) -> None:
        for p in pts:
            i = bisect.bisect_right(self.point_u, p.u)
            if i and self.point_u[i - 1] == p.u and self.points[i - 1].c == p.c:
                continue  # the same point again
            self.point_u.insert(i, p.u)
            self.points.insert(i, p)


class _Cursor:
    """A live decoder positioned at uncompressed ``u`` (file position ``c``)."""

    def __init__(self, point: AccessPoint, limit: int):
        self.inf = RawInflater(bits=point.bits, byte=point.byte, window=point.window)
        self.u = point.u
        self.c = point.c
        self.limit = limit  # file offset the deflate data cannot run past
        self.inbuf = bytearray(_IN)
        self.in_pos = self.in_len = 0
        self.out = bytearray(_OUT)

    def read(self, backing: BlockDevice, dst: memoryview, u: int) -> None:
        """Fill ``dst`` with output from ``u`` (>= self.u) on."""
        done = 0
        stalls = 0
        while done < len(dst):
            if self.inf.finished:
                raise CorruptImageError("deflate stream ended before the expected data")
            if self.in_pos >= self.in_len:
                n = min(_IN, self.limit - self.c)
                if n <= 0:
                    raise CorruptImageError(f"deflate data truncated at file offset {self.c}")
                backing.readinto(memoryview(self.inbuf)[:n], self.c)
                self.in_pos, self.in_len = 0, n
            want = u + len(dst) - self.u  # output still needed from the cursor on
            room = min(_OUT, want) if self.u < u else min(_OUT, len(dst) - done)
            consumed, produced, _ = self.inf.inflate(self.inbuf, self.in_pos, self.in_len, self.out, 0, room)
            self.in_pos += consumed
            self.c += consumed
            if not (consumed or produced):
                stalls += 1
                if stalls > 2:
                    raise CorruptImageError(f"deflate data stalls at file offset {self.c}")
                continue
            stalls = 0
            start = self.u
            self.u += produced
            lo = max(start, u + done)
            if self.u > lo:
                take = min(self.u, u + len(dst)) - lo
                dst[done : done + take] = memoryview(self.out)[lo - start : lo - start + take]
                done += take

    def close(self) -> None:
        self.inf.close()


class GzipDevice(BlockDevice):
    """The uncompressed view of a gzip file on ``backing`` (see the module doc)."""

    format_name = "gzip"

    def __init__(self, backing: BlockDevice, *, writable: bool = False, span: int = DEFAULT_SPAN,
                 index_file: str | None = None, walk: bool = False, max_pending: int = 64 * MiB,
                 _shared: _Shared | None = None):
        self.backing = backing
        self.readonly = not writable
        self.max_pending = max_pending
        self._cursor: _Cursor | None = None
        self._path = getattr(backing, "path", None)
        try:
            if writable:
                if not isinstance(backing, FileDevice) or not self._path or backing.readonly:
                    raise UnsupportedFeatureError(
                        "a writable gzip device needs a writable local file (for the patch journal)")
                lock_file(backing.fd, self._path)
                repair(self._path, backing.fd)
            elif self._path and _interrupted(self._path):
                raise CorruptImageError(
                    f"{self._path} has an interrupted patch ({journal_path(self._path)}): "
                    f"run gzip-patch --repair {self._path}")
            if _shared is not None:
                self._s = _shared
            else:
                if span < 32 * 1024:
                    raise InvalidArgumentError("gzip index span must be at least 32 KiB")
                self._s = _Shared()
                self._s.span = span
                if index_file and os.path.exists(index_file):
                    self._import(index_file)
                else:
                    self._open(walk)
                    if index_file:
                        self.export_index(index_file)
        except BaseException:
            backing.close()
            raise
        self.size = self._s.layout.size

    # -- building the index ---------------------------------------------------------

    def _open(self, walk: bool) -> None:
        s = self._s
        lay = None if walk else read_map(self.backing)
        if lay is not None:
            s.lazy = True
            s.layout = lay
            m = lay.members[0]
            pos_u, pos_c = 0, m.data_offset
            for run in lay.runs + [None]:
                end = run.ustart if run is not None else m.uend
                if end > pos_u:
                    self._add_region(_Region(pos_u, end, AccessPoint(pos_u, pos_c, 0, 0, b""), indexed=False))
                if run is not None:
                    pos_u, pos_c = run.uend, run.end_foffset
            return
        members, stored, points = scan_members(self.backing, span=s.span)
        s.layout = GzipLayout(members, runs_from_blocks(stored), "walk", self.backing.size, self.backing)
        self._index_members(points)

    def _index_members(self, points) -> None:
        s = self._s
        for i, m in enumerate(s.layout.members):
            if m.usize:
                self._add_region(_Region(m.ustart, m.uend, AccessPoint(m.ustart, m.data_offset, 0, 0, b""), True))
        s.add_points(p for i, p in points if s.layout.members[i].usize)

    def _add_region(self, r: _Region) -> None:
        s = self._s
        s.regions.append(r)
        s.region_u.append(r.ustart)
        s.add_points([r.start])

    def _region_of(self, u: int) -> _Region:
        s = self._s
        i = bisect.bisect_right(s.region_u, u) - 1
        return s.regions[i]

    def _extend(self, r: _Region, u: int) -> None:
        """Lazy index: scan region ``r`` until the index covers ``u``."""
        s = self._s
        if r.indexed_upto > u:
            return
        if r.scanner is None:
            r.scanner = DeflateScanner(lambda v, o: self.backing.readinto(v, o), self.backing.size, r.start,
                                       span=s.span, crc=None)
        sc = r.scanner
        target = min(r.uend, u + s.span)
        while sc.u < target and not sc.finished:
            sc.advance(target)
        s.add_points(sc.points)
        sc.points.clear()
        r.indexed_upto = r.uend if sc.finished or sc.u >= r.uend else sc.u
        if sc.finished:
            if sc.u != r.uend and s.layout.source == "map":
                raise CorruptImageError("compressed range decompresses to a different length than the map says")
            sc.close()

    def build_index(self) -> None:
        """Index every compressed range now (a lazy index otherwise grows with reads)."""
        with self._s.lock:
            for r in self._s.regions:
                while r.indexed_upto < r.uend:
                    self._extend(r, r.indexed_upto)

    # -- persistence ------------------------------------------------------------------

    def export_index(self, path: str) -> None:
        """Save the index (complete) so a later open skips the scan."""
        self.build_index()
        s = self._s
        lay = s.layout
        windows = []
        pts = []
        off = 0
        for p in s.points:
            pts.append([p.u, p.c, p.bits, p.byte, off, len(p.window)])
            windows.append(p.window)
            off += len(p.window)
        meta = {
            "version": 1, "file_size": self.backing.size, "size": lay.size, "span": s.span,
            "source": lay.source,
            "members": [[m.offset, m.data_offset, m.ustart, m.usize, m.trailer_offset, m.crc] for m in lay.members],
            "stored": [[u, f, ln, r.member] for r in lay.runs for u, f, ln in _blocks(r)] if lay.source == "walk" else [],
            "points": pts,
        }
        raw = json.dumps(meta).encode()
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(INDEX_MAGIC + struct.pack("<Q", len(raw)) + raw)
            for w in windows:
                f.write(w)
        os.replace(tmp, path)

    def _import(self, path: str) -> None:
        s = self._s
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) != 16 or head[:8] != INDEX_MAGIC:
                raise CorruptImageError(f"{path} is not a gzip index")
            (n,) = struct.unpack("<Q", head[8:])
            # Checked against the file before reading: f.read(n) allocates n bytes up front.
            if n > os.fstat(f.fileno()).st_size - 16:
                raise CorruptImageError(f"{path}: index metadata length {n} runs past the end of the file")
            try:
                meta = json.loads(f.read(n))
                blob = f.read()
                _check_index_numbers(meta, path, self.backing.size)
                if meta["file_size"] != self.backing.size:
                    raise CorruptImageError(f"{path} is the index of a different file (size differs)")
                if meta["source"] == "map":
                    lay = read_map(self.backing)
                    if lay is None:
                        raise CorruptImageError(f"{path} belongs to a partial-deflate file, this one has no map")
                else:
                    members = [Member(*m) for m in meta["members"]]
                    lay = GzipLayout(members, runs_from_blocks([tuple(x) for x in meta["stored"]]), "walk",
                                     self.backing.size, self.backing)
                if lay.size != meta["size"]:
                    raise CorruptImageError(f"{path} is the index of a different file (size differs)")
                s.layout = lay
                s.span = meta["span"]
                points = []
                for u, c, bits, byte, off, wlen in meta["points"]:
                    if off + wlen > len(blob) or wlen > 32768 or not 0 <= bits < 8 or not 0 <= c <= self.backing.size:
                        raise CorruptImageError(f"{path}: access point out of range")
                    points.append(AccessPoint(u, c, bits, byte, blob[off : off + wlen]))
            except (KeyError, TypeError, ValueError) as exc:
                raise CorruptImageError(f"{path}: damaged gzip index ({exc})") from None
        for m in s.layout.members:
            if m.usize:
                self._add_region(_Region(m.ustart, m.uend, AccessPoint(m.ustart, m.data_offset, 0, 0, b""), True))
        if s.layout.source == "map":
            # Regions of the map layout: compressed stretches between runs.
            s.regions.clear()
            s.region_u.clear()
            s.points.clear()
            s.point_u.clear()
            m = s.layout.members[0]
            pos_u, pos_c = 0, m.data_offset
            for run in s.layout.runs + [None]:
                end = run.ustart if run is not None else m.uend
                if end > pos_u:
                    self._add_region(_Region(pos_u, end, AccessPoint(pos_u, pos_c, 0, 0, b""), indexed=True))
                if run is not None:
                    pos_u, pos_c = run.uend, run.end_foffset
        s.add_points(points)

    # -- reading ----------------------------------------------------------------------

    def _readinto(self, buf: memoryview, offset: int) -> None:
        s = self._s
        lay = s.layout
        with s.lock:
            pos, end = offset, offset + len(buf)
            while pos < end:
                run = lay.run_at(pos)
                if run is not None:
                    n = min(end, run.uend) - pos
                    self._read_stored(run, buf[pos - offset : pos - offset + n], pos)
                else:
                    r = self._region_of(pos)
                    stop = min(end, r.uend)
                    i = bisect.bisect_right(lay._run_starts, pos)
                    if i < len(lay.runs):
                        stop = min(stop, lay.runs[i].ustart)
                    n = stop - pos
                    self._read_inflated(r, buf[pos - offset : pos - offset + n], pos)
                pos += n
            if not s.pending:
                self._check_whole_members(buf, offset)
            for u, data in s.pending:
                lo, hi = max(u, offset), min(u + len(data), end)
                if lo < hi:
                    buf[lo - offset : hi - offset] = data[lo - u : hi - u]

    def _check_whole_members(self, buf: memoryview, offset: int) -> None:
        # RFC 1952 2.2/2.3.1: a read that covers a whole member is checked against its CRC-32
        ms = self._s.layout.members
        end = offset + len(buf)
        i = self._s.layout.member_at(offset)
        while i < len(ms) and ms[i].uend <= end:
            m = ms[i]
            if m.ustart >= offset and m.usize and zlib.crc32(buf[m.ustart - offset : m.uend - offset]) != m.crc:
                raise CorruptImageError(
                    f"gzip member at file offset {m.offset}: CRC-32 of the data read does not match its trailer")
            i += 1

    def _read_stored(self, run: StoredRun, dst: memoryview, u: int) -> None:
        done = 0
        for foff, ln, hoff, blen in run.pieces(u, len(dst)):
            if hoff >= 0:
                H.check_stored_header(self.backing.pread(H.STORED_HEADER, hoff), blen)
            self.backing.readinto(dst[done : done + ln], foff)
            done += ln

    def _read_inflated(self, r: _Region, dst: memoryview, u: int) -> None:
        s = self._s
        if s.lazy:
            self._extend(r, u + len(dst) - 1)
        i = bisect.bisect_right(s.point_u, u) - 1
        point = s.points[i]
        cur = self._cursor
        if cur is None or not (point.u <= cur.u <= u) or cur.inf.finished:
            if cur is not None:
                cur.close()
            member = s.layout.members[s.layout.member_at(u)]
            cur = self._cursor = _Cursor(point, member.trailer_offset)
        cur.read(self.backing, dst, u)

    # -- writing ----------------------------------------------------------------------

    def _pwrite(self, buf: memoryview, offset: int) -> None:
        s = self._s
        with s.lock:
            s.layout.locate_editable(offset, len(buf))  # ReadOnlyError naming the ranges
            s.pending.append((offset, bytes(buf)))
            s.pending_bytes += len(buf)
            if s.pending_bytes > self.max_pending:
                self._commit()

    def _commit(self) -> None:
        s = self._s
        if not s.pending:
            return
        regions = coalesce(s.pending)
        writes = plan_gzip(self.backing, s.layout, [(u, bytes(d)) for u, d in regions])
        apply_writes(self._path, self.backing.fd, writes)
        s.pending = []
        s.pending_bytes = 0

    def flush(self) -> None:
        self._check_open()
        if not self.readonly:
            with self._s.lock:
                self._commit()

    def clone(self) -> "GzipDevice":
        self._check_open()
        dev = GzipDevice.__new__(GzipDevice)
        dev.backing = self.backing.clone()
        dev.readonly = self.readonly
        dev.max_pending = self.max_pending
        dev._cursor = None
        dev._path = self._path
        dev._s = self._s
        dev.size = self.size
        return dev

    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.readonly:
                with self._s.lock:
                    self._commit()
        finally:
            self._closed = True
            if self._cursor is not None:
                self._cursor.close()
            self.backing.close()

    def editable_ranges(self) -> list[tuple[int, int]]:
        return self._s.layout.editable_ranges()

    def layer_info(self) -> dict[str, Any]:
        s = self._s
        info: dict[str, Any] = {
            "layout": s.layout.source,
            "members": len(s.layout.members),
            "access-points": len(s.points),
            "span": s.span,
            "stored-runs": len(s.layout.runs),
        }
        if len(s.layout.runs) <= 64:  # each run costs a 32 KiB inflate to check (layout.py)
            info["editable-ranges"] = [[a, b] for a, b in self.editable_ranges()]
        return info


def _check_index_numbers(meta, path: str, file_size: int) -> None:
    """Every number of a loaded index is a plain int in range (the file is input like any other)."""
    def ok(x, hi=1 << 63) -> bool:
        return type(x) is int and 0 <= x < hi

    def rows(key, width):
        val = meta[key]
        if not isinstance(val, list) or not all(isinstance(r, list) and len(r) == width for r in val):
            raise CorruptImageError(f"{path}: damaged gzip index ({key})")
        return val

    if not isinstance(meta, dict) or not ok(meta["span"]) or not meta["span"] or not ok(meta["size"]):
        raise CorruptImageError(f"{path}: damaged gzip index (span/size)")
    for m in rows("members", 6):
        if not all(ok(x) for x in m) or not m[0] <= m[1] <= m[4] <= file_size - 8 or not ok(m[5], 1 << 32):
            raise CorruptImageError(f"{path}: damaged gzip index (member {m})")
    for r in rows("stored", 4):
        if not all(ok(x) for x in r) or r[1] + r[2] > file_size:
            raise CorruptImageError(f"{path}: damaged gzip index (stored run)")
    for p in rows("points", 6):
        if not all(ok(x) for x in p) or p[3] > 255:
            raise CorruptImageError(f"{path}: damaged gzip index (access point)")


def _interrupted(path: str) -> bool:
    """A complete journal next to ``path``: the file may hold a half-written patch."""
    try:
        with open(journal_path(path), "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_JOURNAL:
                return True
            return decode_journal(f.read()) is not None
    except FileNotFoundError:
        return False


def _blocks(run: StoredRun):
    if run.blocklen:
        for i in range(0, run.ulen, run.blocklen):
            hoff = run.fstart + (i // run.blocklen) * (run.blocklen + H.STORED_HEADER)
            yield run.ustart + i, hoff + H.STORED_HEADER, min(run.blocklen, run.ulen - i)
    else:
        for i, u in enumerate(run.block_u):
            end = run.block_u[i + 1] if i + 1 < len(run.block_u) else run.uend
            yield u, run.block_f[i], end - u


# ---------------------------------------------------------------------------------
# Registration


def _probe(head: bytes, dev) -> bool:
    return head[:3] == b"\x1f\x8b\x08"


def _open(dev: BlockDevice, writable: bool, options: dict[str, Any]) -> GzipDevice:
    span = options.get("gzip_span") or DEFAULT_SPAN
    return GzipDevice(dev, writable=writable, span=int(span), index_file=options.get("gzip_index"))


def _write(src: BlockDevice, dst_path: str, options: dict[str, Any], progress=None) -> None:
    from ..cli.common import parse_size
    from .partitions import partition_range
    from .writer import write_gzip

    opts = dict(options)
    level = int(opts.pop("level", 6))
    threads = int(opts.pop("threads", 2))
    stored = []
    for item in [x for x in opts.pop("stored", "").split(";") if x]:
        a, sep, b = item.partition(":")
        if not sep:
            raise InvalidArgumentError(f"gzip option stored={item!r} is not START:END")
        stored.append((parse_size(a), parse_size(b)))
    if "partition" in opts:
        stored.append(partition_range(src, int(opts.pop("partition"))))
    if opts:
        raise InvalidArgumentError(f"unknown gzip output options: {', '.join(sorted(opts))}")
    write_gzip(src, dst_path, stored, level=level, threads=threads, progress=progress)


register_format(Format("gzip", "container", _probe, _open))
register_output(Output("gzip", _write, "gzip, optionally partially deflated (level=, threads=, stored=A:B;C:D, partition=N)"))
