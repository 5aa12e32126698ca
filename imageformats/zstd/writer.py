"""Writing seekable zstd (contrib/seekable_format): independent frames plus a seek table.

Frames are compressed on a thread pool (python-zstandard releases the GIL),
each with its content size and content checksum; the seek table records each
frame's sizes and (checksum=on) the low 32 bits of its XXH64, which is the
same value as the frame's own content checksum, so it is copied from the
frame's last four bytes.  All-zero frames are compressed once per size and
reused; zero extents of the source are never read.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zstandard

from ..block import BlockDevice, MiB, is_zero, ordered_results
from ..errors import DeviceIOError, InvalidArgumentError
from ..xz.writer import _zero_ranges
from . import header as h

DEFAULT_FRAME_SIZE = 4 * MiB
DEFAULT_LEVEL = 3


def _parse_options(options: dict[str, Any]) -> dict[str, Any]:
    from ..cli.common import parse_size

    opts = dict(options)
    # `convert -c` passes compress=on: this output is always compressed
    if str(opts.pop("compress", "on")).lower() not in ("on", "1", "true", "yes"):
        raise InvalidArgumentError("zstd output is always compressed (compress=off makes no sense)")
    fs = opts.pop("frame_size", DEFAULT_FRAME_SIZE)
    frame_size = parse_size(fs) if isinstance(fs, str) else int(fs)
    if not 4096 <= frame_size <= 1024 * MiB:
        raise InvalidArgumentError("zstd frame_size must be between 4K and 1G")
    try:
        level = int(opts.pop("level", DEFAULT_LEVEL))
    except ValueError:
        raise InvalidArgumentError("zstd level must be an integer") from None
    if not -7 <= level <= 22:
        raise InvalidArgumentError("zstd level must be between -7 and 22")
    checksum = str(opts.pop("checksum", "on")).lower()
    if checksum not in ("on", "off", "1", "0", "true", "false", "yes", "no"):
        raise InvalidArgumentError("zstd checksum must be on or off")
    threads = int(opts.pop("threads", min(2, os.cpu_count() or 1)))
    if threads < 1:
        raise InvalidArgumentError("zstd threads must be >= 1")
    if opts:
        raise InvalidArgumentError(f"unknown zstd output option(s): {', '.join(sorted(opts))} "
                                   f"(known: frame_size, level, checksum, threads)")
    return {"frame_size": frame_size, "level": level, "checksum": checksum in ("on", "1", "true", "yes"),
            "threads": threads}


def write_zstd(src: BlockDevice, dst_path: str, options: dict[str, Any], progress=None) -> None:
    """``convert -O zstd``: write ``src``'s guest view as a seekable zstd file."""
    o = _parse_options(options)
    fs, level, checksum, threads = o["frame_size"], o["level"], o["checksum"], o["threads"]
    local = threading.local()
    handles: list[BlockDevice] = []
    lock = threading.Lock()
    zero_frames: dict[int, bytes] = {}

    def state():
        if not hasattr(local, "cctx"):
            local.cctx = zstandard.ZstdCompressor(level=level, write_checksum=checksum, write_content_size=True)
            try:
                local.dev = src.clone() if threads > 1 else src
            except Exception:
                local.dev = src
            if local.dev is not src:
                with lock:
                    handles.append(local.dev)
        return local

    def compress(data, length: int) -> bytes:
        return state().cctx.compress(data)

    def zero_frame(length: int) -> bytes:
        with lock:
            frame = zero_frames.get(length)
        if frame is None:
            frame = compress(bytes(length), length)
            with lock:
                zero_frames[length] = frame
        return frame

    def job(offset: int, length: int) -> tuple[bytes, int]:
        st = state()
        if _zero_ranges(st.dev, offset, length):
            return zero_frame(length), length
        buf = bytearray(length)
        st.dev.readinto(buf, offset)
        if is_zero(buf):
            return zero_frame(length), length
        return compress(buf, length), length

    entries: list[tuple[int, int, int | None]] = []
    done = 0
    try:
        f = open(dst_path, "wb")
    except OSError as exc:
        raise DeviceIOError(f"cannot create {dst_path}: {exc.strerror or exc}") from None
    try:
        with f, ThreadPoolExecutor(max_workers=threads) as pool:
            jobs = ((offset, min(fs, src.size - offset)) for offset in range(0, src.size, fs))
            for frame, length in ordered_results(pool, job, jobs, threads * 4):
                f.write(frame)
                entries.append((len(frame), length, int.from_bytes(frame[-4:], "little") if checksum else None))
                done += length
                if progress is not None:
                    progress(done, src.size)
            f.write(h.build_seek_table(entries, checksum))
    except OSError as exc:
        raise DeviceIOError(f"writing {dst_path}: {exc.strerror or exc}") from None
    finally:
        for dev in handles:
            dev.close()
