"""Raw: the guest disk stored as is.  The fallback format and the simplest output."""

from __future__ import annotations

import os
import stat
from typing import Any

from .block import BlockDevice, FileDevice, MiB, copy
from .detect import Format, Output, register_format, register_output
from .errors import InvalidArgumentError

#: Bytes of the guest disk copied between two start_writeback() calls on the output.
WRITEBACK_EVERY = 64 * MiB


def _open_raw(dev: BlockDevice, writable: bool, options: dict[str, Any]) -> BlockDevice:
    return dev


def write_raw(src: BlockDevice, dst_path: str, options: dict[str, Any], progress=None) -> None:
    """Write ``src``'s guest view to ``dst_path`` as a sparse raw file (or onto a block device)."""
    if options:
        raise InvalidArgumentError(f"raw output takes no options (got {', '.join(sorted(options))})")
    try:
        is_blockdev = stat.S_ISBLK(os.stat(dst_path).st_mode)
    except FileNotFoundError:
        is_blockdev = False
    if is_blockdev:
        dst = FileDevice(dst_path, writable=True)
        fresh = False
    else:
        dst = FileDevice.create(dst_path, src.size)
        fresh = True  # a new sparse file already reads as zeroes: skip zero regions
    kicked_at = 0

    def on_progress(done: int, total: int) -> None:
        nonlocal kicked_at
        if done - kicked_at >= WRITEBACK_EVERY:
            # Let the disk work while the source is still being read: the final fsync then
            # waits for the last few MiB instead of everything (1 GiB xz -> raw: 0.33 s -> 0.02 s).
            dst.start_writeback()
            kicked_at = done
        if progress is not None:
            progress(done, total)

    with dst:
        copy(src, dst, on_progress, dst_is_zero=fresh)
        dst.flush()


register_format(Format("raw", "raw", None, _open_raw))
register_output(Output("raw", write_raw, "sparse raw file"))
