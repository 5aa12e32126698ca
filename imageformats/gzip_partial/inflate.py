"""Raw inflate with block-boundary stops, bit priming and window export (system zlib via ctypes).

Python's ``zlib.decompressobj`` cannot stop at deflate block boundaries, report
the bit position there, or start in the middle of a byte, which is what a
zran-style index needs (access points at block boundaries, most of which are not
byte-aligned in a normal gzip).  The system libz has all three (``inflate`` with
``Z_BLOCK``, ``data_type``, ``inflatePrime``, ``inflateSetDictionary``,
``inflateGetDictionary``); this module is a thin, bounded wrapper around them.
The ctypes calls release the GIL, so several inflaters run on both cores.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from ..errors import CorruptImageError, UnsupportedFeatureError

Z_OK = 0
Z_STREAM_END = 1
Z_NEED_DICT = 2
Z_BUF_ERROR = -5
Z_NO_FLUSH = 0
Z_BLOCK = 5

WINDOW = 32768


class _ZStream(ctypes.Structure):
    # zlib.h struct z_stream_s
    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


def _load():
    name = ctypes.util.find_library("z") or "libz.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:  # pragma: no cover - libz is part of every Python install
        raise UnsupportedFeatureError(f"system zlib (libz) not found: {exc}") from None
    p = ctypes.POINTER(_ZStream)
    lib.zlibVersion.restype = ctypes.c_char_p
    lib.inflateInit2_.argtypes = [p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.inflate.argtypes = [p, ctypes.c_int]
    lib.inflateEnd.argtypes = [p]
    lib.inflatePrime.argtypes = [p, ctypes.c_int, ctypes.c_int]
    lib.inflateSetDictionary.argtypes = [p, ctypes.c_void_p, ctypes.c_uint]
    lib.inflateGetDictionary.argtypes = [p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint)]
    return lib


_lib = _load()
_VERSION = _lib.zlibVersion()


def _addr(buf: bytearray, offset: int = 0) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf, offset)) if len(buf) > offset else 0


class RawInflater:
    """One raw-deflate decoder (RFC 1951), optionally resumed mid-stream.

    ``bits``/``byte``: the access point starts ``bits`` bits before a byte
    boundary; ``byte`` is the byte holding them (its top ``bits`` bits are fed
    with inflatePrime).  ``window``: the up to 32 KiB of output preceding the
    access point.
    """

    def __init__(self, *, bits: int = 0, byte: int = 0, window: bytes = b""):
        self._s = _ZStream()
        rc = _lib.inflateInit2_(ctypes.byref(self._s), -15, _VERSION, ctypes.sizeof(_ZStream))
        if rc != Z_OK:
            raise MemoryError("inflateInit2 failed")
        self._live = True
        if bits:
            if _lib.inflatePrime(ctypes.byref(self._s), bits, byte >> (8 - bits)) != Z_OK:
                raise CorruptImageError("inflatePrime failed")
        if window:
            wbuf = ctypes.create_string_buffer(bytes(window), len(window))
            if _lib.inflateSetDictionary(ctypes.byref(self._s), wbuf, len(window)) != Z_OK:
                raise CorruptImageError("inflateSetDictionary failed")
        self.finished = False

    def inflate(self, inbuf: bytearray, in_pos: int, in_end: int, outbuf: bytearray, out_pos: int,
                out_end: int, block: bool = False) -> tuple[int, int, int]:
        """Run inflate on ``inbuf[in_pos:in_end]`` into ``outbuf[out_pos:out_end]``.

        Returns (bytes consumed, bytes produced, data_type).  Sets ``finished`` at
        the end of the deflate stream; raises CorruptImageError on bad data.
        """
        s = self._s
        s.next_in = _addr(inbuf, in_pos)
        s.avail_in = in_end - in_pos
        s.next_out = _addr(outbuf, out_pos)
        s.avail_out = out_end - out_pos
        rc = _lib.inflate(ctypes.byref(s), Z_BLOCK if block else Z_NO_FLUSH)
        consumed = (in_end - in_pos) - s.avail_in
        produced = (out_end - out_pos) - s.avail_out
        if rc == Z_STREAM_END:
            self.finished = True
        elif rc == Z_NEED_DICT:
            raise CorruptImageError("deflate stream asks for a preset dictionary")
        elif rc not in (Z_OK, Z_BUF_ERROR):
            msg = s.msg.decode(errors="replace") if s.msg else f"zlib error {rc}"
            raise CorruptImageError(f"invalid deflate data: {msg}")
        return consumed, produced, s.data_type

    def window(self) -> bytes:
        """The last up to 32 KiB of output (the sliding window)."""
        buf = ctypes.create_string_buffer(WINDOW)
        n = ctypes.c_uint(0)
        if _lib.inflateGetDictionary(ctypes.byref(self._s), buf, ctypes.byref(n)) != Z_OK:
            raise CorruptImageError("inflateGetDictionary failed")
        return buf.raw[: n.value]

    def close(self) -> None:
        if self._live:
            self._live = False
            _lib.inflateEnd(ctypes.byref(self._s))

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
