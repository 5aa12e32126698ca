"""partial-deflate: one gzip member whose chosen ranges are deflate *stored* blocks.

Layout of the output (RFC 1952 member around one RFC 1951 stream):

    header (FEXTRA "PD" map of the stored runs)
    for each range, in order:
        stored:     blocks of <= 65535 bytes, each a byte-aligned header byte 00,
                    LEN, NLEN, data (RFC 1951 3.2.4)
        compressed: pieces of CHUNK bytes, each deflated by its own zlib compressobj
                    and ended with Z_SYNC_FLUSH (an empty stored block, byte-aligned),
                    so the pieces concatenate into one valid stream (pigz-style).
    03 00   (final empty fixed-Huffman block)
    CRC-32, ISIZE

A piece inside a compressed range is primed with the previous 32 KiB of the
*same* range as preset dictionary (ratio as good as one stream); the first piece
after a stored range gets no dictionary, so no compressed data ever copies bytes
from a stored range and stored bytes can be changed later without changing
anything else.  Pieces that look incompressible (a level-1 trial of samples)
are written as stored blocks too (like deflate itself would, minus the search).
Pieces are compressed with zlib-ng (zlib when it is missing) on ``threads``
threads (both release the GIL) and their
CRC-32s are joined with :func:`crc.crc32_combine`.
"""

from __future__ import annotations

import os
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from ..block import BlockDevice, PerThreadReader, is_zero

try:  # zlib-ng: the same deflate format, about 2-3x faster than zlib at the same level and ratio
    from zlib_ng import zlib_ng as _deflate
except ImportError:  # pragma: no cover - zlib-ng is a dependency; plain zlib still works
    _deflate = zlib
from ..errors import InvalidArgumentError
from . import header as H
from .crc import CRC32
from .layout import encode_map, map_payload_size

CHUNK = 1 << 20
STORED_CHUNK = H.STORED_MAX * 16
_SAMPLE = 8192


def boundaries_to_stored(bounds: list[int], size: int) -> list[tuple[int, int]]:
    """``B0 B1 B2 ...``: [B0,B1) stored, [B1,B2) compressed, ... the last range runs to EOF."""
    prev = 0
    for b in bounds:
        if b < 0:
            raise InvalidArgumentError(f"boundary {b} is negative")
        if b < prev:
            raise InvalidArgumentError(f"boundaries out of order: {b} comes after {prev}")
        if b > size:
            raise InvalidArgumentError(f"boundary {b} is past the end of the {size}-byte input")
        prev = b
    edges = list(bounds) + [size]
    return [(edges[i], edges[i + 1]) for i in range(0, len(bounds), 2)]


def normalize_stored(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Check ranges against the input size; sort and merge them; drop empty ones."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if s < 0 or e < s:
            raise InvalidArgumentError(f"stored range {s}:{e} is empty-negative or reversed")
        if e > size:
            raise InvalidArgumentError(f"stored range {s}:{e} runs past the end of the {size}-byte input")
        if s == e:
            continue
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def segments(size: int, stored: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """(start, end, is_stored) covering [0, size), no empty pieces."""
    out = []
    pos = 0
    for s, e in stored:
        if s > pos:
            out.append((pos, s, False))
        out.append((s, e, True))
        pos = e
    if pos < size:
        out.append((pos, size, False))
    return out


def _incompressible(view) -> bool:
    n = len(view)
    if n < 4 * _SAMPLE:
        return False
    for off in (0, n // 2, n - _SAMPLE):
        sample = view[off : off + _SAMPLE]
        if len(zlib.compress(sample, 1)) < _SAMPLE * 0.98:
            return False
    return True


def stored_blocks(view) -> bytes:
    parts = []
    for off in range(0, len(view), H.STORED_MAX):
        piece = view[off : off + H.STORED_MAX]
        parts.append(H.stored_block_header(len(piece)))
        parts.append(piece)
    return b"".join(parts)


class _Job:
    __slots__ = ("start", "end", "stored", "dict_from")

    def __init__(self, start, end, stored, dict_from):
        self.start, self.end, self.stored, self.dict_from = start, end, stored, dict_from


def _jobs(segs):
    for s, e, st in segs:
        step = STORED_CHUNK if st else CHUNK
        for a in range(s, e, step):
            b = min(e, a + step)
            yield _Job(a, b, st, a if st else max(s, a - H.MAX_DISTANCE))


def write_gzip(src: BlockDevice, out_path: str, stored: list[tuple[int, int]], *, level: int = 6,
               threads: int = 2, progress=None) -> dict:
    """Write ``src`` to ``out_path`` as a partially deflated gzip; return a summary.

    ``stored`` are uncompressed ranges to keep as stored blocks (normalized here).
    The file appears atomically (written as a temporary, fsynced, renamed); on any
    error nothing is left behind.
    """
    if not -1 <= level <= 9:
        raise InvalidArgumentError(f"compression level {level} is not in 0..9")
    size = src.size
    stored = normalize_stored(stored, size)
    segs = segments(size, stored)
    nruns = len(stored)
    with_map = nruns <= H.MAX_MAP_RUNS
    payload_len = map_payload_size(nruns)
    head = H.build_header(bytes(payload_len) if with_map else None)
    extra_at = len(head) - payload_len if with_map else -1

    tmp = f"{out_path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    zero_cache: dict[int, bytes] = {}
    reader = PerThreadReader(src)

    def work(job: _Job) -> tuple[bytes, int, int]:
        n = job.end - job.dict_from
        buf = bytearray(n)
        reader.readinto(buf, job.dict_from)
        mv = memoryview(buf)
        data = mv[job.start - job.dict_from :]
        crc = _deflate.crc32(data)
        if job.stored or level == 0:
            return stored_blocks(data), crc, len(data)
        zdict = mv[: job.start - job.dict_from]
        if is_zero(data):
            out = zero_cache.get(len(data))
            if out is None:
                co = _deflate.compressobj(level, _deflate.DEFLATED, -15)
                out = co.compress(data) + co.flush(_deflate.Z_SYNC_FLUSH)
                zero_cache[len(data)] = out
            return out, crc, len(data)
        if _incompressible(data):
            return stored_blocks(data), crc, len(data)
        if len(zdict):
            co = _deflate.compressobj(level, _deflate.DEFLATED, -15, 9, _deflate.Z_DEFAULT_STRATEGY, bytes(zdict))
        else:
            co = _deflate.compressobj(level, _deflate.DEFLATED, -15, 9)
        return co.compress(data) + co.flush(_deflate.Z_SYNC_FLUSH), crc, len(data)

    ok = False
    try:
        os.write(fd, head)
        pos = len(head)
        crc = 0
        done = 0
        run_map: list[tuple[int, int, int, int]] = []
        run_iter = iter(stored)
        next_run = next(run_iter, None)
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            pending: deque = deque()
            jobs = _jobs(segs)

            def drain_one():
                nonlocal pos, crc, done, next_run
                job, fut = pending.popleft()
                out, c, n = fut.result()
                if job.stored and next_run is not None and job.start == next_run[0]:
                    run_map.append((next_run[0], next_run[1] - next_run[0], pos, H.STORED_MAX))
                    next_run = next(run_iter, None)
                _write_all(fd, out)
                pos += len(out)
                crc = CRC32.combine(crc, c, n)
                done += n
                if progress is not None:
                    progress(done, size)

            for job in jobs:
                pending.append((job, pool.submit(work, job)))
                if len(pending) >= 3 * max(1, threads):
                    drain_one()
            while pending:
                drain_one()
        _write_all(fd, H.FINAL_EMPTY_BLOCK)
        trailer_offset = pos + len(H.FINAL_EMPTY_BLOCK)
        _write_all(fd, H.Trailer.pack(crc, size & 0xFFFFFFFF))
        if with_map:
            os.pwrite(fd, encode_map(size, trailer_offset, run_map), extra_at)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, out_path)
        ok = True
        return {"size": size, "compressed": trailer_offset + H.TRAILER_SIZE, "crc32": crc,
                "stored": stored, "map": with_map}
    finally:
        reader.close()
        if fd >= 0:
            os.close(fd)
        if not ok:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _write_all(fd: int, data) -> None:
    mv = memoryview(data)
    while len(mv):
        n = os.write(fd, mv)
        mv = mv[n:]
