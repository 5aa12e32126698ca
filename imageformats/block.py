"""The block device contract and the devices every other layer builds on.

A block device is a random-access view of a guest-visible disk.  Public
methods validate the request once (range, read-only, closed) and then call the
protected ``_readinto`` / ``_pwrite`` / ``_zero`` / ``_trim`` / ``_extents``
hooks that a format implements; a hook can rely on receiving an in-range,
non-empty request.  Positional I/O only: no seek state, so one device may be
used from several threads when the format says so (``clone()`` otherwise).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .errors import (
    ClosedDeviceError,
    DeviceIOError,
    ImageFormatError,
    InvalidArgumentError,
    NoSpaceError,
    NotFastError,
    NotFoundError,
    OutOfRangeError,
    ReadOnlyError,
    UnsupportedFeatureError,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

#: Largest single request a device accepts by default (NBD servers commonly use 32 MiB).
DEFAULT_MAX_REQUEST = 32 * MiB
#: Size of the zero buffer used by the write-zeroes fallback and by zero checks.
_ZERO_CHUNK = 1 * MiB
_ZEROES = bytes(_ZERO_CHUNK)


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of the device with one allocation kind (NBD ``base:allocation`` semantics).

    ``zero``: the run reads as zeroes.  ``hole``: nothing is stored for it in any
    layer (a hole always reads as zeroes, so ``hole`` implies ``zero``).
    """

    start: int
    length: int
    zero: bool
    hole: bool

    @property
    def end(self) -> int:
        return self.start + self.length

    def as_dict(self) -> dict[str, Any]:
        return {"start": self.start, "length": self.length, "zero": self.zero, "hole": self.hole}


def merge_extents(extents: Iterable[Extent]) -> Iterator[Extent]:
    """Merge adjacent extents of the same kind; drop empty ones."""
    pending: Extent | None = None
    for ext in extents:
        if ext.length <= 0:
            continue
        if pending is not None and pending.end == ext.start and (pending.zero, pending.hole) == (ext.zero, ext.hole):
            pending = Extent(pending.start, pending.length + ext.length, ext.zero, ext.hole)
            continue
        if pending is not None:
            yield pending
        pending = ext
    if pending is not None:
        yield pending


def is_zero(buf) -> bool:
    """True when every byte of ``buf`` is zero (numpy speed, no Python loop over bytes).

    (Comparing memoryviews runs element by element at ~0.5 GB/s; numpy's any() is ~20 GB/s.)
    """
    import numpy as np  # lazily: keeps `imageformats --help` fast

    mv = memoryview(buf).cast("B")
    for pos in range(0, len(mv), _ZERO_CHUNK):
        if np.frombuffer(mv[pos : pos + _ZERO_CHUNK], dtype=np.uint8).any():
            return False
    return True


def zero_runs(buf, granule: int = 4096) -> list[tuple[int, int, bool]]:
    """Split ``buf`` into runs ``(start, length, is_data)`` at ``granule`` resolution.

    A run is data unless every byte of each of its granules is zero (the last
    granule may be short).  Vectorised: one numpy reduction for the whole buffer.
    """
    import numpy as np

    mv = memoryview(buf).cast("B")
    n = len(mv)
    if n == 0:
        return []
    full = n - n % granule
    parts = []
    if full:
        if granule % 8 == 0:
            words = np.frombuffer(mv[:full], dtype=np.uint64).reshape(-1, granule // 8)
        else:
            words = np.frombuffer(mv[:full], dtype=np.uint8).reshape(-1, granule)
        parts.append(words.max(axis=1) != 0)  # not any(): it casts every word to bool first, 2x slower
    if full < n:
        parts.append(np.array([np.frombuffer(mv[full:], dtype=np.uint8).any()]))
    mask = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if mask.all():
        return [(0, n, True)]
    if not mask.any():
        return [(0, n, False)]
    edges = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    bounds = [0, *(int(e) * granule for e in edges), n]
    first = bool(mask[0])
    return [(bounds[i], bounds[i + 1] - bounds[i], first if i % 2 == 0 else not first)
            for i in range(len(bounds) - 1)]


class BlockDevice:
    """Abstract random-access device.  Subclasses set ``size`` and implement the hooks.

    Attributes every device has:
      size        guest-visible bytes
      readonly    True unless the device was opened for writing and the format allows it
      block_size  (minimum, preferred, maximum) request sizes in bytes
      format_name short name shown by ``imageformats info`` (``raw``, ``qcow2``...)
      backing     the device this layer reads from, or None for a leaf
    Capability flags used by NBD servers: can_trim, can_zero, can_fast_zero,
    can_extents, can_multi_conn.
    """

    size: int = 0
    readonly: bool = True
    block_size: tuple[int, int, int] = (1, 4096, DEFAULT_MAX_REQUEST)
    format_name: str = "device"
    backing: "BlockDevice | None" = None

    can_trim: bool = False
    can_zero: bool = True
    can_fast_zero: bool = False
    can_extents: bool = False
    can_multi_conn: bool = False
    #: Decodes the data following a sequential reader on its own threads (copy() then reads with one thread).
    reads_ahead: bool = False

    _closed: bool = False

    # -- validation shared by every public method ---------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedDeviceError(f"{self.format_name} device is closed")

    def _check_range(self, length: int, offset: int) -> None:
        self._check_open()
        if offset < 0 or length < 0:
            raise OutOfRangeError(f"negative offset or length (offset {offset}, length {length})")
        if offset + length > self.size:
            raise OutOfRangeError(
                f"request [{offset}, {offset + length}) runs past the end of the {self.size}-byte {self.format_name} device"
            )

    def _check_writable(self, length: int, offset: int) -> None:
        self._check_range(length, offset)
        if self.readonly:
            raise ReadOnlyError(f"{self.format_name} device is read-only")

    # -- public API ------------------------------------------------------------------

    def readinto(self, buf, offset: int) -> None:
        """Fill ``buf`` (any writable buffer) with the bytes at ``offset``, or raise."""
        mv = memoryview(buf).cast("B")
        self._check_range(len(mv), offset)
        if len(mv):
            self._readinto(mv, offset)

    def pread(self, length: int, offset: int) -> bytes:
        """Read ``length`` bytes at ``offset``; never short."""
        self._check_range(length, offset)  # before allocating: a negative or huge length is an error
        buf = bytearray(length)
        self.readinto(buf, offset)
        return bytes(buf)

    def pwrite(self, data, offset: int, *, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; with ``fua`` it is durable when this returns."""
        mv = memoryview(data).cast("B")
        self._check_writable(len(mv), offset)
        if len(mv):
            self._pwrite(mv, offset)
            if fua:
                self.flush()

    def zero(self, length: int, offset: int, *, may_trim: bool = False, fast: bool = False) -> None:
        """Make ``[offset, offset+length)`` read as zeroes.

        ``may_trim``: the device may deallocate the range instead of storing zeroes.
        ``fast``: raise NotFastError rather than fall back to writing zeroes.
        """
        self._check_writable(length, offset)
        if length:
            self._zero(length, offset, may_trim, fast)

    def trim(self, length: int, offset: int) -> None:
        """Advisory discard; the range's content is unspecified afterwards (NBD_CMD_TRIM)."""
        self._check_writable(length, offset)
        if length:
            self._trim(length, offset)

    def flush(self) -> None:
        """Make every completed write durable."""
        self._check_open()

    def extents(self, length: int, offset: int, *, req_one: bool = False) -> Iterator[Extent]:
        """Allocation of ``[offset, offset+length)``: ascending, contiguous, at least one extent.

        The first extent starts at ``offset``; the last may run past the range (but
        never past ``size``).  Adjacent extents of the same kind are merged.  With
        ``req_one`` only the first extent is produced.
        """
        self._check_range(length, offset)
        if length == 0:
            return iter(())
        merged = merge_extents(self._extents(length, offset))
        if req_one:
            return iter([next(merged)])
        return merged

    def file_range(self, length: int, offset: int) -> tuple[int, int] | None:
        """Where ``[offset, offset+length)`` is stored verbatim in one open file, if it is.

        ``(fd, file_offset)`` means the range's bytes are the ``length`` bytes of file
        descriptor ``fd`` at ``file_offset``, so a server may send them with sendfile()
        instead of copying them through Python.  ``fd`` belongs to this device: valid
        until it is closed, never to be closed by the caller.  None (the default) when
        the bytes must come through readinto() (compressed, encrypted, scattered).
        """
        self._check_range(length, offset)
        return self._file_range(length, offset)

    def _file_range(self, length: int, offset: int) -> tuple[int, int] | None:
        return None

    def memory_range(self, length: int, offset: int) -> memoryview | None:
        """The bytes of ``[offset, offset+length)`` as a read-only view of memory the device
        already holds (a decoded cache entry), if they lie in one such buffer.

        Lets a server send cached bytes without copying them first.  The view stays valid
        and its bytes unchanged for as long as the caller holds it (the device does not
        reuse that memory meanwhile); drop it promptly, it pins the memory.  None (the
        default) when the bytes must come through readinto().
        """
        self._check_range(length, offset)
        return self._memory_range(length, offset)

    def _memory_range(self, length: int, offset: int) -> memoryview | None:
        return None

    def head(self, length: int) -> bytes:
        """The first ``length`` bytes (fewer if the device is smaller), for format detection.

        A layer may answer without its usual integrity checks and without caching: a
        compressed device decodes just the start of its first chunk instead of the whole
        chunk (the next layer's own reads are checked as always).  Default: pread().
        """
        return self.pread(min(length, self.size), 0)

    def clone(self) -> "BlockDevice":
        """An independent handle on the same image, for another thread or connection."""
        raise UnsupportedFeatureError(f"{self.format_name} device cannot be cloned")

    def close(self) -> None:
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.format_name} size={self.size}{' ro' if self.readonly else ''}>"

    # -- description for `imageformats info` ----------------------------------------

    def layer_info(self) -> dict[str, Any]:
        """Details of this layer alone (no secrets), shown by ``imageformats info``."""
        return {}

    def layers(self) -> list["BlockDevice"]:
        """This device and the devices below it, top first."""
        out: list[BlockDevice] = []
        dev: BlockDevice | None = self
        while dev is not None:
            out.append(dev)
            dev = dev.backing
        return out

    # -- hooks ---------------------------------------------------------------------

    def _readinto(self, buf: memoryview, offset: int) -> None:
        raise NotImplementedError

    def _pwrite(self, buf: memoryview, offset: int) -> None:
        raise ReadOnlyError(f"{self.format_name} device does not support writing")

    def _zero(self, length: int, offset: int, may_trim: bool, fast: bool) -> None:
        if fast:
            raise NotFastError(f"{self.format_name} device cannot zero faster than writing")
        end = offset + length
        while offset < end:
            n = min(_ZERO_CHUNK, end - offset)
            self._pwrite(memoryview(_ZEROES)[:n], offset)
            offset += n

    def _trim(self, length: int, offset: int) -> None:
        # Trim is advisory: doing nothing is a correct implementation.
        return None

    def _extents(self, length: int, offset: int) -> Iterable[Extent]:
        return [Extent(offset, length, zero=False, hole=False)]


# ---------------------------------------------------------------------------------
# FileDevice


# CDLL(None): the C library the interpreter already links (find_library would run ldconfig on every start-up).
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_sync_file_range = getattr(_libc, "sync_file_range", None)  # Linux
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int
SYNC_FILE_RANGE_WRITE = 0x02
_SEEK_DATA = getattr(os, "SEEK_DATA", 3)
_SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)
#: Largest pwrite() FileDevice issues.  Linux sizes page-cache folios after the write's
#: length; a large folio needs a large free block, and in a VM those are the ones the
#: host has taken back (virtio-balloon free page reporting), so each is faulted in again
#: by the host.  512 MiB written to a new file took 1.1-1.6 s in 4 MiB or 2 MiB pwrites,
#: 0.13 s in 256 KiB ones (Linux 6.18 guest, ext4; bench/pwrite_size.py).
_MAX_PWRITE = 256 * KiB


def _os_error(exc: OSError, what: str) -> ImageFormatError:
    if exc.errno == errno.ENOENT:
        return NotFoundError(f"{what}: no such file or directory")
    if exc.errno == errno.ENOSPC:
        return NoSpaceError(f"{what}: no space left on device")
    if exc.errno in (errno.EROFS, errno.EBADF, errno.EPERM, errno.EACCES):
        return ReadOnlyError(f"{what}: {os.strerror(exc.errno)}")
    return DeviceIOError(f"{what}: {exc.strerror or exc}")


class FileDevice(BlockDevice):
    """A regular file or host block device, accessed with pread/pwrite.

    Extents come from SEEK_DATA/SEEK_HOLE; zero and trim use fallocate (punch
    hole / zero range) with a write fallback; flush is fsync.
    """

    format_name = "file"
    can_trim = True
    can_extents = True
    can_multi_conn = True

    def __init__(self, path: str | os.PathLike | int, *, writable: bool = False, size: int | None = None):
        if isinstance(path, int):
            self.path = None
            self._fd = os.dup(path)
        else:
            self.path = os.fspath(path)
            try:
                self._fd = os.open(self.path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NotFoundError(f"{self.path}: no such file") from None
            except IsADirectoryError:
                raise InvalidArgumentError(f"{self.path}: is a directory") from None
            except OSError as exc:
                raise _os_error(exc, self.path) from None
        self.readonly = not writable
        st = os.fstat(self._fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(self._fd)
            raise InvalidArgumentError(f"{self.path or 'fd'}: is a directory")
        self._regular = stat.S_ISREG(st.st_mode)
        self.size = size if size is not None else (st.st_size if self._regular else os.lseek(self._fd, 0, os.SEEK_END))
        self._lock = threading.Lock()
        # A file with every block allocated has no holes to look for: extents() then answers
        # "data" without two lseek() calls per request.  Shared with clones; set again when
        # we punch a hole.  (Reporting a hole made by another process as data is still true.)
        self._may_have_holes = [not self._regular or st.st_blocks * 512 < st.st_size]

    @classmethod
    def create(cls, path: str | os.PathLike, size: int, *, overwrite: bool = True) -> "FileDevice":
        """Create (or truncate) a sparse file of ``size`` bytes and open it writable."""
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(os.fspath(path), flags, 0o644)
        except OSError as exc:
            raise _os_error(exc, os.fspath(path)) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                os.ftruncate(fd, size)
            dev = cls(fd, writable=True, size=size)
            dev.path = os.fspath(path)
            return dev
        finally:
            os.close(fd)

    @property
    def fd(self) -> int:
        return self._fd

    def _where(self) -> str:
        return self.path or f"fd {self._fd}"

    def _readinto(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            try:
                n = os.preadv(self._fd, [buf[done:]], offset + done)
            except OSError as exc:
                raise _os_error(exc, f"reading {self._where()} at {offset + done}") from None
            if n == 0:
                raise DeviceIOError(f"{self._where()} ended at {offset + done}, expected {offset + len(buf)}")
            done += n

    def _file_range(self, length: int, offset: int) -> tuple[int, int] | None:
        return (self._fd, offset) if self._regular else None

    def _pwrite(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            try:
                n = os.pwrite(self._fd, buf[done:done + _MAX_PWRITE], offset + done)
            except OSError as exc:
                raise _os_error(exc, f"writing {self._where()} at {offset + done}") from None
            done += n

    def _fallocate(self, mode: int, offset: int, length: int) -> bool:
        if _fallocate is None:
            return False
        if mode & FALLOC_FL_PUNCH_HOLE:
            self._may_have_holes[0] = True  # before the call: a failed punch may still leave holes
        if _fallocate(self._fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
            return False
        raise _os_error(OSError(err, os.strerror(err)), f"fallocate on {self._where()}")

    def _zero(self, length: int, offset: int, may_trim: bool, fast: bool) -> None:
        if may_trim and self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        if self._fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        # Some filesystems (tmpfs, older ones) lack ZERO_RANGE but can punch holes.
        if self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        super()._zero(length, offset, may_trim, fast)

    def _trim(self, length: int, offset: int) -> None:
        self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def start_writeback(self) -> None:
        """Start writing the file's dirty pages to disk, without waiting for them.

        A hint (Linux sync_file_range SYNC_FILE_RANGE_WRITE; nothing elsewhere): a
        writer calling it every so often keeps the disk busy while it produces more
        data, and its final flush() has little left to wait for.  Durability still
        comes from flush() alone.
        """
        self._check_open()
        if _sync_file_range is not None and not self.readonly:
            _sync_file_range(self._fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # errors ignored: only a hint

    def flush(self) -> None:
        self._check_open()
        if not self.readonly:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise _os_error(exc, f"fsync of {self._where()}") from None

    def _extents(self, length: int, offset: int) -> Iterator[Extent]:
        end = offset + length
        if not self._regular or not self._may_have_holes[0]:
            yield Extent(offset, length, zero=False, hole=False)
            return
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, _SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                    yield Extent(pos, self.size - pos, zero=True, hole=True)
                    return
                if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    yield Extent(pos, end - pos, zero=False, hole=False)
                    return
                raise _os_error(exc, f"SEEK_DATA on {self._where()}") from None
            data = min(data, self.size)
            if data > pos:
                yield Extent(pos, data - pos, zero=True, hole=True)
                pos = data
                continue
            try:
                hole = os.lseek(self._fd, pos, _SEEK_HOLE)
            except OSError as exc:
                raise _os_error(exc, f"SEEK_HOLE on {self._where()}") from None
            hole = min(hole, self.size)
            if hole <= pos:  # the file shrank under us; report the rest as data
                hole = self.size
            yield Extent(pos, hole - pos, zero=False, hole=False)
            pos = hole

    def clone(self) -> "FileDevice":
        self._check_open()
        dev = FileDevice(self._fd, writable=not self.readonly, size=self.size)
        dev.path = self.path
        dev._may_have_holes = self._may_have_holes
        return dev

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def layer_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self.path:
            info["filename"] = self.path
            try:
                info["disk-size"] = os.fstat(self._fd).st_blocks * 512
            except OSError:
                pass
        return info


# ---------------------------------------------------------------------------------
# MemoryDevice


class MemoryDevice(BlockDevice):
    """A device over a bytearray (tests, small images, headers).  Clones share the bytes."""

    format_name = "memory"
    can_multi_conn = True
    can_fast_zero = True

    def __init__(self, data: bytes | bytearray | int = 0, *, writable: bool = True):
        # An int is a size (zero-filled); a bytearray is shared, not copied.
        self._data = data if isinstance(data, bytearray) else bytearray(data)
        self.size = len(self._data)
        self.readonly = not writable

    @property
    def data(self) -> bytearray:
        return self._data

    def _readinto(self, buf: memoryview, offset: int) -> None:
        buf[:] = memoryview(self._data)[offset : offset + len(buf)]

    def _pwrite(self, buf: memoryview, offset: int) -> None:
        self._data[offset : offset + len(buf)] = buf

    def _zero(self, length: int, offset: int, may_trim: bool, fast: bool) -> None:
        self._data[offset : offset + length] = bytes(length)

    def clone(self) -> "MemoryDevice":
        self._check_open()
        return MemoryDevice(self._data, writable=not self.readonly)


# ---------------------------------------------------------------------------------
# SliceDevice


class SliceDevice(BlockDevice):
    """A window ``[offset, offset+length)`` of another device (nbdkit's offset filter)."""

    format_name = "slice"

    def __init__(self, backing: BlockDevice, offset: int, length: int | None = None, *, writable: bool | None = None):
        if length is None:
            length = backing.size - offset
        if offset < 0 or length < 0 or offset + length > backing.size:
            raise OutOfRangeError(
                f"slice [{offset}, {offset + length}) does not fit in the {backing.size}-byte backing device"
            )
        self.backing = backing
        self.offset = offset
        self.size = length
        self.readonly = backing.readonly if writable is None else (not writable or backing.readonly)
        self.block_size = backing.block_size
        self.can_trim = backing.can_trim
        self.can_fast_zero = backing.can_fast_zero
        self.can_extents = backing.can_extents
        self.can_multi_conn = backing.can_multi_conn
        self.reads_ahead = backing.reads_ahead

    def _readinto(self, buf: memoryview, offset: int) -> None:
        self.backing.readinto(buf, self.offset + offset)

    def _pwrite(self, buf: memoryview, offset: int) -> None:
        self.backing.pwrite(buf, self.offset + offset)

    def _file_range(self, length: int, offset: int) -> tuple[int, int] | None:
        return self.backing.file_range(length, self.offset + offset)

    def _zero(self, length: int, offset: int, may_trim: bool, fast: bool) -> None:
        self.backing.zero(length, self.offset + offset, may_trim=may_trim, fast=fast)

    def _trim(self, length: int, offset: int) -> None:
        self.backing.trim(length, self.offset + offset)

    def flush(self) -> None:
        self._check_open()
        self.backing.flush()

    def _extents(self, length: int, offset: int) -> Iterator[Extent]:
        end = self.offset + self.size
        for ext in self.backing.extents(length, self.offset + offset):
            start = max(ext.start, self.offset)
            stop = min(ext.end, end)
            if stop > start:
                yield Extent(start - self.offset, stop - start, ext.zero, ext.hole)

    def clone(self) -> "SliceDevice":
        return SliceDevice(self.backing.clone(), self.offset, self.size, writable=not self.readonly)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.backing.close()

    def layer_info(self) -> dict[str, Any]:
        return {"offset": self.offset, "length": self.size}


# ---------------------------------------------------------------------------------
# ordered_results


def ordered_results(pool: ThreadPoolExecutor, fn: Callable, jobs: Iterable[tuple], window: int) -> Iterator[Any]:
    """``fn(*job)`` for every job on ``pool``, yielded in the order of ``jobs``.

    At most ``window`` jobs are submitted ahead of the one being consumed, so a slow job
    at the head does not idle the other threads and memory stays bounded (the writers of
    multi-Block xz and seekable zstd files use it to compress on both cores and write in order).
    """
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(fn, *job))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ---------------------------------------------------------------------------------
# PerThreadReader


class PerThreadReader:
    """Read one device from many worker threads: each thread gets its own ``clone()``,
    or shares the device under a lock when it cannot be cloned.  ``close()`` closes the
    clones, never the device itself."""

    def __init__(self, dev: BlockDevice):
        self._dev = dev
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clones: list[BlockDevice] = []

    def readinto(self, buf, offset: int) -> None:
        dev = getattr(self._local, "dev", None)
        if dev is None:
            try:
                dev = self._dev.clone()
                with self._lock:
                    self._clones.append(dev)
            except ImageFormatError:
                dev = self._dev
            self._local.dev = dev
        if dev is self._dev:
            with self._lock:
                dev.readinto(buf, offset)
        else:
            dev.readinto(buf, offset)

    def close(self) -> None:
        with self._lock:
            clones, self._clones = self._clones, []
        for dev in clones:
            dev.close()


# ---------------------------------------------------------------------------------
# copy


@dataclass
class CopyStats:
    data_bytes: int = 0  # bytes read from src and written to dst
    zero_bytes: int = 0  # bytes turned into dst.zero() or skipped as already zero


def _work_items(src: BlockDevice, chunk: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_data) pieces of src, data split into ``chunk``-sized requests."""
    pos = 0
    while pos < src.size:
        for ext in src.extents(src.size - pos, pos):
            start, end = max(ext.start, pos), min(ext.end, src.size)
            if ext.zero:
                yield start, end - start, False
            else:
                for off in range(start, end, chunk):
                    yield off, min(chunk, end - off), True
            pos = end
            if pos >= src.size:
                break


def copy(
    src: BlockDevice,
    dst: BlockDevice,
    progress: Callable[[int, int], None] | None = None,
    *,
    chunk: int = 4 * MiB,
    workers: int | None = None,
    dst_is_zero: bool = False,
    sparse: int = 4096,
) -> CopyStats:
    """Copy the guest view of ``src`` to ``dst`` (same size or larger), sparsely.

    Only data extents are read; zero and hole extents become ``dst.zero(may_trim=True)``,
    or nothing at all when ``dst_is_zero`` says the destination already reads as
    zeroes (a freshly created sparse file).  Runs of all-zero ``sparse``-byte
    blocks inside data extents are treated the same way (like ``qemu-img convert
    -S 4k`` and ``cp --sparse=always``; ``sparse=0`` writes data extents whole).
    With ``workers`` > 1 and devices that can be cloned, chunks are copied on
    that many threads (both cores: the codecs release the GIL in zlib, lzma,
    zstd and OpenSSL).  The default is 2, or 1 when ``src.reads_ahead`` (its own
    threads already decode ahead of one reader; a second reader would only take
    a core from them).  Memory: ``workers * chunk`` buffers.
    ``progress(done, total)`` is called after every piece.
    """
    if sparse < 0 or chunk <= 0:
        raise InvalidArgumentError(f"copy: chunk must be positive and sparse non-negative (chunk {chunk}, sparse {sparse})")
    if workers is None:
        workers = 1 if src.reads_ahead else 2
    if dst.size < src.size:
        raise InvalidArgumentError(f"destination ({dst.size} bytes) is smaller than source ({src.size} bytes)")
    if dst.readonly:
        raise ReadOnlyError("destination is read-only")
    stats = CopyStats()
    done = 0
    lock = threading.Lock()

    def copy_piece(s: BlockDevice, d: BlockDevice, buf: bytearray, offset: int, length: int, is_data: bool) -> None:
        nonlocal done
        if is_data:
            view = memoryview(buf)[:length]
            s.readinto(view, offset)
            runs = zero_runs(view, sparse) if sparse else [(0, length, True)]
        else:
            view = None
            runs = [(0, length, False)]
        data = 0
        for start, n, run_is_data in runs:
            if run_is_data:
                d.pwrite(view[start : start + n], offset + start)
                data += n
            elif not dst_is_zero:
                d.zero(n, offset + start, may_trim=True)
        with lock:
            stats.data_bytes += data
            stats.zero_bytes += length - data
            done += length
            if progress is not None:
                progress(done, src.size)

    handles: list[tuple[BlockDevice, BlockDevice]] = []
    if workers > 1:
        try:
            for _ in range(workers):
                s_clone = src.clone()
                try:
                    handles.append((s_clone, dst.clone()))
                except BaseException:
                    s_clone.close()
                    raise
        except ImageFormatError:
            for s_clone, d_clone in handles:
                s_clone.close()
                d_clone.close()
            handles = []
    if not handles:
        buf = bytearray(chunk)
        for offset, length, is_data in _work_items(src, chunk):
            copy_piece(src, dst, buf, offset, length, is_data)
        return stats

    local = threading.local()
    pool_handles = list(handles)

    def run(item: tuple[int, int, bool]) -> None:
        if not hasattr(local, "handle"):
            with lock:
                local.handle = pool_handles.pop()
            local.buf = bytearray(chunk)
        s, d = local.handle
        copy_piece(s, d, local.buf, *item)

    try:
        with ThreadPoolExecutor(max_workers=len(handles)) as pool:
            pending = []
            for item in _work_items(src, chunk):
                pending.append(pool.submit(run, item))
                if len(pending) >= 2 * len(handles):  # bound the work in flight
                    pending.pop(0).result()
            for fut in pending:
                fut.result()
    finally:
        for s, d in handles:
            s.close()
            d.close()
    return stats


__all__ = [
    "Extent",
    "BlockDevice",
    "FileDevice",
    "MemoryDevice",
    "SliceDevice",
    "copy",
    "CopyStats",
    "PerThreadReader",
    "ordered_results",
    "merge_extents",
    "is_zero",
    "zero_runs",
    "KiB",
    "MiB",
    "GiB",
    "TiB",
]
