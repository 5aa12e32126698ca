"""gzip-patch: change bytes inside stored ranges and fix the CRC-32, crash-safely.

Cost: the map (header), the 8-byte trailer, the stored block headers and old
bytes under the patch, and a 32 KiB inflate after each touched run (the
no-back-reference check) -- O(patch + log size), never the whole file.

The CRC update (see crc.py): ``crc' = crc XOR L(old XOR new) * x^(8 * tail)``
where tail is the number of member bytes after the patched range.

Crash safety (write order):
 1. plan every file write (data pieces and the new trailer) with old and new bytes;
 2. write the journal ``FILE.gzpatch-journal`` (O_EXCL, fsync, fsync of the
    directory): file size, and each write's offset, old bytes, new bytes, with a
    CRC-32 over the journal; this is the commit point;
 3. write the data and the trailer in place, fsync the file;
 4. unlink the journal, fsync the directory.
A crash before 2 completes leaves the file untouched (an incomplete journal
fails its own CRC and is discarded by repair).  A crash after that leaves a
complete journal; :func:`repair` (``gzip-patch --repair``, and automatically at
the start of every patch or writable GzipDevice open) rolls it forward: it
checks that every journalled byte currently holds its old or its new value
(so a file changed since by something else is refused, not clobbered), writes
the new bytes, fsyncs, deletes the journal.  In between, tools that do not know
the journal (zcat, gzip -t) see a CRC error: never silently wrong data.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import zlib

from ..block import FileDevice
from ..errors import CorruptImageError, DeviceIOError, InvalidArgumentError
from . import header as H
from .crc import CRC32
from .layout import GzipLayout, read_layout

JOURNAL_SUFFIX = ".gzpatch-journal"
JOURNAL_MAGIC = b"GZPJNL01"
#: Largest journal written or read back: old + new bytes of a 1 GiB patch, plus headers.
MAX_JOURNAL = (2 << 30) + (16 << 20)


def journal_path(path: str) -> str:
    return os.fspath(path) + JOURNAL_SUFFIX


def coalesce(patches: list[tuple[int, bytes]]) -> list[tuple[int, bytearray]]:
    """Writes applied in order -> disjoint, sorted (start, content) regions (later writes win)."""
    regions: list[tuple[int, bytearray]] = []
    for u, data in patches:
        if not len(data):
            continue
        end = u + len(data)
        keep, merge = [], []
        for r in regions:
            if r[0] + len(r[1]) < u or r[0] > end:
                keep.append(r)
            else:
                merge.append(r)
        if merge:
            start = min(u, merge[0][0])
            stop = max(end, max(r[0] + len(r[1]) for r in merge))
            buf = bytearray(stop - start)
            for r in merge:
                buf[r[0] - start : r[0] - start + len(r[1])] = r[1]
        else:
            start, buf = u, bytearray(len(data))
        buf[u - start : u - start + len(data)] = data
        keep.append((start, buf))
        regions = sorted(keep, key=lambda r: r[0])
    return regions


def plan_gzip(dev, layout: GzipLayout, patches: list[tuple[int, bytes]]) -> list[tuple[int, bytes, bytes]]:
    """File writes (offset, old, new) for uncompressed patches, trailer CRCs included.

    Raises ReadOnlyError (naming the editable ranges) when any byte is outside them.
    """
    writes: list[tuple[int, bytes, bytes]] = []
    deltas: dict[int, int] = {}
    for u, new in coalesce(patches):
        if u < 0 or u + len(new) > layout.size:
            raise InvalidArgumentError(
                f"patch [{u}, {u + len(new)}) runs past the end of the {layout.size}-byte uncompressed data")
        for run, pu, n in layout.locate_editable(u, len(new)):
            member = layout.members[run.member]
            for foff, ln, hoff, blen in run.pieces(pu, n):
                if hoff >= 0:  # a map run: check the block header it points at
                    H.check_stored_header(dev.pread(H.STORED_HEADER, hoff), blen)
                piece_new = bytes(new[pu - u : pu - u + ln])
                piece_old = dev.pread(ln, foff)
                if piece_old != piece_new:
                    writes.append((foff, piece_old, piece_new))
                    tail = member.uend - (pu + ln)
                    deltas[run.member] = deltas.get(run.member, 0) ^ CRC32.patch_delta(piece_old, piece_new, tail)
                pu += ln
    for m, delta in deltas.items():
        if delta:
            member = layout.members[m]
            old = dev.pread(4, member.trailer_offset)
            (crc,) = struct.unpack("<I", old)
            writes.append((member.trailer_offset, old, struct.pack("<I", crc ^ delta)))
            member.crc = crc ^ delta
    return writes


# ---------------------------------------------------------------------------------
# Journal


def encode_journal(file_size: int, writes: list[tuple[int, bytes, bytes]]) -> bytes:
    parts = [JOURNAL_MAGIC, struct.pack("<QI", file_size, len(writes))]
    for off, old, new in writes:
        parts.append(struct.pack("<QI", off, len(old)))
        parts.append(old)
        parts.append(new)
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


def decode_journal(raw: bytes) -> tuple[int, list[tuple[int, bytes, bytes]]] | None:
    """None when the journal is incomplete or damaged (it never became the commit point)."""
    if len(raw) < len(JOURNAL_MAGIC) + 16 or raw[:8] != JOURNAL_MAGIC:
        return None
    (crc,) = struct.unpack_from("<I", raw, len(raw) - 4)
    if zlib.crc32(memoryview(raw)[:-4]) != crc:
        return None
    file_size, count = struct.unpack_from("<QI", raw, 8)
    pos = 20
    writes = []
    for _ in range(count):
        if pos + 12 > len(raw) - 4:
            return None
        off, ln = struct.unpack_from("<QI", raw, pos)
        pos += 12
        if pos + 2 * ln > len(raw) - 4:
            return None
        writes.append((off, raw[pos : pos + ln], raw[pos + ln : pos + 2 * ln]))
        pos += 2 * ln
    return file_size, writes


def _fsync_dir(path: str) -> None:
    d = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(d)
    finally:
        os.close(d)


def _pwrite(fd: int, data: bytes, off: int) -> None:
    mv = memoryview(data)
    while len(mv):
        n = os.pwrite(fd, mv, off)
        mv, off = mv[n:], off + n


def lock_file(fd: int, what: str) -> None:
    """Exclusive advisory lock, so two patchers (or a patcher and a writable GzipDevice) never interleave."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise DeviceIOError(f"{what} is being patched or served writable by another process") from None
        raise


def apply_writes(path: str, fd: int, writes: list[tuple[int, bytes, bytes]]) -> None:
    """Steps 2-4 of the write order (module doc).  The caller holds the lock."""
    if not writes:
        return
    jpath = journal_path(path)
    size = os.fstat(fd).st_size
    if sum(2 * len(new) + 12 for _off, _old, new in writes) + 24 > MAX_JOURNAL:
        raise InvalidArgumentError("patch larger than 1 GiB: split it into several patches")
    record = encode_journal(size, writes)
    try:
        jfd = os.open(jpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise DeviceIOError(f"{jpath} exists: an earlier patch was interrupted; run gzip-patch --repair") from None
    try:
        _pwrite(jfd, record, 0)
        os.fsync(jfd)
    except BaseException:
        os.close(jfd)
        os.unlink(jpath)
        raise
    os.close(jfd)
    _fsync_dir(jpath)
    # Commit point passed: from here a crash is rolled forward by repair().
    for off, _old, new in writes:
        _pwrite(fd, new, off)
    os.fsync(fd)
    os.unlink(jpath)
    _fsync_dir(jpath)


def repair(path: str, fd: int | None = None) -> str:
    """Finish or discard an interrupted patch.  Returns "clean", "discarded" or "replayed"."""
    jpath = journal_path(path)
    try:
        with open(jpath, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_JOURNAL:
                raise CorruptImageError(f"{jpath} is larger than any journal gzip-patch writes")
            raw = f.read()
    except FileNotFoundError:
        return "clean"
    decoded = decode_journal(raw)
    if decoded is None:
        os.unlink(jpath)  # never committed: the file was not touched
        _fsync_dir(jpath)
        return "discarded"
    file_size, writes = decoded
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if own:
            lock_file(fd, path)
        if os.fstat(fd).st_size != file_size:
            raise CorruptImageError(
                f"{path} changed size since the interrupted patch in {jpath}; journal kept, not replayed")
        for off, old, new in writes:
            cur = os.pread(fd, len(new), off)
            if any(c != o and c != n for c, o, n in zip(cur, old, new)) or len(cur) != len(new):
                raise CorruptImageError(
                    f"{path} at offset {off} holds neither the old nor the new bytes of the interrupted patch "
                    f"in {jpath}; journal kept, not replayed")
        for off, _old, new in writes:
            _pwrite(fd, new, off)
        os.fsync(fd)
    finally:
        if own:
            os.close(fd)
    os.unlink(jpath)
    _fsync_dir(jpath)
    return "replayed"


# ---------------------------------------------------------------------------------
# The whole operation


def is_xz(head: bytes) -> bool:
    return head.startswith(b"\xfd7zXZ\x00")


def patch_file(path: str, patches: list[tuple[int, bytes]], *, walk: bool = False) -> dict:
    """Apply uncompressed ``patches`` [(offset, bytes)] to a gzip (or our editable xz) file in place."""
    path = os.fspath(path)
    dev = FileDevice(path, writable=True)
    try:
        lock_file(dev.fd, path)
        repaired = repair(path, dev.fd)
        head = dev.pread(min(6, dev.size), 0)
        if is_xz(head):
            from .xz_stored import plan_xz, read_xz_layout

            layout = read_xz_layout(dev)
            writes = plan_xz(dev, layout, patches)
        else:
            layout = read_layout(dev, walk_always=walk)
            writes = plan_gzip(dev, layout, patches)
        apply_writes(path, dev.fd, writes)
        return {"writes": len(writes), "bytes": sum(len(w[2]) for w in writes), "repaired": repaired,
                "layout": layout.source}
    finally:
        dev.close()


def list_ranges(path: str, *, walk: bool = False) -> tuple[str, int, list[tuple[int, int]]]:
    """(layout source, uncompressed size, editable ranges) of a gzip or editable xz file."""
    with FileDevice(os.fspath(path)) as dev:
        head = dev.pread(min(6, dev.size), 0)
        if is_xz(head):
            from .xz_stored import read_xz_layout

            layout = read_xz_layout(dev)
        else:
            layout = read_layout(dev, walk_always=walk)
        return layout.source, layout.size, layout.editable_ranges()
