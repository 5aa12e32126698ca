"""Seekable .xz: random-access reads (XzDevice) and a multi-Block writer (``convert -O xz``).

See docs/xz.md.
"""

from ..detect import Format, Output, register_format, register_output
from .device import XzDevice, open_xz, parse_streams, probe
from .writer import write_xz

register_format(Format("xz", "container", probe, open_xz))
register_output(Output("xz", write_xz,
                       "multi-block xz, sizes in block headers (-o block_size=16M,level=6,check=crc64,threads=2)"))

__all__ = ["XzDevice", "write_xz", "parse_streams"]
