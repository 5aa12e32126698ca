"""Raw: the guest disk stored as is.  The fallback format and the simplest output."""

from __future__ import annotations

import os
import stat
from typing import Any

from .block import BlockDevice, FileDevice, copy
from .detect import Format, Output, register_format, register_output
from .errors import InvalidArgumentError


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
    with dst:
        copy(src, dst, progress, dst_is_zero=fresh)
        dst.flush()


register_format(Format("raw", "raw", None, _open_raw))
register_output(Output("raw", write_raw, "sparse raw file"))
