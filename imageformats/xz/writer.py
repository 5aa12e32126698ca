"""Writing multi-Block .xz files with sizes in every Block Header (so ``xz -T`` decodes in parallel).

Each Block is compressed on a thread pool by liblzma (``lzma.compress``, which
releases the GIL) as a one-Block Stream; that Stream's Block Header is then
rewritten with the Compressed Size and Uncompressed Size fields
(xz-file-format.txt 3.1.3, 3.1.4) and the Block, Check included, is copied
into the output Stream.  An all-zero Block is compressed once per size and
reused, and zero extents of the source are never read.
"""

from __future__ import annotations

import lzma
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..block import BlockDevice, MiB, is_zero, ordered_results
from ..errors import CorruptImageError, DeviceIOError, InvalidArgumentError
from . import header as h

DEFAULT_BLOCK_SIZE = 16 * MiB
DEFAULT_LEVEL = 6
#: LZMA2 dictionary size of each preset level (xz(1) "Presets").
_PRESET_DICT = [256 << 10, 1 << 20, 2 << 20, 4 << 20, 4 << 20, 8 << 20, 8 << 20, 16 << 20, 32 << 20, 64 << 20]


def _parse_options(options: dict[str, Any]) -> dict[str, Any]:
    from ..cli.common import parse_size

    opts = dict(options)
    # `convert -c` passes compress=on: this output is always compressed
    if str(opts.pop("compress", "on")).lower() not in ("on", "1", "true", "yes"):
        raise InvalidArgumentError("xz output is always compressed (compress=off makes no sense)")
    out: dict[str, Any] = {}
    bs = opts.pop("block_size", DEFAULT_BLOCK_SIZE)
    out["block_size"] = parse_size(bs) if isinstance(bs, str) else int(bs)
    if not 4096 <= out["block_size"] <= 4096 * MiB:
        raise InvalidArgumentError("xz block_size must be between 4K and 4G")
    level = str(opts.pop("level", DEFAULT_LEVEL))
    extreme = level.endswith("e")
    try:
        lv = int(level.rstrip("e"))
    except ValueError:
        lv = -1
    if not 0 <= lv <= 9:
        raise InvalidArgumentError(f"xz level must be 0..9 (optionally with 'e'), got {level!r}")
    ext = str(opts.pop("extreme", "off")).lower() in ("on", "1", "true", "yes")
    out["preset"] = lv | (lzma.PRESET_EXTREME if extreme or ext else 0)
    check = str(opts.pop("check", "crc64")).lower()
    if check not in h.CHECK_BY_NAME:
        raise InvalidArgumentError(f"xz check must be one of {', '.join(h.CHECK_BY_NAME)}, got {check!r}")
    out["check"] = h.CHECK_BY_NAME[check]
    threads = int(opts.pop("threads", min(2, os.cpu_count() or 1)))
    if threads < 1:
        raise InvalidArgumentError("xz threads must be >= 1")
    out["threads"] = threads
    if opts:
        raise InvalidArgumentError(f"unknown xz output option(s): {', '.join(sorted(opts))} "
                                   f"(known: block_size, level, extreme, check, threads)")
    return out


def encode_block(data, preset: int, check: int) -> tuple[bytes, int]:
    """One Block (header with sizes + data + padding + check) and its unpadded size."""
    # A dictionary larger than the Block is never used: cap it (less decoder memory, same output).
    dict_size = min(_PRESET_DICT[preset & 0x1F], max(4096, len(data)))
    stream = lzma.compress(data, format=lzma.FORMAT_XZ, check=check,
                           filters=[{"id": lzma.FILTER_LZMA2, "preset": preset, "dict_size": dict_size}])
    # The one-Block Stream liblzma wrote: Stream Header | Block | Index | Stream Footer.
    backward_size, _ = h.parse_stream_footer(stream[-h.STREAM_FOOTER_SIZE:])
    records = h.parse_index(stream[-h.STREAM_FOOTER_SIZE - backward_size:-h.STREAM_FOOTER_SIZE], max_records=1)
    if len(records) != 1 or records[0][1] != len(data):
        raise CorruptImageError("liblzma wrote an unexpected Stream")  # cannot happen
    unpadded = records[0][0]
    pos = h.STREAM_HEADER_SIZE
    hsize = (stream[pos] + 1) * 4
    old = h.parse_block_header(stream[pos:pos + hsize])
    csize = unpadded - hsize - h.check_size(check)
    filters = [(f.id, f.props) for f in old.filters]
    new_header = h.build_block_header(filters, csize, len(data))
    body = stream[pos + hsize:pos + h.round4(unpadded)]  # data, padding, check
    return new_header + body, unpadded - hsize + len(new_header)


class _ZeroBlocks:
    """Encoded all-zero Blocks, per size (every zero Block of one size encodes the same)."""

    def __init__(self, preset: int, check: int):
        self.preset, self.check = preset, check
        self._cache: dict[int, tuple[bytes, int]] = {}
        self._lock = threading.Lock()

    def get(self, size: int) -> tuple[bytes, int]:
        with self._lock:
            hit = self._cache.get(size)
        if hit is None:
            hit = encode_block(bytes(size), self.preset, self.check)
            with self._lock:
                self._cache[size] = hit
        return hit


def _zero_ranges(src: BlockDevice, offset: int, length: int) -> bool:
    """True when the source's extents say the whole range reads as zeroes."""
    try:
        for ext in src.extents(length, offset):
            if not ext.zero:
                return False
            if ext.end >= offset + length:
                return True
    except Exception:
        return False
    return True


def write_xz(src: BlockDevice, dst_path: str, options: dict[str, Any], progress=None) -> None:
    """``convert -O xz``: write ``src``'s guest view as a multi-Block .xz file."""
    o = _parse_options(options)
    bs, preset, check, threads = o["block_size"], o["preset"], o["check"], o["threads"]
    zeroes = _ZeroBlocks(preset, check)
    local = threading.local()
    handles: list[BlockDevice] = []
    handles_lock = threading.Lock()

    def handle() -> BlockDevice:
        dev = getattr(local, "dev", None)
        if dev is None:
            try:
                dev = src.clone() if threads > 1 else src
            except Exception:
                dev = src
            if dev is not src:
                with handles_lock:
                    handles.append(dev)
            local.dev = dev
        return dev

    def job(offset: int, length: int) -> tuple[bytes, int, int]:
        if _zero_ranges(src if threads == 1 else handle(), offset, length):
            block, unpadded = zeroes.get(length)
            return block, unpadded, length
        buf = bytearray(length)
        handle().readinto(buf, offset)
        if is_zero(buf):
            block, unpadded = zeroes.get(length)
        else:
            block, unpadded = encode_block(buf, preset, check)
        return block, unpadded, length

    records: list[tuple[int, int]] = []
    done = 0
    tmp = dst_path
    try:
        f = open(tmp, "wb")
    except OSError as exc:
        raise DeviceIOError(f"cannot create {dst_path}: {exc.strerror or exc}") from None
    try:
        with f, ThreadPoolExecutor(max_workers=threads) as pool:
            f.write(h.build_stream_header(check))
            jobs = ((offset, min(bs, src.size - offset)) for offset in range(0, src.size, bs))
            for block, unpadded, length in ordered_results(pool, job, jobs, threads * 4):
                f.write(block)
                records.append((unpadded, length))
                done += length
                if progress is not None:
                    progress(done, src.size)
            index = h.build_index(records)
            f.write(index)
            f.write(h.build_stream_footer(check, len(index)))
    except OSError as exc:
        raise DeviceIOError(f"writing {dst_path}: {exc.strerror or exc}") from None
    finally:
        for dev in handles:
            dev.close()
