"""Seekable zstd: random-access reads (ZstdDevice, also of plain .zst) and a seekable writer.

See docs/zstd.md.
"""

from ..detect import Format, Output, register_format, register_output
from .device import ZstdDevice, open_zstd, probe
from .writer import write_zstd

register_format(Format("zstd", "container", probe, open_zstd))
register_output(Output("zstd", write_zstd,
                       "seekable zstd (-o frame_size=4M,level=3,checksum=on,threads=2)"))

__all__ = ["ZstdDevice", "write_zstd"]
