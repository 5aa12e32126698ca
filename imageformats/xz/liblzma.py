"""A thin ctypes wrapper around liblzma's .xz Stream decoder that writes into the caller's buffer.

Python's ``lzma.LZMADecompressor`` hands back every decoded piece as a new bytes
object: for a 16 MiB Block that is a fresh allocation (page faults, and an munmap
that stalls every other thread when it is freed) plus another copy into the
Block cache.  liblzma itself decodes into any buffer, so a Block goes straight
into the one array the cache keeps.  The ctypes calls release the GIL, so Blocks
decode on both cores.  liblzma verifies the Block Header CRC32, the Block's
Check and the sizes against the Index, exactly as when Python's lzma module
drives it.

Which liblzma: the newest of the system's liblzma.so.5 and the copy bundled in
imagecodecs' wheel (a dependency).  liblzma 5.6 rewrote the hot loops of the
LZMA decoder; on Debian 12 (liblzma 5.4.1) the bundled 5.8 decodes the same
Blocks in about half the CPU time (bench/xz_liblzma.py).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os

from ..errors import UnsupportedFeatureError

# lzma/base.h: lzma_ret
LZMA_OK = 0
LZMA_STREAM_END = 1
LZMA_MEM_ERROR = 5
LZMA_MEMLIMIT_ERROR = 6
LZMA_FORMAT_ERROR = 7
LZMA_OPTIONS_ERROR = 8
LZMA_DATA_ERROR = 9
LZMA_BUF_ERROR = 10
# lzma/base.h: lzma_action
LZMA_RUN = 0
LZMA_FINISH = 3

MESSAGES = {
    2: "no integrity check",
    3: "unsupported integrity check",
    LZMA_MEM_ERROR: "out of memory",
    LZMA_MEMLIMIT_ERROR: "memory usage limit reached",
    LZMA_FORMAT_ERROR: "not in the .xz format",
    LZMA_OPTIONS_ERROR: "unsupported options (filter chain)",
    LZMA_DATA_ERROR: "compressed data is corrupt",
    LZMA_BUF_ERROR: "compressed data is truncated or corrupt",
}


class _LzmaStream(ctypes.Structure):
    # lzma/base.h: lzma_stream (LZMA_STREAM_INIT is all zeroes)
    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_size_t),
        ("total_in", ctypes.c_uint64),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_size_t),
        ("total_out", ctypes.c_uint64),
        ("allocator", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
        ("reserved_ptr1", ctypes.c_void_p),
        ("reserved_ptr2", ctypes.c_void_p),
        ("reserved_ptr3", ctypes.c_void_p),
        ("reserved_ptr4", ctypes.c_void_p),
        ("seek_pos", ctypes.c_uint64),
        ("reserved_int2", ctypes.c_uint64),
        ("reserved_int3", ctypes.c_size_t),
        ("reserved_int4", ctypes.c_size_t),
        ("reserved_enum1", ctypes.c_int),
        ("reserved_enum2", ctypes.c_int),
    ]


#: Environment variable naming the liblzma to use: a path, or "system" for liblzma.so.5.
LIBRARY_ENV = "IMAGEFORMATS_LIBLZMA"


def _system_library():
    try:
        return ctypes.CDLL("liblzma.so.5")
    except OSError:
        pass
    # Only if the usual soname is missing: find_library runs ldconfig (a subprocess).
    from ctypes.util import find_library

    name = find_library("lzma")
    if name:
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    return None


def _bundled_paths() -> list[str]:
    """liblzma copies shipped inside installed wheels: imagecodecs' manylinux wheels carry a
    current release (5.8 in 2026) for their LZMA codec.  Found without importing imagecodecs."""
    try:
        spec = importlib.util.find_spec("imagecodecs")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    paths = []
    for package_dir in spec.submodule_search_locations:
        # auditwheel puts the wheel's shared libraries in <site-packages>/<name>.libs
        libs = os.path.join(os.path.dirname(os.path.abspath(package_dir)), "imagecodecs.libs")
        paths += sorted(glob.glob(os.path.join(libs, "liblzma*.so*")))
    return paths


def _version(lib) -> int:
    """lzma_version_number(): major * 10**7 + minor * 10**4 + patch * 10 + stability."""
    lib.lzma_version_number.restype = ctypes.c_uint32
    lib.lzma_version_number.argtypes = []
    return lib.lzma_version_number()


def _open_library():
    """The newest liblzma at hand: the system's, or a wheel's newer copy.  liblzma 5.6 made
    LZMA decoding much faster (bench/xz_liblzma.py measures it); the format and checks are
    the same.  IMAGEFORMATS_LIBLZMA=system, or a path, overrides the choice."""
    choice = os.environ.get(LIBRARY_ENV, "")
    if choice and choice != "system":
        try:
            return ctypes.CDLL(choice)
        except OSError as exc:
            raise UnsupportedFeatureError(f"{LIBRARY_ENV}={choice}: cannot load it ({exc.strerror or exc})") from None
    best = _system_library()
    if choice != "system":
        for path in _bundled_paths():
            try:
                lib = ctypes.CDLL(path)
                if best is None or _version(lib) > _version(best):
                    best = lib
            except (OSError, AttributeError):
                continue  # not a usable liblzma: keep what we have
    if best is None:
        raise UnsupportedFeatureError("no liblzma found (the system's liblzma.so.5, or imagecodecs' copy)")
    return best


def library_path() -> str:
    """File name of the liblzma that decodes Blocks (as it was loaded)."""
    return _liblzma()._name


def version_string() -> str:
    """Version of the liblzma that decodes Blocks, e.g. "5.8.2"."""
    lib = _liblzma()
    lib.lzma_version_string.restype = ctypes.c_char_p
    lib.lzma_version_string.argtypes = []
    return lib.lzma_version_string().decode()


def _load():
    lib = _open_library()
    try:
        _version(lib)
    except AttributeError:  # only a path given in the environment can be something else
        raise UnsupportedFeatureError(f"{LIBRARY_ENV}: {lib._name} is not a liblzma") from None
    p = ctypes.POINTER(_LzmaStream)
    lib.lzma_stream_decoder.argtypes = [p, ctypes.c_uint64, ctypes.c_uint32]
    lib.lzma_stream_decoder.restype = ctypes.c_int
    lib.lzma_code.argtypes = [p, ctypes.c_int]
    lib.lzma_code.restype = ctypes.c_int
    lib.lzma_end.argtypes = [p]
    lib.lzma_end.restype = None
    return lib


_lib = None


def _liblzma():
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


class LzmaError(Exception):
    """liblzma refused the data; ``code`` is its lzma_ret value (see MESSAGES)."""

    def __init__(self, code: int):
        super().__init__(MESSAGES.get(code, f"liblzma error {code}"))
        self.code = code


def _address(buf) -> tuple[int, int, object]:
    """(address, length, keep-alive) of a buffer's bytes: bytes objects, or writable buffers."""
    if isinstance(buf, bytes):
        return ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value, len(buf), buf
    arr = (ctypes.c_char * len(buf)).from_buffer(buf)
    return ctypes.addressof(arr), len(buf), arr


class StreamDecoder:
    """One .xz Stream decoded into buffers the caller owns.

        dec = StreamDecoder(memlimit)
        produced, done = dec.decode(input_buffer, output_view)   # repeat with more input
        dec.close()

    Input may be bytes or a writable buffer; output a writable buffer (bytearray, numpy
    array, memoryviews of them).
    """

    def __init__(self, memlimit: int):
        self._lib = _liblzma()
        self._strm = _LzmaStream()
        ret = self._lib.lzma_stream_decoder(ctypes.byref(self._strm), memlimit, 0)
        if ret != LZMA_OK:
            raise LzmaError(ret)
        self.ended = False

    def decode(self, data, out, *, finish: bool = False) -> tuple[int, int]:
        """Decode all of ``data`` (or until the Stream ends or ``out`` is full) into ``out``.

        Returns (input bytes consumed, output bytes written).  ``finish``: this is the last
        input; the Stream must end within it.  Raises LzmaError on corrupt or unsupported data.
        """
        strm = self._strm
        in_addr, in_len, in_keep = _address(data) if len(data) else (0, 0, None)
        out_addr, out_len, out_keep = _address(out) if len(out) else (0, 0, None)
        strm.next_in, strm.avail_in = in_addr, in_len
        strm.next_out, strm.avail_out = out_addr, out_len
        ret = self._lib.lzma_code(ctypes.byref(strm), LZMA_FINISH if finish else LZMA_RUN)
        consumed, produced = in_len - strm.avail_in, out_len - strm.avail_out
        strm.next_in = strm.next_out = None  # do not keep pointers into buffers we do not own
        del in_keep, out_keep
        if ret == LZMA_STREAM_END:
            self.ended = True
        elif ret == LZMA_BUF_ERROR and not finish and produced == 0 and consumed == 0 and not out_len:
            pass  # no room to make progress: the caller looks at what it has
        elif ret != LZMA_OK:
            raise LzmaError(ret)
        return consumed, produced

    def close(self) -> None:
        if self._strm is not None:
            self._lib.lzma_end(ctypes.byref(self._strm))
            self._strm = None

    def __enter__(self) -> "StreamDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
